"""Hashed rollouts on a real control plane: the Deployment controller, the scheduler and the
EndpointSlice controller do their own part, and the API server keeps what its schema declares.

- a spec change rolls a new configuration out beside the old one; the Service's endpoints move
  to the new pods; the old Deployment goes;
- a configuration that never becomes Available (its pods cannot be scheduled) is rolled back
  after the progress deadline while the old one keeps serving, even though the operator is
  killed in the middle of that rollout and started again;
- every status field the operator wrote reads back identical from the server (the audit log
  holds each status patch with the object stored after it): an undeclared field would be
  pruned silently;
- the chart's Argo CD health checks (lua5.1) read the objects the server holds: Healthy once
  the edited spec (generation 2, counted by the server) serves, Degraded after the rollback.
"""

from __future__ import annotations

from typing import Any

from tests.cluster.kube_helpers import (
    NO_PROMETHEUS,
    assert_status_writes_read_back,
    chat_endpoint,
    deployments,
    endpoint,
    endpoint_ips,
    h100_pool,
    phase_is,
    pod_ips,
    status,
    wait_for,
)
from tests.support.argocd import Health, health
from tests.support.cluster import OperatorProcess
from trilemma.simfleet.cluster import LocalCluster

# A pool whose GPUs no node has: its configurations schedule nowhere and never become Available.
# (Another GPU type, so that the plan's configuration hash changes: the hash covers the serving
# configuration, not the pool's node selector.)
GHOST_POOL = h100_pool("ghost-pool", count=8, gpu="b200_sxm", product="NVIDIA-B200")
POOL = h100_pool("h100-pool")


def chat(namespace: str) -> dict[str, Any]:
    return chat_endpoint(namespace, "h100-pool", rollout={"progressDeadlineSeconds": 60},
                         prometheus={"url": NO_PROMETHEUS})


def _explain(cluster: LocalCluster, ns: str) -> str:
    st = status(cluster, ns, "chat")
    return (f"phase {st.get('phase')}: {st.get('message')}; rollout {st.get('rollout')}; "
            f"Deployments {[d['metadata']['name'] for d in deployments(cluster, ns, 'chat')]}")


def _explain_service(cluster: LocalCluster, ns: str, config_hash: str) -> str:
    svc = cluster.get("service", "chat", ns)
    return (f"selector {svc['spec']['selector']}, endpoints {endpoint_ips(cluster, ns, 'chat')}"
            f", pods of {config_hash}: {pod_ips(cluster, ns, config_hash)}; slices: "
            f"{cluster.kubectl('get', 'endpointslices', '-n', ns, '-o', 'yaml').stdout}; pods: "
            f"{cluster.kubectl('get', 'pods', '-n', ns, '-o', 'wide').stdout}")


def _serving(cluster: LocalCluster, ns: str, config_hash: str) -> bool:
    """The Service selects `config_hash`, and its ready endpoints are exactly those pods."""
    svc = cluster.get("service", "chat", ns)
    ips = pod_ips(cluster, ns, config_hash)
    return (svc["spec"]["selector"].get("trilemma.dev/config-hash") == config_hash
            and bool(ips) and endpoint_ips(cluster, ns, "chat") == ips)


def test_rollout_moves_the_service_and_a_stuck_one_rolls_back_across_a_restart(
        cluster: LocalCluster, operator: OperatorProcess, namespace: str) -> None:
    ns = namespace
    cluster.apply([POOL, GHOST_POOL])
    cluster.apply([chat(ns)])
    first = phase_is(cluster, ns, "chat", "Ready")["activeConfiguration"]["hash"]
    wait_for(lambda: _serving(cluster, ns, first), "the Service's endpoints on the first pods",
             timeout_s=60)

    # Another model: a new configuration rolls out beside the old one.
    cluster.kubectl("patch", "oe", "chat", "-n", ns, "--type=merge", "-p",
                    '{"spec": {"model": {"id": "Qwen/Qwen3-8B"}}}')
    second = wait_for(lambda: (h := status(cluster, ns, "chat").get("servingHash")) not in (
        None, first) and h, "the second configuration serving", timeout_s=240,
        explain=lambda: str(status(cluster, ns, "chat").get("rollout")))
    wait_for(lambda: _serving(cluster, ns, second), "the Service's endpoints on the new pods",
             timeout_s=60)
    wait_for(lambda: [d["metadata"]["name"] for d in deployments(cluster, ns, "chat")]
             == [f"chat-{second}"], "the old Deployment removed", timeout_s=60)
    phase_is(cluster, ns, "chat", "Ready")
    ready = endpoint(cluster, ns, "chat")
    assert ready["status"]["observedGeneration"] == ready["metadata"]["generation"] == 2
    assert health(ready) == Health("Healthy", ready["status"]["message"])
    assert health(cluster.get("hardwarepool", "h100-pool")) == Health("Healthy",
                                                                      "offers 16 h100_sxm")

    # A pool nobody's nodes match: the new pods stay Pending. The operator dies mid-rollout and
    # comes back; the rollout still ends in a rollback at its deadline, and the second
    # configuration serves throughout.
    cluster.kubectl("patch", "oe", "chat", "-n", ns, "--type=merge", "-p",
                    '{"spec": {"hardwarePoolRef": {"name": "ghost-pool"}}}')
    stuck = wait_for(lambda: (r := status(cluster, ns, "chat").get("rollout") or {}).get(
        "state") == "Progressing" and r["toHash"], "a rollout to the ghost pool",
        explain=lambda: _explain(cluster, ns))
    assert _serving(cluster, ns, second)
    operator.stop(kill=True)
    operator.start()
    failed = wait_for(lambda: (r := status(cluster, ns, "chat").get("rollout") or {}).get(
        "state") == "Failed" and r, "the rollback", timeout_s=240,
        explain=lambda: str(status(cluster, ns, "chat").get("rollout")))
    assert failed["toHash"] == stuck
    st = status(cluster, ns, "chat")
    assert st["servingHash"] == second
    wait_for(lambda: _serving(cluster, ns, second), "the Service still on the second pods",
             timeout_s=30, explain=lambda: _explain_service(cluster, ns, second))
    names = [d["metadata"]["name"] for d in deployments(cluster, ns, "chat")]
    assert names == [f"chat-{second}"], names
    # The GPUs held are the configuration still serving, nothing more and nothing less.
    assert st["allocatedGpus"] == {"h100_sxm": st["activeConfiguration"]["gpus"]}
    assert operator.problems() == [], operator.problems()
    rolled_back = endpoint(cluster, ns, "chat")
    assert [c["type"] for c in rolled_back["status"]["conditions"]
            if c["status"] == "True" and c["type"] in ("Reconciling", "Stalled")] == ["Stalled"]
    assert health(rolled_back).status == "Degraded"

    assert_status_writes_read_back(cluster)


def test_a_restart_in_the_middle_of_a_search_plans_once_and_deploys_once(
        cluster: LocalCluster, operator: OperatorProcess, namespace: str) -> None:
    """SIGKILL while the first search runs: the next operator searches again (nothing was
    stored), deploys one configuration, and holds its GPUs once."""
    ns = namespace
    cluster.apply([POOL])
    body = chat(ns)
    body["spec"]["model"] = {"id": "meta-llama/Llama-3.1-70B"}  # a search of a few seconds
    cluster.apply([body])
    wait_for(lambda: endpoint_exists(cluster, ns), "the endpoint stored", timeout_s=30)
    operator.stop(kill=True)
    assert deployments(cluster, ns, "chat") == []  # killed before it deployed anything
    operator.start()
    st = phase_is(cluster, ns, "chat", "Ready", timeout_s=240)
    deps = deployments(cluster, ns, "chat")
    assert [d["metadata"]["name"] for d in deps] == [f"chat-{st['activeConfiguration']['hash']}"]
    assert st["allocatedGpus"] == {"h100_sxm": st["activeConfiguration"]["gpus"]}


def endpoint_exists(cluster: LocalCluster, ns: str) -> bool:
    return cluster.kubectl("get", "oe", "chat", "-n", ns, check=False).returncode == 0
