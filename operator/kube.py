"""The operator's Kubernetes API calls: get, list, create, merge-patch, delete of any object.

One small generic client over kubernetes_asyncio's ApiClient (the official async client,
configured by the same login Kopf uses), because the children span core, apps and custom
groups (LeaderWorkerSet, PodMonitor) and the reconciler treats them all alike: plain dicts in,
plain dicts out. Patches are JSON merge patches (RFC 7386): lists replace wholesale, which is
what a rendered, hashed child wants, and what every API server (and KMock) agrees on.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any

from kubernetes_asyncio.client import ApiClient
from kubernetes_asyncio.client.exceptions import ApiException

Obj = dict[str, Any]
MERGE_PATCH = "application/merge-patch+json"
# Plural resource names of the kinds the operator manages. Kubernetes cannot be asked for the
# plural of a kind without discovery; these are fixed by their API definitions.
PLURALS = {
    "Deployment": "deployments",
    "PodDisruptionBudget": "poddisruptionbudgets",
    "Service": "services",
    "ConfigMap": "configmaps",
    "Secret": "secrets",
    "Event": "events",
    "LeaderWorkerSet": "leaderworkersets",
    "PodMonitor": "podmonitors",
    "OptimizedEndpoint": "optimizedendpoints",
    "HardwarePool": "hardwarepools",
    "CustomResourceDefinition": "customresourcedefinitions",
    # An endpoint's Gateway API pool and its endpoint picker's identity (gateway.py).
    "InferencePool": "inferencepools",
    "ServiceAccount": "serviceaccounts",
    "Role": "roles",
    "RoleBinding": "rolebindings",
}


class KubeError(Exception):
    """An API call failed: carries the HTTP status, the server's reason and, when the answer
    was a Kubernetes Status, its machine reason (Forbidden, Invalid...) and message."""

    def __init__(self, status: int, reason: str, what: str, *, api_reason: str = "",
                 api_message: str = "") -> None:
        self.status = status
        self.reason = reason
        self.api_reason = api_reason
        self.api_message = api_message
        detail = f": {api_message}" if api_message else ""
        super().__init__(f"{what}: HTTP {status} {reason}{detail}")

    @property
    def message(self) -> str:
        """The server's message (a 403's says who may not do what, or which webhook
        refused); empty when the answer was no Status."""
        return self.api_message


def _status_of(body: Any) -> tuple[str, str]:
    """(reason, message) of a Kubernetes Status body; empty strings for anything else."""
    try:
        status = json.loads(body) if isinstance(body, str | bytes) else None
    except ValueError:
        return "", ""
    if not isinstance(status, dict) or status.get("kind") != "Status":
        return "", ""
    return str(status.get("reason") or "")[:64], str(status.get("message") or "")[:1024]


@dataclass(frozen=True)
class Ref:
    """Where an object lives: apiVersion, kind, namespace (None: cluster-scoped), name."""

    api_version: str
    kind: str
    namespace: str | None
    name: str

    @classmethod
    def of(cls, obj: Obj) -> Ref:
        meta = obj.get("metadata", {})
        return cls(obj["apiVersion"], obj["kind"], meta.get("namespace"), meta["name"])

    def __str__(self) -> str:
        where = f"{self.namespace}/" if self.namespace else ""
        return f"{self.kind} {where}{self.name}"


def collection_path(api_version: str, kind: str, namespace: str | None) -> str:
    prefix = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
    scope = f"/namespaces/{namespace}" if namespace else ""
    return f"{prefix}{scope}/{PLURALS[kind]}"


def object_path(ref: Ref, subresource: str | None = None) -> str:
    path = f"{collection_path(ref.api_version, ref.kind, ref.namespace)}/{ref.name}"
    return f"{path}/{subresource}" if subresource else path


class Kube:
    """Async CRUD over any resource; 404 reads as None/False, other errors raise KubeError."""

    def __init__(self, api: ApiClient | None = None, *, crd_ttl_s: float = 60.0) -> None:
        # Created on first use: Kopf's login (which configures the client) runs after the
        # operator's startup handlers, where this object is built.
        self._api = api
        self._crd_ttl_s = crd_ttl_s
        self._crds: dict[str, tuple[float, bool]] = {}
        self._crd_lock = asyncio.Lock()

    def _client(self) -> ApiClient:
        if self._api is None:
            self._api = ApiClient()
        return self._api

    async def close(self) -> None:
        if self._api is not None:
            await self._api.close()
            self._api = None

    async def _call(self, method: str, path: str, *, body: Any = None,
                    content_type: str = "application/json",
                    query: list[tuple[str, str]] | None = None) -> Obj:
        try:
            result = await self._client().call_api(
                path, method, query_params=query or [], body=body,
                header_params={"Accept": "application/json", "Content-Type": content_type},
                response_types_map={200: "object", 201: "object", 202: "object"},
                auth_settings=["BearerToken"], _return_http_data_only=True,
                _preload_content=True)
        except ApiException as err:
            api_reason, api_message = _status_of(err.body)
            raise KubeError(err.status or 0, str(err.reason), f"{method} {path}",
                            api_reason=api_reason, api_message=api_message) from None
        return result if isinstance(result, dict) else {}

    async def get(self, ref: Ref) -> Obj | None:
        try:
            return await self._call("GET", object_path(ref))
        except KubeError as err:
            if err.status == 404:
                return None
            raise

    async def list(self, api_version: str, kind: str, namespace: str | None = None, *,
                   labels: dict[str, str] | None = None) -> list[Obj]:
        """Every object of a kind (in a namespace, or cluster-wide when None) carrying
        `labels`. The selector goes to the server and is applied again here, because not
        every API (KMock's emulation among them) honours it."""
        query = [("labelSelector", ",".join(f"{k}={v}" for k, v in sorted(labels.items())))
                 ] if labels else []
        found = await self._call("GET", collection_path(api_version, kind, namespace),
                                 query=query)
        items = found.get("items") or []
        wanted = labels or {}
        # List items omit apiVersion/kind; put them back so Ref.of works on them.
        return [{"apiVersion": api_version, "kind": kind, **item} for item in items
                if all((item.get("metadata", {}).get("labels") or {}).get(k) == v
                       for k, v in wanted.items())]

    async def create(self, obj: Obj) -> Obj:
        ref = Ref.of(obj)
        return await self._call("POST", collection_path(ref.api_version, ref.kind,
                                                        ref.namespace), body=obj)

    async def patch(self, ref: Ref, patch: Obj, *, subresource: str | None = None) -> Obj:
        return await self._call("PATCH", object_path(ref, subresource), body=patch,
                                content_type=MERGE_PATCH)

    async def delete(self, ref: Ref) -> bool:
        """Delete with background propagation; False if it was already gone."""
        body = {"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Background"}
        try:
            await self._call("DELETE", object_path(ref), body=body)
        except KubeError as err:
            if err.status == 404:
                return False
            raise
        return True

    async def crd_exists(self, name: str) -> bool:
        """Whether a CustomResourceDefinition (e.g. podmonitors.monitoring.coreos.com) is
        installed: optional children are created only where their API exists. Remembered
        for a minute: every reconcile asks, and CRDs come and go rarely."""
        async with self._crd_lock:  # one request for a burst of reconciles, not one each
            now = time.monotonic()
            cached = self._crds.get(name)
            if cached is not None and now - cached[0] < self._crd_ttl_s:
                return cached[1]
            ref = Ref("apiextensions.k8s.io/v1", "CustomResourceDefinition", None, name)
            exists = await self.get(ref) is not None
            self._crds[name] = (now, exists)
            return exists
