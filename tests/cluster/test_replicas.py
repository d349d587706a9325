"""Two operator replicas with Kopf peering, as the chart runs them with `replicas: 2`: one acts,
the other stands by. And concurrent writers on one object: a user's stale write is refused
with 409 by resourceVersion, and a storm of spec changes under the operator's own writes ends
with the last spec planned and deployed.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.kube_helpers import (
    NO_PROMETHEUS,
    OPERATOR_ENV,
    deployments,
    endpoint,
    h100_pool,
    phase_is,
    wait_for,
)
from tests.support.cluster import OperatorProcess, render_chart
from tests.tools import require_tool
from trilemma.simfleet.cluster import LocalCluster

PEERING = "trilemma"  # the chart's default peering.name


@pytest.fixture
def replicas(cluster: LocalCluster, operator: OperatorProcess, operator_kubeconfig: Path,
             tmp_path: Path) -> Iterator[list[OperatorProcess]]:
    """The shared standalone operator stopped, two peering replicas in its place."""
    rendered = render_chart(require_tool("helm"), "--set", "replicas=2", "--include-crds")
    crds = [d for d in rendered if d["kind"] == "CustomResourceDefinition"
            and d["spec"]["group"] == "kopf.dev"]
    assert {c["metadata"]["name"] for c in crds} == {"clusterkopfpeerings.kopf.dev",
                                                     "kopfpeerings.kopf.dev"}
    cluster.apply(crds)
    wait_for(lambda: cluster.kubectl("get", "clusterkopfpeerings", check=False).returncode == 0,
             "the peering CRDs served", timeout_s=60)
    cluster.apply([d for d in rendered if d["kind"] == "ClusterKopfPeering"])
    operator.stop()
    procs = [OperatorProcess(operator_kubeconfig, tmp_path, peering=PEERING, name=name,
                             env=OPERATOR_ENV)
             for name in ("replica-a", "replica-b")]
    try:
        for proc in procs:
            proc.start()
        yield procs
    finally:
        for proc in procs:
            proc.stop()
        operator.start()


def _acted(proc: OperatorProcess, namespace: str) -> bool:
    return bool(re.search(rf"\[{re.escape(namespace)}/chat\] (Handler|Timer) ",
                          proc.log.read_text(errors="replace")))


def test_one_replica_acts_and_concurrent_writers_converge(
        cluster: LocalCluster, replicas: list[OperatorProcess], namespace: str) -> None:
    ns = namespace
    cluster.apply([h100_pool("replica-pool", product=None)])
    body = {"apiVersion": "trilemma.dev/v1alpha1", "kind": "OptimizedEndpoint",
            "metadata": {"name": "chat", "namespace": ns},
            "spec": {"model": {"id": "meta-llama/Llama-3.1-8B-Instruct"},
                     "workload": {"promptTokens": {"kind": "lognormal", "mean": 1000,
                                                   "p90": 2000},
                                  "outputTokens": {"kind": "fixed", "value": 200},
                                  "arrivals": {"kind": "poisson", "requestsPerSecond": 1}},
                     "slo": {"ttftMs": {"p90": 1000}}, "objective": "min_cost",
                     "hardwarePoolRef": {"name": "replica-pool"},
                     "prometheus": {"url": NO_PROMETHEUS}}}
    cluster.apply([body])
    phase_is(cluster, ns, "chat", "Ready")
    acting = [p for p in replicas if _acted(p, ns)]
    assert len(acting) == 1, [p.tail(20) for p in replicas]
    peering = json.loads(cluster.kubectl("get", "clusterkopfpeering", PEERING, "-o",
                                         "json").stdout)
    assert len(peering.get("status") or {}) == 2, peering  # both replicas keep alive there

    # A stale write (an old resourceVersion) is refused by the server: 409, nothing applied.
    stale = endpoint(cluster, ns, "chat")
    cluster.kubectl("patch", "oe", "chat", "-n", ns, "--type=merge", "-p",
                    '{"spec": {"workload": {"arrivals": {"requestsPerSecond": 2}}}}')
    stale["spec"]["workload"]["arrivals"]["requestsPerSecond"] = 99
    stale.pop("status", None)
    done = cluster.kubectl("replace", "-f", "-", input=json.dumps(stale), check=False)
    assert done.returncode != 0 and "the object has been modified" in done.stderr, done.stderr
    assert endpoint(cluster, ns, "chat")["spec"]["workload"]["arrivals"][
        "requestsPerSecond"] == 2

    # Spec changes in quick succession while the operator writes status and children: the
    # last one wins, observed and deployed.
    for rate in (3, 4, 5, 6, 7, 8):
        cluster.kubectl("patch", "oe", "chat", "-n", ns, "--type=merge", "-p",
                        json.dumps({"spec": {"workload": {"arrivals": {
                            "requestsPerSecond": rate}}}}))
    final = endpoint(cluster, ns, "chat")["metadata"]["generation"]
    st = wait_for(lambda: (s := endpoint(cluster, ns, "chat").get("status") or {}).get(
        "observedGeneration") == final and s.get("phase") == "Ready" and s,
        "the last spec planned and Ready", timeout_s=240,
        explain=lambda: str({k: (endpoint(cluster, ns, "chat").get("status") or {}).get(k)
                             for k in ("phase", "message", "observedGeneration")}))
    deps = deployments(cluster, ns, "chat")
    assert [d["metadata"]["name"] for d in deps] == [
        f"chat-{st['activeConfiguration']['hash']}"]
    assert deps[0]["spec"]["replicas"] == st["activeConfiguration"]["replicas"]
    assert len([p for p in replicas if _acted(p, ns)]) == 1
    for proc in replicas:
        assert "Traceback" not in proc.log.read_text(errors="replace"), proc.tail(40)
