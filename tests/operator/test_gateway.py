"""spec.gateway.inferencePool: the endpoint gets an InferencePool (beside its Service, moved
with it on rollout) and an endpoint picker (kept across rollouts, removed with the endpoint);
without the InferencePool CRD, it serves through its Service, says why there is no pool, and
gets it once the CRD is installed."""

from __future__ import annotations

import kmock

from tests.operator.test_reconcile import (
    NS,
    POOL,
    condition,
    endpoint,
    make_available,
    start_rollout,
    status,
    wait_phase,
)
from tests.support.kube import Api

POOL_API = "inference.networking.k8s.io/v1"
GATEWAY = {"inferencePool": {"enabled": True}}
PICKER = (("v1", "ServiceAccount"), ("rbac.authorization.k8s.io/v1", "Role"),
          ("rbac.authorization.k8s.io/v1", "RoleBinding"), ("v1", "ConfigMap"),
          ("apps/v1", "Deployment"), ("v1", "Service"))


async def install_pool_crd(api: Api) -> None:
    api.server.resources[f"{POOL_API}/inferencepools"] = kmock.ResourceInfo(
        kind="InferencePool", namespaced=True,
        verbs={"get", "list", "watch", "create", "patch", "delete"})
    await api.create({"apiVersion": "apiextensions.k8s.io/v1",
                      "kind": "CustomResourceDefinition",
                      "metadata": {"name": "inferencepools.inference.networking.k8s.io"},
                      "spec": {"group": "inference.networking.k8s.io"}})


async def start_with_pool(api: Api, operator_factory) -> None:
    """The CRD installed, the operator started, an endpoint asking for a pool created."""
    await install_pool_crd(api)
    await operator_factory()
    await api.create(POOL)
    await api.create(endpoint(gateway=GATEWAY))


def pool_selector(api: Api) -> dict:
    return api.get(POOL_API, "InferencePool", NS, "chat")["spec"]["selector"]["matchLabels"]


def picker(api: Api) -> dict[str, dict]:
    """The picker's objects, by kind."""
    found = {kind: api.get(version, kind, NS, "chat-epp") for version, kind in PICKER}
    return {kind: obj for kind, obj in found.items() if obj is not None}


async def test_the_pool_follows_the_service_and_the_picker_outlives_rollouts(
        api, operator_factory):
    await start_with_pool(api, operator_factory)
    old = (await wait_phase(api, "Deploying"))["activeConfiguration"]["hash"]
    pool = await api.wait(lambda: api.get(POOL_API, "InferencePool", NS, "chat"),
                          what="the InferencePool")
    service = api.get("v1", "Service", NS, "chat")
    assert pool_selector(api) == service["spec"]["selector"]
    assert pool_selector(api)["trilemma.dev/config-hash"] == old
    assert pool["spec"]["endpointPickerRef"]["name"] == "chat-epp"
    assert pool["spec"]["endpointPickerRef"]["failureMode"] == "FailOpen"
    assert pool["metadata"]["ownerReferences"][0]["uid"] == "uid-chat"
    first = await api.wait(lambda: len(picker(api)) == len(PICKER) and picker(api),
                           what="the endpoint picker")
    for obj in first.values():
        assert obj["metadata"]["ownerReferences"][0]["uid"] == "uid-chat"
        assert "trilemma.dev/endpoint" not in obj["metadata"]["labels"]
    binding = first["RoleBinding"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "chat-epp",
                                    "namespace": NS}]

    await make_available(api, api.get("apps/v1", "Deployment", NS, f"chat-{old}"))
    await wait_phase(api, "Ready")
    new = (await start_rollout(api))["rollout"]["toHash"]
    # Until the new configuration is available, the pool stays with the Service on the old.
    assert pool_selector(api)["trilemma.dev/config-hash"] == old

    await make_available(api, api.get("apps/v1", "Deployment", NS, f"chat-{new}"))
    await wait_phase(api, "Ready")
    await api.wait(lambda: pool_selector(api)["trilemma.dev/config-hash"] == new,
                   what="the pool moved to the new configuration")
    assert pool_selector(api) == api.get("v1", "Service", NS, "chat")["spec"]["selector"]
    # The old configuration's workloads are pruned; the picker was never deleted or changed.
    names = {d["metadata"]["name"] for d in api.list("apps/v1", "Deployment", NS)}
    assert names == {f"chat-{new}", "chat-epp"}
    assert [str(r.url) for r in api.server["delete"] if "chat-epp" in str(r.url)] == []
    assert picker(api) == first

    await api.delete("trilemma.dev/v1alpha1", "OptimizedEndpoint", NS, "chat")
    await api.wait(lambda: api.get("trilemma.dev/v1alpha1", "OptimizedEndpoint", NS, "chat")
                   is None, what="the endpoint gone")
    assert api.get(POOL_API, "InferencePool", NS, "chat") is None
    assert picker(api) == {}


async def test_a_named_picker_is_referenced_not_deployed(api, operator_factory):
    await install_pool_crd(api)
    await operator_factory()
    await api.create(POOL)
    await api.create(endpoint(gateway={"inferencePool": {
        "enabled": True, "endpointPicker": "shared-epp", "failureMode": "FailClose"}}))
    pool = await api.wait(lambda: api.get(POOL_API, "InferencePool", NS, "chat"),
                          what="the InferencePool")
    assert pool["spec"]["endpointPickerRef"]["name"] == "shared-epp"
    assert pool["spec"]["endpointPickerRef"]["failureMode"] == "FailClose"
    assert picker(api) == {}


async def test_without_the_crd_the_endpoint_serves_says_why_and_gets_the_pool_later(
        api, operator_factory):
    op = await operator_factory()
    await api.create(POOL)
    await api.create(endpoint(gateway=GATEWAY))
    st = await wait_phase(api, "Deploying")
    assert "CRD (inferencepools.inference.networking.k8s.io) is not installed" in condition(
        st, "Deployed")["message"]
    assert api.get("v1", "Service", NS, "chat") is not None
    assert picker(api) == {}
    await api.wait(lambda: "InferencePoolCRDMissing" in {
        e.get("reason") for e in api.events(NS)}, what="the Warning Event")

    # The CRD is installed later; once the operator's minute-long memory of its absence
    # lapses (cleared here), the resync reconciles the endpoint and the pool appears.
    await install_pool_crd(api)
    op.runtime.kube._crds.clear()
    await api.wait(lambda: api.get(POOL_API, "InferencePool", NS, "chat"), timeout=30,
                   what="the InferencePool, after the CRD")
    await api.wait(lambda: len(picker(api)) == len(PICKER), what="the endpoint picker")
    await api.wait(lambda: "not installed" not in condition(status(api), "Deployed")["message"],
                   what="the Deployed condition without the note")


async def test_naming_a_picker_then_disabling_removes_what_is_no_longer_asked_for(
        api, operator_factory):
    await start_with_pool(api, operator_factory)
    await api.wait(lambda: len(picker(api)) == len(PICKER), what="the endpoint picker")

    await api.patch("trilemma.dev/v1alpha1", "OptimizedEndpoint", NS, "chat", {"spec": {
        "gateway": {"inferencePool": {"enabled": True, "endpointPicker": "shared-epp"}}}})
    await api.wait(lambda: picker(api) == {}, what="the deployed picker removed")
    assert api.get(POOL_API, "InferencePool", NS, "chat")["spec"]["endpointPickerRef"][
        "name"] == "shared-epp"

    await api.patch("trilemma.dev/v1alpha1", "OptimizedEndpoint", NS, "chat",
                    {"spec": {"gateway": None}})
    await api.wait(lambda: api.get(POOL_API, "InferencePool", NS, "chat") is None,
                   what="the pool removed")
    assert api.get("v1", "Service", NS, "chat") is not None
