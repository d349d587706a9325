"""The calls the demo makes of an API server, whichever control plane serves it: the emulator's
`Api` (KMock) and simfleet's `ClusterApi` (a real control plane) both answer them."""

from __future__ import annotations

import builtins
from typing import Any, Protocol

# A Kubernetes object as JSON: its shape is the API server's, checked where it is read.
Obj = dict[str, Any]


class DemoApi(Protocol):
    """Sync reads (cheap enough to poll from the event loop) and async writes."""

    def get(self, api_version: str, kind: str, namespace: str | None,
            name: str) -> Obj | None: ...

    def list(self, api_version: str, kind: str,
             namespace: str | None = None) -> builtins.list[Obj]: ...

    # What a write returns differs (the stored object, or nothing); the demo ignores it.
    async def create(self, obj: Obj) -> object: ...

    async def patch(self, api_version: str, kind: str, namespace: str | None, name: str,
                    patch: Obj) -> object: ...
