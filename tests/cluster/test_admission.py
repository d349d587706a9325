"""Bad input on a real API server: what the CRD's schema and CEL rules refuse at admission (the
object is never stored, kubectl names the field), and what only the operator can judge, which
ends in status as before.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import yaml

from tests.cluster.kube_helpers import NO_PROMETHEUS, phase_is
from tests.support.cluster import OperatorProcess
from trilemma.simfleet.cluster import LocalCluster

VALID: dict[str, Any] = {
    "apiVersion": "trilemma.dev/v1alpha1", "kind": "OptimizedEndpoint",
    "metadata": {"name": "bad"},
    "spec": {"model": {"id": "meta-llama/Llama-3.1-8B-Instruct"},
             "workload": {"promptTokens": {"kind": "lognormal", "mean": 1000, "p90": 2000},
                          "outputTokens": {"kind": "fixed", "value": 200},
                          "arrivals": {"kind": "poisson", "requestsPerSecond": 2}},
             "slo": {"ttftMs": {"p90": 1000}}, "objective": "min_cost",
             "hardwarePoolRef": {"name": "admission-pool"},
             "prometheus": {"url": NO_PROMETHEUS}}}


def _with(path: str, value: Any) -> dict[str, Any]:
    body = copy.deepcopy(VALID)
    *parents, last = path.split(".")
    node = body["spec"]
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return body


# (what is wrong, the spec change, words kubectl's error must hold: the field and the rule)
REFUSED = [
    ("two model sources", _with("model.configMap", {"name": "cfg"}),
     ["spec.model", "give id (a bundled model) or configMap, exactly one"]),
    ("a cache from a claim and the node at once",
     _with("serving.modelCache", {"claimName": "c", "hostPath": "/data"}),
     ["spec.serving.modelCache", "give claimName or hostPath, exactly one"]),
    ("lognormal without p90", _with("workload.promptTokens", {"kind": "lognormal", "mean": 10}),
     ["spec.workload.promptTokens", "lognormal"]),
    ("a latency target without a percentile", _with("slo.ttftMs", {}),
     ["spec.slo.ttftMs", "give at least one of p50, p90, p99"]),
    ("an unknown objective", _with("objective", "fastest"),
     ["spec.objective", "Unsupported value", "fastest"]),
    ("a field the schema does not have", _with("replicaz", 3),
     ['unknown field "spec.replicaz"']),
    # A hostile tenant's specs (README, threat model).
    ("the node's root as a model cache", _with("serving.modelCache", {"hostPath": "/"}),
     ["spec.serving.modelCache.hostPath", "should match"]),
    ("a traversal out of a cache directory",
     _with("serving.modelCache", {"hostPath": "/var/lib/../../etc"}),
     ["spec.serving.modelCache.hostPath", "should match"]),
    ("another team's metrics", _with("prometheus.labelSelector", {"namespace": "other-team"}),
     ["spec.prometheus", "not namespace or trilemma_dev_endpoint"]),
    ("a rate that would size a search without bound",
     _with("workload.arrivals", {"kind": "poisson", "requestsPerSecond": 1e12}),
     ["spec.workload.arrivals.requestsPerSecond", "less than or equal to 1000000"]),
]


@pytest.mark.parametrize(("what", "body", "words"), REFUSED, ids=[r[0] for r in REFUSED])
def test_the_api_server_refuses_invalid_specs_naming_the_field(
        cluster: LocalCluster, namespace: str, what: str, body: dict[str, Any],
        words: list[str]) -> None:
    body = {**body, "metadata": {"name": "bad", "namespace": namespace}}
    done = cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(body), check=False)
    assert done.returncode != 0, f"{what} was admitted"
    for word in words:
        assert word in done.stderr, (word, done.stderr)
    gone = cluster.kubectl("get", "oe", "bad", "-n", namespace, check=False)
    assert gone.returncode != 0  # nothing stored


def test_what_admission_cannot_judge_ends_in_status(cluster: LocalCluster,
                                                    operator: OperatorProcess,
                                                    namespace: str) -> None:
    """A model id the catalog does not know passes the schema; the operator says why."""
    body = _with("model.id", "nobody/no-such-model")
    body["metadata"] = {"name": "unknown-model", "namespace": namespace}
    cluster.apply([{"apiVersion": "trilemma.dev/v1alpha1", "kind": "HardwarePool",
                    "metadata": {"name": "admission-pool"},
                    "spec": {"gpus": [{"gpu": "h100_sxm", "count": 16, "gpusPerNode": 8}]}}])
    cluster.apply([body])
    st = phase_is(cluster, namespace, "unknown-model", "Failed", "Infeasible")
    assert "model" in st["message"] and "nobody/no-such-model" in st["message"], st["message"]
    assert cluster.kubectl("get", "deployments", "-n", namespace, "-o", "name").stdout == ""
