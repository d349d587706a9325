"""A ready-made KEDA ScaledObject for an endpoint whose replicas.owner is external.

KEDA's Prometheus scaler with its default AverageValue target asks for ceil(value / threshold)
replicas. The query divides the endpoint's finished-request rate (both engines' counters, the
closed loop's own expression) by the operator's per-replica capacity gauge, and the threshold
is the target utilization: ceil(rate / (capacity x utilization)), the operator-owned scaler's
rule. The capacity is read from the gauge rather than written into the threshold, so a re-plan
that changes it needs no new ScaledObject. A pure function: same endpoint, same bytes.
"""

from __future__ import annotations

from typing import Any

from trilemma.operator import naming, promql
from trilemma.operator.resources import OptimizedEndpointSpec
from trilemma.optimizer.catalog import Engine

Obj = dict[str, Any]
KEDA_API = "keda.sh/v1alpha1"
CAPACITY_GAUGE = "trilemma_endpoint_replica_capacity_requests_per_second"
# Where the sample points when neither the spec nor the operator names a Prometheus: the
# service the kube-prometheus-stack chart creates (edit it to yours).
DEFAULT_PROMETHEUS = "http://prometheus-operated.monitoring.svc:9090"


def query(name: str, namespace: str, spec: OptimizedEndpointSpec) -> str:
    """Finished requests/s of the endpoint's pods over the replica window, divided by what one
    replica carries within the SLO: the replicas the rate needs at 100 % utilization."""
    selector = promql.endpoint_selector(namespace, name, spec.prometheus.label_selector)
    rates = " or ".join(
        promql.request_rate(promql.scope(engine, selector, spec.replicas.window_seconds))
        for engine in (Engine.VLLM, Engine.SGLANG))
    gauge = CAPACITY_GAUGE + promql.label_matchers({"namespace": namespace, "name": name})
    return f"({rates}) / max({gauge})"


def scaled_object(name: str, namespace: str, spec: OptimizedEndpointSpec, *,
                  prometheus_url: str | None, max_replicas: int | None) -> Obj:
    """The ScaledObject driving OptimizedEndpoint `name` through its scale subresource."""
    policy = spec.replicas
    return {
        "apiVersion": KEDA_API, "kind": "ScaledObject",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "scaleTargetRef": {"apiVersion": naming.API_VERSION, "kind": "OptimizedEndpoint",
                               "name": name},
            "minReplicaCount": policy.min_replicas,
            "maxReplicaCount": max_replicas or policy.max_replicas or policy.min_replicas,
            "pollingInterval": 15,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": {
                "scaleUp": {"stabilizationWindowSeconds":
                            policy.scale_up_stabilization_seconds},
                "scaleDown": {"stabilizationWindowSeconds":
                              policy.scale_down_stabilization_seconds}}}},
            "triggers": [{
                "type": "prometheus",
                "metadata": {
                    "serverAddress": prometheus_url or DEFAULT_PROMETHEUS,
                    "query": query(name, namespace, spec),
                    "threshold": f"{policy.target_utilization:g}",
                },
            }],
        },
    }
