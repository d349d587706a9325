"""A rollout sized to the room beside the serving configuration, on a real control plane.

Both configurations hold GPUs while the new one rolls out (the old one serves until the new
one is available). Here the new layout wants more replicas than fit beside the old one on the
pool's 16 GPUs: it starts with what fits, the kube-scheduler places every one of those pods
(none stays Pending into the progress deadline), the Service moves, the old Deployment goes,
and the new Deployment grows to the count it wanted. Without the sizing, the new pods beyond
the room would wait unschedulable until the rollout's deadline rolled it back.
"""

from __future__ import annotations

import json
from typing import Any

from tests.cluster.kube_helpers import (
    CHAT_WORKLOAD,
    NO_PROMETHEUS,
    chat_endpoint,
    deployments,
    h100_pool,
    phase_is,
    status,
    wait_for,
)
from tests.support.cluster import OperatorProcess
from trilemma.simfleet.cluster import GPU_TAINT, LocalCluster, NodeGroup

# Nodes of this scenario's own (two 8-GPU fake H100s under another product label): the pool is
# exactly what the scheduler can place, whatever earlier scenarios' pods still hold elsewhere.
PRODUCT = "NVIDIA-H100-ROOM"
NODES = NodeGroup("room", 2, 8, {"nvidia.com/gpu.product": PRODUCT}, (GPU_TAINT,))
POOL = h100_pool("room-pool", count=16, product=PRODUCT)
LONG = {"kind": "lognormal", "mean": 4000, "p90": 8000}


def _ready_nodes(cluster: LocalCluster) -> int:
    nodes = cluster.get("nodes")["items"]
    return sum(1 for n in nodes if n["metadata"]["name"].startswith("room-")
               for c in (n.get("status") or {}).get("conditions") or []
               if c["type"] == "Ready" and c["status"] == "True")


def _pending(cluster: LocalCluster, ns: str) -> list[str]:
    pods = json.loads(cluster.kubectl("get", "pods", "-n", ns, "-o", "json").stdout)["items"]
    return [p["metadata"]["name"] for p in pods if p["status"].get("phase") == "Pending"
            and any(c.get("reason") == "Unschedulable"
                    for c in p["status"].get("conditions", []))]


def _replicas(cluster: LocalCluster, ns: str, config_hash: str) -> int:
    found = [d for d in deployments(cluster, ns, "chat")
             if d["metadata"]["name"] == f"chat-{config_hash}"]
    return int(found[0]["spec"]["replicas"]) if found else 0


def _stored_statuses(cluster: LocalCluster, ns: str) -> list[dict[str, Any]]:
    """The endpoint's status as the server stored it after each of the operator's writes."""
    return [(e.get("responseObject") or {}).get("status") or {} for e in cluster.audit()
            if e.get("verb") == "patch" and e["objectRef"].get("subresource") == "status"
            and e["objectRef"].get("resource") == "optimizedendpoints"
            and e["objectRef"].get("namespace") == ns
            and e.get("responseStatus", {}).get("code") == 200]


def _chat(ns: str, rate: float, prompts: dict[str, Any]) -> dict[str, Any]:
    workload = {**CHAT_WORKLOAD, "promptTokens": prompts,
                "arrivals": {"kind": "poisson", "requestsPerSecond": rate}}
    return chat_endpoint(ns, "room-pool", workload=workload,
                         rollout={"progressDeadlineSeconds": 120},
                         prometheus={"url": NO_PROMETHEUS})


def test_a_rollout_starts_with_what_fits_beside_and_grows_after_the_cutover(
        cluster: LocalCluster, operator: OperatorProcess, namespace: str) -> None:
    ns = namespace
    cluster.apply(NODES.manifests())
    wait_for(lambda: _ready_nodes(cluster) == NODES.count, "the scenario's nodes Ready")
    cluster.apply([POOL])
    cluster.apply([_chat(ns, 120.0, CHAT_WORKLOAD["promptTokens"])])
    first = phase_is(cluster, ns, "chat", "Ready")
    old, held = first["activeConfiguration"]["hash"], first["allocatedGpus"]["h100_sxm"]

    # Prompts four times longer at the same rate: a new layout of slower replicas.
    cluster.apply([_chat(ns, 120.0, LONG)])
    new = wait_for(lambda: (h := status(cluster, ns, "chat").get("servingHash")) not in (
        None, old) and h, "the Service on the new configuration", timeout_s=180,
        explain=lambda: f"{status(cluster, ns, 'chat').get('rollout')}; unschedulable: "
                        f"{_pending(cluster, ns)}")
    # The rollout may pass faster than a poll (kwok readies pods at once): the status the
    # server stored while it ran is in the audit log.
    rolling = [s for s in _stored_statuses(cluster, ns)
               if (s.get("rollout") or {}).get("state") == "Progressing"
               and s["rollout"].get("toHash") == new]
    assert rolling, "a rollout beside the old configuration"
    scaling = rolling[-1]["scaling"]
    assert scaling["heldBackBeside"] == old, scaling
    assert scaling["replicas"] == 16 - held, scaling
    assert sum(rolling[-1]["allocatedGpus"].values()) == 16

    wait_for(lambda: [d["metadata"]["name"] for d in deployments(cluster, ns, "chat")]
             == [f"chat-{new}"], "the old Deployment removed", timeout_s=60)
    grown = wait_for(lambda: (n := _replicas(cluster, ns, new)) > 16 - held and n,
                     "the count grown once the old configuration is gone", timeout_s=90,
                     explain=lambda: str(status(cluster, ns, "chat").get("scaling")))
    done = wait_for(lambda: (s := phase_is(cluster, ns, "chat", "Ready"))["scaling"][
        "replicas"] == grown and s, "Ready at the grown count", timeout_s=120)
    assert "heldBackBeside" not in done["scaling"]
    assert done["allocatedGpus"] == {"h100_sxm": grown} and grown <= 16
    assert done["rollout"]["state"] == "Complete"
    assert _pending(cluster, ns) == []
    assert operator.problems() == [], operator.problems()
