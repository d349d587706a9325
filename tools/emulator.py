"""An emulated Kubernetes API (KMock), for the real Kopf operator to run against in-process.

What `trilemma demo --control-plane kmock`, tests/operator and the operator benchmark share;
the operator itself runs with trilemma.tools.inprocess. This is the one module that imports
KMock, an optional extra (`pip install 'trilemma[demo]'`). KMock (by Kopf's
author) keeps objects in memory and serves list/watch/get/create/patch/delete over HTTP. Its
gaps shape the helpers: no controllers (a caller marks a Deployment available by patching its
status), no garbage collector, no label selectors (the operator filters again client-side), no
resourceVersion (given a fixed one at create). KMock keeps `generateName` as it is, so every
Event Kopf posts after the first collided with it (409); `Emulator` names them as an API
server would.

    async with ForgetfulEmulator() as server, kmock.Server(server):
        declare_resources(server)
        write_kubeconfig(path, str(server.url))  # and point $KUBECONFIG at it
        operator = Operator()  # trilemma.tools.inprocess
        await operator.start()
        api = Api(server)
        await api.create({...})
"""

from __future__ import annotations

import asyncio
import builtins
import json
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import aiohttp.web
import kmock
import yaml

from trilemma.operator import naming

Obj = dict[str, Any]
T = TypeVar("T")
OE = f"{naming.GROUP}/{naming.VERSION}/optimizedendpoints"
POOLS = f"{naming.GROUP}/{naming.VERSION}/hardwarepools"
DEPLOYMENTS = "apps/v1/deployments"
PLURALS = {"OptimizedEndpoint": "optimizedendpoints", "HardwarePool": "hardwarepools",
           "Deployment": "deployments", "Service": "services", "ConfigMap": "configmaps",
           "Event": "events", "CustomResourceDefinition": "customresourcedefinitions",
           "PodMonitor": "podmonitors", "PodDisruptionBudget": "poddisruptionbudgets",
           "InferencePool": "inferencepools", "ServiceAccount": "serviceaccounts",
           "Role": "roles", "RoleBinding": "rolebindings"}


class Emulator(kmock.KubernetesEmulator):
    """KMock's emulator, naming objects created with `metadata.generateName` only.

    KMock stores such an object under the name None, so every later one (Kopf posts each
    Event that way) is refused with 409 Conflict and lost. An API server appends five random
    characters; a counter does here, so runs stay reproducible.
    """

    _generated: int = 0

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        data = request.data
        if request.action == kmock.action.CREATE and isinstance(data, dict):
            meta = data.setdefault("metadata", {})
            if not meta.get("name") and meta.get("generateName"):
                type(self)._generated += 1
                meta["name"] = f"{meta['generateName']}{type(self)._generated:05x}"
        return await super()._handle(request)


class ForgetfulEmulator(Emulator):
    """KMock's emulator without the full request log, for long runs (benchmark, demo).

    KMock keeps every request and, to route each new one, re-filters that whole log: O(n)
    per request, quadratic over a long run, until the emulator rather than the operator is
    what gets measured. This keeps the newest requests only (those still being answered must
    find themselves there). Tests that assert on requests use the plain emulator.
    """

    keep: int = 8
    # Requests by method and resource, for the benchmark report (one emulator per process).
    served: ClassVar[Counter[str]] = Counter()

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        kind = request.resource.plural if request.resource is not None else "other"
        suffix = "/status" if str(request.url).endswith("/status") else ""
        self.served[f"{request.method} {kind}{suffix}"] += 1
        log = self._requests
        if len(log) > 2 * self.keep:
            del log[:-self.keep]
        response = await super()._handle(request)
        self._mark(request)
        return response

    # When each object was created, and when each status phase was first written, as the
    # server saw it: a benchmark's own polling would share (and be starved by) this loop.
    marks: ClassVar[dict[str, float]] = {}

    def _mark(self, request: kmock.Request) -> None:
        data = request.data if isinstance(request.data, dict) else {}
        kind = request.resource.plural if request.resource is not None else None
        now = time.perf_counter()
        if request.action == kmock.action.CREATE and kind is not None:
            name = (data.get("metadata") or {}).get("name")
            self.marks.setdefault(f"{kind}/{name}", now)
        elif request.action == kmock.action.UPDATE and kind == "optimizedendpoints":
            phase = (data.get("status") or {}).get("phase")
            if phase:
                self.marks.setdefault(f"phase/{request.name}/{phase}", now)


def declare_resources(server: kmock.KubernetesEmulator) -> None:
    """The resources the operator reads and writes, so that KMock serves and lists them."""
    info = kmock.ResourceInfo
    server.resources[OE] = info(kind="OptimizedEndpoint", namespaced=True,
                                shortnames={"oe"}, subresources={"status"},
                                verbs={"get", "list", "watch", "patch", "create", "delete"})
    server.resources[POOLS] = info(kind="HardwarePool", namespaced=False,
                                   subresources={"status"},
                                   verbs={"get", "list", "watch", "patch", "create"})
    verbs = {"get", "list", "watch", "create", "patch", "delete"}
    for res, kind in ((DEPLOYMENTS, "Deployment"), ("v1/services", "Service"),
                      ("v1/configmaps", "ConfigMap"), ("v1/events", "Event"),
                      ("policy/v1/poddisruptionbudgets", "PodDisruptionBudget"),
                      ("v1/serviceaccounts", "ServiceAccount"),
                      ("rbac.authorization.k8s.io/v1/roles", "Role"),
                      ("rbac.authorization.k8s.io/v1/rolebindings", "RoleBinding")):
        server.resources[res] = info(kind=kind, namespaced=True, verbs=verbs)
    # Kopf's backbone waits for these two to be discoverable before it watches anything.
    server.resources["v1/namespaces"] = info(kind="Namespace", namespaced=False, verbs=verbs)
    server.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = info(
        kind="CustomResourceDefinition", namespaced=False, verbs=verbs)


def write_kubeconfig(path: Path, url: str) -> None:
    """A kubeconfig whose only context is the emulator at `url` (no credentials)."""
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": url.rstrip("/")}}],
        "users": [{"name": "kmock", "user": {}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}]}))


class Api:
    """What a user (kubectl) does against the emulated API server, over plain HTTP.

    Reads (`get`, `list`) look into KMock's memory directly. A request the server refuses
    raises AssertionError with the status and body, and `wait` raises it on timeout: the
    callers are tests (which want an assertion's report) and the demo (which stops there).
    """

    def __init__(self, server: kmock.KubernetesEmulator) -> None:
        self.server = server
        self.base = str(server.url).rstrip("/")

    @staticmethod
    def _path(api_version: str, plural: str, namespace: str | None, name: str = "") -> str:
        prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        scope = f"/namespaces/{namespace}" if namespace else ""
        return f"{prefix}{scope}/{plural}" + (f"/{name}" if name else "")

    async def _send(self, method: str, path: str, body: Obj | None = None,
                    content_type: str = "application/json") -> Obj:
        async with aiohttp.ClientSession() as session, session.request(
                method, self.base + path, json=body,
                headers={"Content-Type": content_type}) as resp:
            # The API server answers every request with a JSON object (a Status on errors).
            data: Obj = await resp.json()
            if resp.status >= 400:
                raise AssertionError(f"{method} {path}: {resp.status} {data}")
            return data

    async def create(self, obj: Obj) -> Obj:
        # KMock keeps no resourceVersion, but Kopf's JSON patches test for one (when it adds
        # its finalizer): give each object a fixed one, as a real server would give one.
        obj = {**obj, "metadata": {"resourceVersion": "1", **obj["metadata"]}}
        api_version, kind = obj["apiVersion"], obj["kind"]
        plural = PLURALS[kind]
        return await self._send("POST", self._path(api_version, plural,
                                                   obj["metadata"].get("namespace")), obj)

    async def patch(self, api_version: str, kind: str, namespace: str | None, name: str,
                    patch: Obj) -> Obj:
        return await self._send("PATCH", self._path(api_version, PLURALS[kind], namespace,
                                                    name), patch,
                                "application/merge-patch+json")

    async def delete(self, api_version: str, kind: str, namespace: str | None,
                     name: str) -> Obj:
        return await self._send("DELETE", self._path(api_version, PLURALS[kind], namespace,
                                                     name))

    def get(self, api_version: str, kind: str, namespace: str | None,
            name: str) -> Obj | None:
        """The stored object (KMock's memory, no HTTP), or None."""
        key = (self._resource(api_version, kind), namespace, name)
        if key not in self.server.objects:
            return None
        obj = self.server.objects[key]
        return None if obj.deleted else _plain(obj.raw)

    def list(self, api_version: str, kind: str, namespace: str | None = None) -> list[Obj]:
        res = self._resource(api_version, kind)
        out = []
        for (r, ns, _name), obj in self.server.objects.items():
            if r == res and (namespace is None or ns == namespace) and not obj.deleted:
                out.append(_plain(obj.raw))
        return sorted(out, key=lambda o: o["metadata"].get("name") or "")

    # `list` names the method above inside this class body, hence builtins.list below.
    def events(self, namespace: str | None = None) -> builtins.list[Obj]:
        """Every Event posted, from KMock's request log: Kopf names Events with generateName,
        which KMock does not expand, so only the first would be kept as an object. (The
        ForgetfulEmulator keeps the newest requests only.)"""
        found = []
        for request in self.server[kmock.resource("v1/events")]:
            data = request.data
            if request.method.upper() == "POST" and isinstance(data, dict) and (
                    namespace is None or data.get("metadata", {}).get("namespace")
                    in (namespace, None)):
                found.append(data)
        return found

    @staticmethod
    def _resource(api_version: str, kind: str) -> kmock.resource:
        return kmock.resource(f"{api_version}/{PLURALS[kind]}")

    def last_status(self) -> str:
        """Phases and messages of every endpoint: what a failed wait reports."""
        return "; ".join(f"{o['metadata']['name']}: {(o.get('status') or {}).get('phase')} "
                         f"{(o.get('status') or {}).get('message', '')[:300]}"
                         for o in self.list(naming.API_VERSION, "OptimizedEndpoint"))

    def requests(self, method: str) -> int:
        return len(self.server[method.lower()])

    async def wait(self, check: Callable[[], T], timeout: float = 30,
                   what: str = "condition") -> T:
        """Poll `check` until it returns something truthy; fail after `timeout` seconds."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        while True:
            found = check()
            if found:
                return found
            if loop.time() > end:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; "
                                     f"last seen: {self.last_status()}")
            await asyncio.sleep(0.05)


def _plain(raw: Obj) -> Obj:
    """A deep copy of a stored object, in plain JSON types."""
    plain: Obj = json.loads(json.dumps(raw))
    return plain
