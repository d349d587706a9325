"""An emulated Kubernetes API (KMock) and the real Kopf operator in one event loop.

Shared by tests/operator and the operator benchmark. KMock (by Kopf's author) keeps objects
in memory and serves list/watch/get/create/patch/delete over HTTP. Its gaps shape the helpers:
no controllers (a caller marks a Deployment available by patching its status), no garbage
collector, no label selectors (the operator filters again client-side), no resourceVersion
(given a fixed one at create), no generateName (Events are read from the request log).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from typing import Any, ClassVar

import kmock
import kopf
import yaml

from trilemma.operator import handlers, naming
from trilemma.operator.metrics import OperatorMetrics
from trilemma.operator.optimize import Planner
from trilemma.operator.reconcile import OperatorConfig


class ForgetfulEmulator(kmock.KubernetesEmulator):
    """KMock's emulator without the full request log, for benchmarks.

    KMock keeps every request and, to route each new one, re-filters that whole log: O(n)
    per request, quadratic over a benchmark, until the emulator rather than the operator is
    what gets measured. This keeps the newest requests only (those still being answered must
    find themselves there). Tests that assert on requests use the plain emulator.
    """

    keep: int = 8
    # Requests by method and resource, for the benchmark report (one emulator per process).
    served: ClassVar[Counter[str]] = Counter()

    async def _handle(self, request: Any) -> Any:
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

    def _mark(self, request: Any) -> None:
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


OE = f"{naming.GROUP}/{naming.VERSION}/optimizedendpoints"
POOLS = f"{naming.GROUP}/{naming.VERSION}/hardwarepools"
DEPLOYMENTS = "apps/v1/deployments"


def declare_resources(server: Any) -> None:
    info = kmock.ResourceInfo
    server.resources[OE] = info(kind="OptimizedEndpoint", namespaced=True,
                                shortnames={"oe"}, subresources={"status"},
                                verbs={"get", "list", "watch", "patch", "create", "delete"})
    server.resources[POOLS] = info(kind="HardwarePool", namespaced=False,
                                   subresources={"status"},
                                   verbs={"get", "list", "watch", "patch", "create"})
    verbs = {"get", "list", "watch", "create", "patch", "delete"}
    for res, kind in ((DEPLOYMENTS, "Deployment"), ("v1/services", "Service"),
                      ("v1/configmaps", "ConfigMap"), ("v1/events", "Event")):
        server.resources[res] = info(kind=kind, namespaced=True, verbs=verbs)
    # Kopf's backbone waits for these two to be discoverable before it watches anything.
    server.resources["v1/namespaces"] = info(kind="Namespace", namespaced=False, verbs=verbs)
    server.resources["apiextensions.k8s.io/v1/customresourcedefinitions"] = info(
        kind="CustomResourceDefinition", namespaced=False, verbs=verbs)


def write_kubeconfig(path: Any, url: str) -> None:
    path.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": url}}],
        "users": [{"name": "kmock", "user": {}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}]}))


class Operator:
    """One running operator: start/stop it (restarts included) and inspect its runtime."""

    def __init__(self, planner: Planner | None, concurrency: int) -> None:
        self.planner = planner
        self.concurrency = concurrency
        self.metrics = OperatorMetrics()
        self.runtime: Any = None
        self._task: asyncio.Task[None] | None = None
        self._stop: asyncio.Event | None = None

    async def start(self) -> None:
        registry = kopf.OperatorRegistry()
        handlers.register(registry)
        config = OperatorConfig(max_concurrent_optimizations=self.concurrency,
                                cache_dir="/tmp/trilemma-tests")
        self.runtime = handlers.build_runtime(config, planner=self.planner,
                                              metrics=self.metrics)
        self._stop, ready = asyncio.Event(), asyncio.Event()
        self._task = asyncio.create_task(kopf.operator(
            registry=registry, clusterwide=True, standalone=True,
            memo=kopf.Memo(runtime=self.runtime), stop_flag=self._stop, ready_flag=ready))
        await asyncio.wait_for(ready.wait(), 10)

    async def stop(self) -> None:
        if self._task is None:
            return
        assert self._stop is not None
        self._stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self._task, 15)
        await self.runtime.kube.close()
        self._task = None


class Api:
    """What a user (kubectl) does against the emulated API server, over plain HTTP."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self.base = str(server.url).rstrip("/")

    @staticmethod
    def _path(api_version: str, plural: str, namespace: str | None, name: str = "") -> str:
        prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        scope = f"/namespaces/{namespace}" if namespace else ""
        return f"{prefix}{scope}/{plural}" + (f"/{name}" if name else "")

    async def _send(self, method: str, path: str, body: Any = None,
                    content_type: str = "application/json") -> Any:
        import aiohttp

        async with aiohttp.ClientSession() as session, session.request(
                method, self.base + path, json=body,
                headers={"Content-Type": content_type}) as resp:
            data = await resp.json()
            if resp.status >= 400:
                raise AssertionError(f"{method} {path}: {resp.status} {data}")
            return data

    async def create(self, obj: dict[str, Any]) -> Any:
        # KMock keeps no resourceVersion, but Kopf's JSON patches test for one (when it adds
        # its finalizer): give each object a fixed one, as a real server would give one.
        obj = {**obj, "metadata": {"resourceVersion": "1", **obj["metadata"]}}
        api_version, kind = obj["apiVersion"], obj["kind"]
        plural = PLURALS[kind]
        return await self._send("POST", self._path(api_version, plural,
                                                   obj["metadata"].get("namespace")), obj)

    async def patch(self, api_version: str, kind: str, namespace: str | None, name: str,
                    patch: dict[str, Any]) -> Any:
        return await self._send("PATCH", self._path(api_version, PLURALS[kind], namespace,
                                                    name), patch,
                                "application/merge-patch+json")

    async def delete(self, api_version: str, kind: str, namespace: str | None,
                     name: str) -> Any:
        return await self._send("DELETE", self._path(api_version, PLURALS[kind], namespace,
                                                     name))

    def get(self, api_version: str, kind: str, namespace: str | None,
            name: str) -> dict[str, Any] | None:
        """The stored object (KMock's memory, no HTTP), or None."""
        key = (self._resource(api_version, kind), namespace, name)
        if key not in self.server.objects:
            return None
        obj = self.server.objects[key]
        return None if obj.deleted else _plain(obj.raw)

    def list(self, api_version: str, kind: str, namespace: str | None = None
             ) -> list[dict[str, Any]]:
        res = self._resource(api_version, kind)
        out = []
        for (r, ns, _name), obj in self.server.objects.items():
            if r == res and (namespace is None or ns == namespace) and not obj.deleted:
                out.append(_plain(obj.raw))
        return sorted(out, key=lambda o: o["metadata"].get("name") or "")

    def events(self, namespace: str | None = None) -> list[dict[str, Any]]:
        """Every Event posted, from KMock's request log: Kopf names Events with generateName,
        which KMock does not expand, so only the first would be kept as an object."""
        found = []
        for request in self.server[kmock.resource("v1/events")]:
            data = request.data
            if request.method.upper() == "POST" and isinstance(data, dict) and (
                    namespace is None or data.get("metadata", {}).get("namespace")
                    in (namespace, None)):
                found.append(data)
        return found

    @staticmethod
    def _resource(api_version: str, kind: str) -> Any:
        return kmock.resource(f"{api_version}/{PLURALS[kind]}")

    def last_status(self) -> str:
        """Phases and messages of every endpoint: what a failed wait reports."""
        return "; ".join(f"{o['metadata']['name']}: {(o.get('status') or {}).get('phase')} "
                         f"{(o.get('status') or {}).get('message', '')[:300]}"
                         for o in self.list("trilemma.dev/v1alpha1", "OptimizedEndpoint"))

    def requests(self, method: str) -> int:
        return len(self.server[method.lower()])

    async def wait(self, check: Callable[[], Any], timeout: float = 30,
                   what: str = "condition") -> Any:
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


PLURALS = {"OptimizedEndpoint": "optimizedendpoints", "HardwarePool": "hardwarepools",
           "Deployment": "deployments", "Service": "services", "ConfigMap": "configmaps",
           "Event": "events", "CustomResourceDefinition": "customresourcedefinitions",
           "PodMonitor": "podmonitors"}


def _plain(raw: Any) -> Any:
    import json

    return json.loads(json.dumps(raw))


