"""apply(): create-or-patch of a rendered child, and what it sends for each case.

An in-memory store stands in for the API server with its answers for these verbs (404 on a
missing read, 409 AlreadyExists on a create of an existing name), so each test can count the
requests: the operator's request budget per endpoint is part of its contract (the cluster
benchmark counts them in the audit log).
"""

from __future__ import annotations

from typing import Any

import pytest

from trilemma.operator import apply as applying
from trilemma.operator.kube import KubeError, Ref

Obj = dict[str, Any]


class Store:
    """get/create/patch over a dict, logging each request as (verb, name)."""

    def __init__(self, *objs: Obj) -> None:
        self.objects = {Ref.of(o): o for o in objs}
        self.requests: list[tuple[str, str]] = []
        self.vanish_on_conflict = False

    async def get(self, ref: Ref) -> Obj | None:
        self.requests.append(("get", ref.name))
        return self.objects.get(ref)

    async def create(self, obj: Obj) -> Obj:
        ref = Ref.of(obj)
        self.requests.append(("create", ref.name))
        if ref in self.objects:
            if self.vanish_on_conflict:  # deleted right after the conflict
                del self.objects[ref]
            raise KubeError(409, "AlreadyExists", f"POST {ref}")
        self.objects[ref] = obj
        return obj

    async def patch(self, ref: Ref, patch: Obj, *, subresource: str | None = None) -> Obj:
        self.requests.append(("patch", ref.name))
        merged = {**self.objects[ref], **{k: v for k, v in patch.items() if k != "metadata"}}
        merged["metadata"] = {**self.objects[ref]["metadata"], **patch["metadata"]}
        self.objects[ref] = merged
        return merged


OWNER = {"apiVersion": "trilemma.dev/v1alpha1", "kind": "OptimizedEndpoint", "name": "ep",
         "uid": "u1", "controller": True, "blockOwnerDeletion": True}


def config_map(data: dict[str, str], *, owner: Obj | None = OWNER,
               managed: bool = True) -> Obj:
    """A child as rendered: the operator's label and a controller reference to its endpoint."""
    meta: Obj = {"name": "ep-plan", "namespace": "ns"}
    if managed:
        meta["labels"] = {"app.kubernetes.io/managed-by": "trilemma"}
    if owner is not None:
        meta["ownerReferences"] = [owner]
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}


@pytest.mark.parametrize(("live", "why"), [
    (config_map({"theirs": "1"}, owner=None, managed=False), "not managed by trilemma"),
    (config_map({"theirs": "1"}, owner={**OWNER, "uid": "someone-else"}),
     "not owned by OptimizedEndpoint ep (uid u1)"),
])
@pytest.mark.parametrize("current", ["unknown", "believed absent"])
async def test_an_object_it_does_not_own_is_never_changed(live: Obj, why: str,
                                                          current: str) -> None:
    store = Store(live)
    kwargs = {} if current == "unknown" else {"current": None}
    with pytest.raises(applying.NotOwned) as caught:
        await applying.apply(store, config_map({"a": "1"}), **kwargs)
    assert why in str(caught.value)
    assert "patch" not in {verb for verb, _ in store.requests}
    assert store.objects[Ref.of(live)] is live


async def test_unknown_state_reads_first_then_creates() -> None:
    store = Store()
    assert await applying.apply(store, config_map({"a": "1"})) is applying.Applied.CREATED
    assert store.requests == [("get", "ep-plan"), ("create", "ep-plan")]


async def test_believed_absent_creates_without_a_read() -> None:
    store = Store()
    result = await applying.apply(store, config_map({"a": "1"}), current=None)
    assert result is applying.Applied.CREATED
    assert store.requests == [("create", "ep-plan")]


async def test_believed_absent_but_there_reads_on_409_and_patches() -> None:
    live = applying.with_hash(config_map({"a": "old"}))
    store = Store(live)
    result = await applying.apply(store, config_map({"a": "new"}), current=None)
    assert result is applying.Applied.PATCHED
    assert store.requests == [("create", "ep-plan"), ("get", "ep-plan"), ("patch", "ep-plan")]
    assert store.objects[Ref.of(live)]["data"] == {"a": "new"}


async def test_believed_absent_but_there_and_up_to_date_is_left_alone() -> None:
    store = Store(applying.with_hash(config_map({"a": "1"})))
    result = await applying.apply(store, config_map({"a": "1"}), current=None)
    assert result is applying.Applied.UNCHANGED
    assert store.requests == [("create", "ep-plan"), ("get", "ep-plan")]


async def test_a_conflict_whose_object_is_gone_again_is_a_transient_conflict() -> None:
    store = Store(config_map({"a": "old"}))
    store.vanish_on_conflict = True
    with pytest.raises(KubeError) as err:
        await applying.apply(store, config_map({"a": "new"}), current=None)
    assert err.value.status == 409  # reconcile.is_transient: Kopf retries soon


async def test_other_create_errors_are_raised_as_they_are() -> None:
    class Refusing(Store):
        async def create(self, obj: Obj) -> Obj:
            raise KubeError(403, "Forbidden", "POST configmaps")

    with pytest.raises(KubeError) as err:
        await applying.apply(Refusing(), config_map({"a": "1"}), current=None)
    assert err.value.status == 403
