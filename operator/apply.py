"""Create-or-patch of rendered children, idempotent against server-side defaults.

Each child carries the hash of the object the operator last applied (an annotation). Same
hash: nothing is sent, however the API server filled in defaults. Different hash: one merge
patch carries the whole desired state, so a Deployment never holds half a change. An object of
the child's name that is not the endpoint's child (a user's Service, another endpoint's) is
never patched or adopted: `apply` raises NotOwned and the reconciler reports the conflict.
"""

from __future__ import annotations

import hashlib
from enum import Enum
from typing import Any

from trilemma.operator import naming
from trilemma.operator.kube import Kube, KubeError, Ref
from trilemma.optimizer.search import canonical_json

Obj = dict[str, Any]
ANNOTATION_APPLIED = f"{naming.GROUP}/applied-hash"
# Maps the operator owns outright: keys it dropped must go from the live object too (a merge
# patch would otherwise keep them). Everything else is merged, leaving other writers' keys.
_OWNED_MAPS = (("spec", "template", "spec", "nodeSelector"), ("spec", "selector"), ("data",))


class NotOwned(Exception):
    """A live object has the child's name but is not this endpoint's child: a user's object
    (or another endpoint's) that the operator must neither change nor adopt."""

    def __init__(self, ref: Ref, why: str) -> None:
        self.ref = ref
        self.why = why
        super().__init__(f"{ref} exists and {why}")


def owner_problem(live: Obj, owner: Obj | None) -> str | None:
    """Why `live` is not a child of `owner` (an ownerReference; None: of no one in
    particular), or None when it is: a child carries the operator's managed-by label and a
    controller reference to its owner's uid. The one ownership test: apply() makes it before
    writing, and the reconciler before reading a stored plan or deleting anything."""
    meta = live.get("metadata") or {}
    labels = meta.get("labels") or {}
    if labels.get("app.kubernetes.io/managed-by") != naming.MANAGED_BY:
        return "is not managed by trilemma (no app.kubernetes.io/managed-by: trilemma label)"
    if owner is None:
        return None
    refs = meta.get("ownerReferences") or []
    if not any(r.get("uid") == owner["uid"] and r.get("controller") for r in refs):
        return f"is not owned by {owner['kind']} {owner['name']} (uid {owner['uid']})"
    return None


def ownership_problem(live: Obj, desired: Obj) -> str | None:
    """Why `live` is not the child `desired` describes (None: it is)."""
    owner = next((r for r in desired["metadata"].get("ownerReferences") or []
                  if r.get("controller")), None)
    return owner_problem(live, owner)


class Applied(Enum):
    CREATED = "created"
    PATCHED = "patched"
    UNCHANGED = "unchanged"


def applied_hash(obj: Obj) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:16]


def with_hash(obj: Obj) -> Obj:
    """`obj` annotated with the hash of itself (computed before the annotation is added)."""
    digest = applied_hash(obj)
    meta = dict(obj["metadata"])
    meta["annotations"] = {**meta.get("annotations", {}), ANNOTATION_APPLIED: digest}
    return {**obj, "metadata": meta}


def without_hash(obj: Obj) -> Obj:
    """`obj` as if the operator had never applied it: the next `apply` writes it whole, even
    when the desired object is what was last applied (the live one was changed since)."""
    meta = dict(obj.get("metadata") or {})
    notes = {k: v for k, v in (meta.get("annotations") or {}).items() if k != ANNOTATION_APPLIED}
    return {**obj, "metadata": {**meta, "annotations": notes}}


def _dig(obj: Obj, path: tuple[str, ...]) -> Any:
    node: Any = obj
    for part in path:
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def _set(obj: Obj, path: tuple[str, ...], value: Any) -> None:
    for part in path[:-1]:
        obj = obj.setdefault(part, {})
    obj[path[-1]] = value


def update_patch(current: Obj, desired: Obj) -> Obj:
    """The merge patch taking `current` to `desired`: desired's metadata and body, plus nulls
    for keys of the owned maps that desired no longer has."""
    patch: Obj = {"metadata": {k: desired["metadata"][k]
                               for k in ("labels", "annotations", "ownerReferences")
                               if k in desired["metadata"]}}
    for key, value in desired.items():
        if key not in ("apiVersion", "kind", "metadata", "status"):
            patch[key] = value
    for path in _OWNED_MAPS:
        live, wanted = _dig(current, path), _dig(desired, path)
        if isinstance(live, dict):
            gone = {k: None for k in live if not isinstance(wanted, dict) or k not in wanted}
            if gone:
                _set(patch, path, {**(wanted or {}), **gone})
    return patch


# `current` not given: read the live object first.
_UNKNOWN: Any = object()


async def apply(kube: Kube, desired: Obj, *, current: Obj | None = _UNKNOWN) -> Applied:
    """Make the live object match `desired` (rendered, without the hash annotation).
    `current`: the live object when the caller has just read it; None when the caller has
    reason to think it absent (a new endpoint's children): it is then created without a read,
    and read only if the server answers 409 AlreadyExists."""
    obj = with_hash(desired)
    ref = Ref.of(obj)
    if current is _UNKNOWN:
        current = await kube.get(ref)
    if current is None:
        try:
            await kube.create(obj)
            return Applied.CREATED
        except KubeError as err:
            if err.status != 409:
                raise
        # It exists after all (created since it was read, or by a run cut short before it
        # recorded anything, or a user's object of that name): go on as for any live object.
        current = await kube.get(ref)
        if current is None:  # deleted again meanwhile: a transient conflict, retried
            raise KubeError(409, "Conflict", f"create {ref}: exists, then gone")
    problem = ownership_problem(current, obj)
    if problem is not None:
        raise NotOwned(ref, problem)
    live = (current.get("metadata", {}).get("annotations") or {}).get(ANNOTATION_APPLIED)
    if live == obj["metadata"]["annotations"][ANNOTATION_APPLIED]:
        return Applied.UNCHANGED
    await kube.patch(ref, update_patch(current, obj))
    return Applied.PATCHED


def is_available(workload: Obj) -> bool:
    """All replicas of a Deployment available, or all groups of a LeaderWorkerSet ready."""
    want = int(workload.get("spec", {}).get("replicas", 1) or 0)
    status = workload.get("status") or {}
    if workload.get("kind") == "LeaderWorkerSet":
        have = int(status.get("readyReplicas") or 0)
    else:
        have = int(status.get("availableReplicas") or 0)
    return want > 0 and have >= want


def is_serving(workload: Obj) -> bool:
    """At least one replica available (a scaled workload whose new replicas are still loading
    serves with the others: that is no rollout, and no loss of readiness)."""
    status = workload.get("status") or {}
    key = "readyReplicas" if workload.get("kind") == "LeaderWorkerSet" else "availableReplicas"
    return int(status.get(key) or 0) >= 1


def config_hash_of(obj: Obj) -> str | None:
    return (obj.get("metadata", {}).get("labels") or {}).get(naming.LABEL_CONFIG_HASH)
