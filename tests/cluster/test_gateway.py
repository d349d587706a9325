"""spec.gateway.inferencePool on the real control plane: with the upstream InferencePool CRD
(gateway-api-inference-extension v1.5.0, the schema the API server validates the pool
against) installed, the operator, running as the chart's ServiceAccount, creates the pool
selecting what the endpoint Service selects and the endpoint picker (its Role and RoleBinding
pass RBAC's escalation check only because the operator holds what the Role grants); deleting
the endpoint removes them all.
"""

from __future__ import annotations

from tests.cluster.kube_helpers import (
    CHAT_WORKLOAD,
    ROOT,
    chat_endpoint,
    h100_pool,
    items,
    phase_is,
    wait_for,
)
from tests.support.cluster import OperatorProcess
from trilemma.simfleet.cluster import LocalCluster

CRD = "inferencepools.inference.networking.k8s.io"
CRD_FILE = (ROOT / "tests" / "data" / "gateway-api-inference-extension"
            / "inference.networking.k8s.io_inferencepools.yaml")
PICKER_KINDS = ("serviceaccounts", "roles", "rolebindings", "configmaps", "deployments",
                "services")
PICKER = "trilemma.dev/endpoint-picker=chat"


def _pool(cluster: LocalCluster, namespace: str) -> dict:
    found = items(cluster, "inferencepools.inference.networking.k8s.io", namespace)
    return found[0] if found else {}


def _picker(cluster: LocalCluster, namespace: str) -> dict[str, list[str]]:
    return {kind: names for kind in PICKER_KINDS
            if (names := [o["metadata"]["name"] for o in items(cluster, kind, namespace,
                                                               PICKER)])}


def test_the_inference_pool_and_its_picker_are_deployed_and_removed(
        cluster: LocalCluster, operator: OperatorProcess, namespace: str) -> None:
    cluster.kubectl("apply", "--server-side", "-f", str(CRD_FILE))
    cluster.wait_established(CRD)
    cluster.apply([h100_pool("gateway-pool")])
    cluster.apply([chat_endpoint(
        namespace, "gateway-pool",
        workload={**CHAT_WORKLOAD, "arrivals": {"kind": "poisson", "requestsPerSecond": 1}},
        slo={"ttftMs": {"p90": 2000}, "tpotMs": {"p90": 60}},
        gateway={"inferencePool": {"enabled": True}})])
    st = phase_is(cluster, namespace, "chat", "Deploying", "Ready", timeout_s=180)
    target = st["activeConfiguration"]["hash"]

    # Accepted by the API server, so valid against the upstream schema.
    pool = wait_for(lambda: _pool(cluster, namespace), "the InferencePool", timeout_s=120)
    service = cluster.get("service", "chat", namespace)
    assert pool["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert pool["spec"]["selector"]["matchLabels"]["trilemma.dev/config-hash"] == target
    assert pool["spec"]["endpointPickerRef"]["name"] == "chat-epp"
    assert pool["metadata"]["ownerReferences"][0]["kind"] == "OptimizedEndpoint"
    picker = wait_for(lambda: len(found := _picker(cluster, namespace)) == len(PICKER_KINDS)
                      and found, "the endpoint picker", timeout_s=60,
                      explain=lambda: str(_picker(cluster, namespace)))
    assert all(names == ["chat-epp"] for names in picker.values()), picker
    role = cluster.get("role", "chat-epp", namespace)
    assert {r for rule in role["rules"] for r in rule["resources"]} >= {"pods", "inferencepools"}

    cluster.kubectl("delete", "oe", "chat", "-n", namespace, "--wait=true", "--timeout=60s")
    wait_for(lambda: not _pool(cluster, namespace) and not _picker(cluster, namespace),
             "the pool and the picker gone", timeout_s=60,
             explain=lambda: f"{_pool(cluster, namespace)} {_picker(cluster, namespace)}")
