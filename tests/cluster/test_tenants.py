"""A hostile (or careless) tenant on the real control plane (README, "Threat model"):

- a Service of the child's name that the user made is neither changed (its resourceVersion
  stays) nor adopted (no ownerReference, so the garbage collector leaves it when the endpoint
  goes);
- a permanent refusal by the API server (a ResourceQuota: 403 Forbidden) fails the endpoint
  with the API's reason and releases its GPUs (another team's endpoint gets them at once),
  and the operator retries with backoff, so lifting the quota is noticed;
- engine pods are hardened: no ServiceAccount token mounted, no privilege escalation, no
  capabilities, RuntimeDefault seccomp, admitted under Pod Security "baseline".
"""

from __future__ import annotations

import json
import time
from typing import Any

from tests.cluster.kube_helpers import (
    CHAT_WORKLOAD,
    chat_endpoint,
    h100_pool,
    items,
    phase_is,
    status,
    wait_for,
)
from tests.support.cluster import OperatorProcess
from trilemma.simfleet.cluster import LocalCluster


def _chat(namespace: str, pool: str) -> dict[str, Any]:
    # Looser than the usual chat at half its rate: the cheapest plan fits one GPU.
    return chat_endpoint(namespace, pool, workload={
        **CHAT_WORKLOAD, "arrivals": {"kind": "poisson", "requestsPerSecond": 1}},
        slo={"ttftMs": {"p90": 2000}, "tpotMs": {"p90": 60}})


def _condition(st: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in st.get("conditions", []) if c["type"] == kind), {})


def test_a_users_service_is_neither_changed_nor_adopted(
        cluster: LocalCluster, operator: OperatorProcess, namespace: str) -> None:
    cluster.apply([h100_pool("tenant-pool")])
    cluster.apply([{"apiVersion": "v1", "kind": "Service",
                    "metadata": {"name": "chat", "namespace": namespace},
                    "spec": {"selector": {"app": "my-own-chat"}, "ports": [{"port": 80}]}}])
    before = cluster.get("service", "chat", namespace)
    cluster.apply([_chat(namespace, "tenant-pool")])
    st = phase_is(cluster, namespace, "chat", "Failed", timeout_s=120)
    assert _condition(st, "Deployed")["reason"] == "Conflict", st
    assert f"Service {namespace}/chat exists and is not managed by trilemma" in st["message"]
    assert st.get("allocatedGpus", {}) == {}
    after = cluster.get("service", "chat", namespace)
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert "ownerReferences" not in after["metadata"]
    # What the endpoint did create (its Deployment, the plan) goes with it; the Service stays.
    cluster.kubectl("delete", "oe", "chat", "-n", namespace, "--wait=true", "--timeout=60s")
    wait_for(lambda: not items(cluster, "deployments", namespace), "the endpoint's Deployment "
             "gone", timeout_s=60)
    time.sleep(3)  # the garbage collector works asynchronously: give it a moment to misbehave
    assert cluster.get("service", "chat", namespace)["metadata"]["uid"] == \
        before["metadata"]["uid"]


def test_a_quota_refusal_fails_the_endpoint_frees_its_gpus_and_is_retried(
        cluster: LocalCluster, operator: OperatorProcess, namespace: str) -> None:
    # One GPU in the pool: whoever holds it decides whether the other endpoint can deploy.
    cluster.apply([h100_pool("one-gpu-pool", count=1)])
    quota = {"apiVersion": "v1", "kind": "ResourceQuota",
             "metadata": {"name": "no-deployments", "namespace": namespace},
             "spec": {"hard": {"count/deployments.apps": "0"}}}
    cluster.apply([quota])
    cluster.apply([_chat(namespace, "one-gpu-pool")])
    st = phase_is(cluster, namespace, "chat", "Failed", timeout_s=180)
    deployed = _condition(st, "Deployed")
    assert deployed["reason"] == "ApiForbidden", st
    assert "exceeded quota" in deployed["message"], deployed
    assert st.get("allocatedGpus", {}) == {}

    # Another team's endpoint gets the GPU the refused one would otherwise still hold.
    other = f"{namespace}-b"
    cluster.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {
        "name": other, "labels": {"pod-security.kubernetes.io/enforce": "baseline"}}}])
    try:
        cluster.apply([_chat(other, "one-gpu-pool")])
        ready = phase_is(cluster, other, "chat", "Ready", timeout_s=180)
        assert ready["allocatedGpus"] == {"h100_sxm": 1}
        _check_hardened_pods(cluster, other)

        # Lift the quota: the backoff's retry notices, and now the pool is the limit.
        cluster.kubectl("delete", "resourcequota", "no-deployments", "-n", namespace)
        st = wait_for(lambda: (s := status(cluster, namespace, "chat")).get("phase")
                      == "Infeasible" and s, "a retry after the quota was lifted",
                      timeout_s=150, explain=lambda: json.dumps(
                          status(cluster, namespace, "chat").get("conditions")))
        assert "PoolExhausted" in {c["reason"] for c in st["conditions"]}
    finally:
        cluster.kubectl("delete", "namespace", other, "--wait=false", check=False)


def _check_hardened_pods(cluster: LocalCluster, namespace: str) -> None:
    pods = items(cluster, "pods", namespace, "trilemma.dev/endpoint=chat")
    assert pods
    for pod in pods:
        spec = pod["spec"]
        assert spec["automountServiceAccountToken"] is False
        # The ServiceAccount admission plugin honoured it: no projected API token.
        assert not [v for v in spec.get("volumes", []) if v["name"].startswith("kube-api")]
        assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in spec["containers"]:
            assert container["securityContext"] == {
                "allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
