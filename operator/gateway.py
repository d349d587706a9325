"""An endpoint's Gateway API objects: its InferencePool and the endpoint picker (EPP) beside it.

The renderer (trilemma.optimizer.render, `gateway`) decides the objects; this module applies,
moves and removes them. The pool has the endpoint Service's stable name and selects what the
Service selects, so it moves to a new configuration exactly when the Service does. The picker
is labelled for the picker only (no endpoint label, no config hash): rollouts, which prune and
retarget by those labels, never touch it, and it keeps its in-memory prefix-cache index across
them. Everything is owned by the endpoint and goes with it.

Only where the InferencePool CRD is installed: without it the pool cannot be created and the
picker (which watches its pool) could not start, so neither is applied and the endpoint serves
through its Service as before; the caller reports why.
"""

from __future__ import annotations

import copy
from typing import Any

from trilemma.operator import apply as applying
from trilemma.operator import naming
from trilemma.operator.children import Children
from trilemma.operator.endpoint import Endpoint, owns
from trilemma.operator.kube import Kube, Ref
from trilemma.optimizer import render

Obj = dict[str, Any]
POOL_CRD = f"inferencepools.{render.gateway.POOL_GROUP}"
POOL_KIND = "InferencePool"
MISSING_CRD = (f"the InferencePool was not deployed: its CRD ({POOL_CRD}) is not installed; "
               "the endpoint serves through its Service")
# The kinds of the picker's objects (the renderer's epp_rbac, ConfigMap, Deployment, Service),
# found by its label when the endpoint goes.
PICKER_KINDS = (("v1", "ServiceAccount"), ("rbac.authorization.k8s.io/v1", "Role"),
                ("rbac.authorization.k8s.io/v1", "RoleBinding"), ("v1", "ConfigMap"),
                ("apps/v1", "Deployment"), ("v1", "Service"))


def pool_ref(ep: Endpoint) -> Ref:
    return Ref(render.gateway.POOL_API, POOL_KIND, ep.namespace, ep.name)


async def check_pool_name(kube: Kube, kids: Children) -> None:
    """Raises NotOwned when the pool's (stable, guessable) name is taken by an object that is
    not the endpoint's: found before anything is created, like the Services' conflicts."""
    if kids.pool is None or not await kube.crd_exists(POOL_CRD):
        return
    live = await kube.get(Ref.of(kids.pool))
    problem = applying.ownership_problem(live, kids.pool) if live is not None else None
    if problem is not None:
        raise applying.NotOwned(Ref.of(kids.pool), problem)


async def apply(kube: Kube, ep: Endpoint, kids: Children, *,
                selector: dict[str, str] | None = None) -> str:
    """Apply the picker, then the pool that references it; remove what the spec no longer
    asks for (the pool and picker once disabled, the picker once the spec names another).
    `selector`: what the endpoint Service selects now, while a rollout keeps it on the old
    configuration; the pool selects the same until the Service moves. Returns why nothing
    was applied ("" when it was, or when the spec asks for no pool)."""
    if kids.pool is None:
        # One read (a 404 without the CRD), and only when the spec changed or on resume.
        live = await kube.get(pool_ref(ep))
        if live is not None and owns(ep, live):
            await delete(kube, ep)
        return ""
    if not await kube.crd_exists(POOL_CRD):
        return MISSING_CRD
    for obj in kids.picker:
        await applying.apply(kube, obj)
    pool = kids.pool
    if selector is not None:
        pool = copy.deepcopy(pool)
        pool["spec"]["selector"] = {"matchLabels": dict(selector)}
    live = await kube.get(Ref.of(pool))
    await applying.apply(kube, pool, current=live)
    if not kids.picker and live is not None and _picker_of(live) != _picker_of(pool):
        # The pool now references a picker of the user's: the one deployed for it goes
        # (after the pool moved off it, so it never references a missing one).
        await _delete_picker(kube, ep)
    return ""


def _picker_of(pool: Obj) -> str | None:
    return (pool.get("spec", {}).get("endpointPickerRef") or {}).get("name")


# Retargeting and removal read the pool by name instead of asking whether the CRD exists: the
# API answers 404 without it too, and asking for every endpoint would cache "missing" for a
# minute, delaying the pool of an endpoint created just after the CRD was installed.


async def retarget(kube: Kube, ep: Endpoint, config_hash: str) -> None:
    """Point the endpoint's pool at `config_hash`, as the rollout does the Services' selectors."""
    live = await kube.get(pool_ref(ep))
    if live is None or not owns(ep, live):
        return
    await kube.patch(pool_ref(ep), render.gateway.retarget(live, config_hash))


async def delete(kube: Kube, ep: Endpoint) -> None:
    """Remove the endpoint's pool and picker: only objects it owns (a user's of the same
    name or label stays)."""
    live = await kube.get(pool_ref(ep))
    if live is not None and owns(ep, live):
        await kube.delete(pool_ref(ep))
    await _delete_picker(kube, ep)


async def _delete_picker(kube: Kube, ep: Endpoint) -> None:
    labels = {render.gateway.LABEL_PICKER_FOR: ep.name,
              "app.kubernetes.io/managed-by": naming.MANAGED_BY}
    for api_version, kind in PICKER_KINDS:
        for obj in await kube.list(api_version, kind, ep.namespace, labels=labels):
            if owns(ep, obj):
                await kube.delete(Ref.of(obj))
