"""Replicas owned by an autoscaler: the scale subresource on the real API server, `kubectl
scale`, and a real HorizontalPodAutoscaler (kube-controller-manager's) driving an endpoint whose
replicas.owner is external, while the operator follows and never writes the count back.
"""

from __future__ import annotations

import json
import time

import yaml

from tests.cluster.kube_helpers import (
    NO_PROMETHEUS,
    chat_endpoint,
    deployments,
    endpoint,
    h100_pool,
    items,
    phase_is,
    status,
    wait_for,
)
from tests.support.cluster import OPERATOR_NS
from trilemma.simfleet.cluster import LocalCluster


def _serving_replicas(cluster: LocalCluster, ns: str) -> list[int]:
    return sorted(d["spec"]["replicas"] for d in deployments(cluster, ns, "chat"))


def _spec_writes_by_operator(cluster: LocalCluster, ns: str) -> list[str]:
    """Writes by the operator's ServiceAccount that could touch the endpoint's spec: to
    /scale, or to the object itself with a spec in the body (Kopf's own annotation and
    finalizer patches carry none)."""
    operator_user = f"system:serviceaccount:{OPERATOR_NS}:"
    found = []
    for e in cluster.audit():
        ref = e.get("objectRef") or {}
        if (ref.get("resource") != "optimizedendpoints" or ref.get("namespace") != ns
                or not e["user"]["username"].startswith(operator_user)
                or e.get("verb") not in ("update", "patch")):
            continue
        sub = ref.get("subresource")
        if sub == "scale" or (sub is None and "spec" in (e.get("requestObject") or {})):
            found.append(f"{e['verb']} {sub or 'object'}")
    return found


def test_an_hpa_owns_the_count_and_the_operator_follows_without_fighting(
        cluster: LocalCluster, operator: object, namespace: str) -> None:
    ns = namespace
    cluster.apply([h100_pool("scaling-pool")])
    cluster.apply([chat_endpoint(ns, "scaling-pool", prometheus={"url": NO_PROMETHEUS},
                                 replicas={"owner": "external", "count": 2})])
    phase_is(cluster, ns, "chat", "Ready")
    assert _serving_replicas(cluster, ns) == [2]
    st = status(cluster, ns, "chat")
    assert st["replicas"] == 2 and st["scaling"]["owner"] == "external"
    assert st["scaling"]["replicaCapacityRps"] > 0
    # The scale subresource, as HPA and KEDA read it: the count and the serving pods.
    scale = cluster.kubectl("get", "--raw", f"/apis/trilemma.dev/v1alpha1/namespaces/{ns}/"
                            "optimizedendpoints/chat/scale")
    got = yaml.safe_load(scale.stdout)
    assert got["spec"]["replicas"] == 2 and got["status"]["replicas"] == 2
    assert "trilemma.dev/endpoint=chat" in got["status"]["selector"]
    pods = items(cluster, "pods", ns, got["status"]["selector"])
    assert len(pods) == 2

    # kubectl scale writes spec.replicas.count through /scale; the Deployment follows.
    cluster.kubectl("scale", "-n", ns, "optimizedendpoint/chat", "--replicas=3")
    wait_for(lambda: _serving_replicas(cluster, ns) == [3], "the Deployment scaled to 3")
    wait_for(lambda: status(cluster, ns, "chat").get("replicas") == 3, "status.replicas 3")

    # A real HPA (kube-controller-manager's) with a floor of 4 raises the count through /scale.
    cluster.apply([{
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "chat", "namespace": ns},
        "spec": {"scaleTargetRef": {"apiVersion": "trilemma.dev/v1alpha1",
                                    "kind": "OptimizedEndpoint", "name": "chat"},
                 "minReplicas": 4, "maxReplicas": 4,
                 "metrics": [{"type": "Resource", "resource": {
                     "name": "cpu", "target": {"type": "Utilization",
                                               "averageUtilization": 80}}}]}}])
    wait_for(lambda: endpoint(cluster, ns, "chat")["spec"]["replicas"].get("count") == 4,
             "the HPA wrote replicas.count 4", timeout_s=120)
    wait_for(lambda: _serving_replicas(cluster, ns) == [4], "the Deployment scaled to 4")
    # The operator keeps running its loop (resync every second here) and never moves it back.
    time.sleep(8)
    assert endpoint(cluster, ns, "chat")["spec"]["replicas"]["count"] == 4
    assert _serving_replicas(cluster, ns) == [4]
    st = status(cluster, ns, "chat")
    assert st["replicas"] == 4 and st["scaling"]["specCount"] == 4
    assert st["activeConfiguration"]["replicas"] == 4
    assert st["allocatedGpus"] == {"h100_sxm": st["activeConfiguration"]["gpus"]}
    assert _spec_writes_by_operator(cluster, ns) == []
    # The plan ConfigMap offers the KEDA ScaledObject that would do the HPA's job from traffic.
    plan_map = json.loads(cluster.kubectl("get", "configmap", "chat-plan", "-n", ns, "-o",
                                          "json").stdout)
    sample = yaml.safe_load(plan_map["data"]["keda-scaledobject.yaml"])
    assert sample["spec"]["scaleTargetRef"] == {"apiVersion": "trilemma.dev/v1alpha1",
                                                "kind": "OptimizedEndpoint", "name": "chat"}
