"""The KEDA ScaledObject sample offered to endpoints whose replicas.owner is external."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.support.prometheus import promtool_binary
from tests.unit.test_dashboard import exported_metric_names
from trilemma.operator import keda
from trilemma.operator.resources import OptimizedEndpointSpec
from trilemma.tools.dashboard_queries import metric_names

SPEC = OptimizedEndpointSpec.model_validate({
    "model": {"id": "meta-llama/Llama-3.1-8B-Instruct"},
    "workload": {"promptTokens": {"kind": "fixed", "value": 1000},
                 "outputTokens": {"kind": "fixed", "value": 200},
                 "arrivals": {"kind": "poisson", "requestsPerSecond": 2}},
    "hardwarePoolRef": {"name": "pool"},
    "replicas": {"owner": "external", "minReplicas": 2, "targetUtilization": 0.75,
                 "windowSeconds": 60, "scaleDownStabilizationSeconds": 600}})


def test_the_sample_targets_the_endpoints_scale_subresource_with_the_spec_policy() -> None:
    obj = keda.scaled_object("chat", "team-a", SPEC, prometheus_url="http://prom:9090",
                             max_replicas=6)
    spec = obj["spec"]
    assert (obj["apiVersion"], obj["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
    assert spec["scaleTargetRef"] == {"apiVersion": "trilemma.dev/v1alpha1",
                                      "kind": "OptimizedEndpoint", "name": "chat"}
    assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (2, 6)
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 600
    (trigger,) = spec["triggers"]
    # AverageValue (KEDA's default): replicas = ceil(query / threshold), the query being the
    # replicas needed at 100 %: the threshold is the utilization a replica is scaled to carry.
    assert trigger["metadata"]["threshold"] == "0.75"
    assert trigger["metadata"]["serverAddress"] == "http://prom:9090"
    assert keda.scaled_object("chat", "team-a", SPEC, prometheus_url=None, max_replicas=None
                              )["spec"]["triggers"][0]["metadata"]["serverAddress"] == (
        keda.DEFAULT_PROMETHEUS)


def test_the_query_is_promql_over_metrics_that_exist_for_this_endpoint_only(
        tmp_path: Path) -> None:
    expr = keda.query("chat", "team-a", SPEC)
    assert metric_names(expr) <= exported_metric_names()
    assert {"vllm:request_success_total", "sglang:num_requests_total",
            keda.CAPACITY_GAUGE} <= metric_names(expr)
    # Both engines' series select the endpoint as the operator's own queries do; the gauge by
    # the operator's labels.
    assert expr.count('namespace="team-a"') == 3
    assert expr.count('trilemma_dev_endpoint="chat"') == 2 and 'name="chat"' in expr
    assert "[60s]" in expr  # windowSeconds
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "keda", "rules": [
        {"record": "trilemma:keda", "expr": expr}]}]}))
    done = subprocess.run([promtool_binary(), "check", "rules", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_sample_in_the_examples_is_the_one_the_operator_publishes() -> None:
    path = Path(__file__).resolve().parents[2] / "examples" / "operator" / (
        "autoscaled-endpoint.yaml")
    endpoint, shipped = yaml.safe_load_all(path.read_text())
    spec = OptimizedEndpointSpec.model_validate(endpoint["spec"])
    meta = endpoint["metadata"]
    made = keda.scaled_object(meta["name"], meta["namespace"], spec,
                              prometheus_url=keda.DEFAULT_PROMETHEUS, max_replicas=8)
    assert shipped["spec"]["triggers"][0]["metadata"]["query"] == (
        made["spec"]["triggers"][0]["metadata"]["query"])
    assert shipped == made
