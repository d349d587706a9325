"""A permission the chart forgets fails a test: the harness's proof that it would.

The chart's RBAC is installed a second time for a separate ServiceAccount with one rule
dropped (no `create` on deployments), and the operator runs as that account on one endpoint.
The real API server refuses the Deployment; `OperatorProcess.problems()` (what every cluster
scenario asserts empty) reports the refusal, and the user sees it on the endpoint: phase Failed
with the API's reason (ApiForbidden), a Warning Event with the server's 403, no Deployment.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster.kube_helpers import NO_PROMETHEUS, endpoint, h100_pool, items, wait_for
from tests.support.cluster import OPERATOR_NS, RBAC_KINDS, OperatorProcess, render_chart
from tests.tools import require_tool
from trilemma.simfleet.cluster import LocalCluster

ACCOUNT = "forgetful"  # fullnameOverride: the roles, bindings and account are forgetful-*


def forgetful_rbac(helm: str) -> list[dict[str, Any]]:
    """The chart's RBAC for ServiceAccount `forgetful`, less `create` on deployments."""
    rbac = [d for d in render_chart(helm, "--set", f"fullnameOverride={ACCOUNT}")
            if d["kind"] in RBAC_KINDS]
    dropped = 0
    for doc in rbac:
        for rule in doc.get("rules") or []:
            if "apps" in rule["apiGroups"] and "deployments" in rule["resources"] \
                    and "create" in rule["verbs"]:
                rule["verbs"] = [v for v in rule["verbs"] if v != "create"]
                dropped += 1
    assert dropped == 1, "the chart's rule creating Deployments moved: update this test"
    return rbac


@pytest.fixture
def forgetful(cluster: LocalCluster, operator: OperatorProcess, namespace: str,
              tmp_path: Path) -> Iterator[OperatorProcess]:
    """The forgetful operator serving `namespace`, in place of the shared one (two operators
    would both act on the endpoint)."""
    rbac = forgetful_rbac(require_tool("helm"))
    cluster.apply(rbac)
    kubeconfig = cluster.service_account_kubeconfig(OPERATOR_NS, ACCOUNT)
    operator.stop()
    proc = OperatorProcess(kubeconfig, tmp_path, name=ACCOUNT, namespace=namespace)
    try:
        yield proc.start()
    finally:
        # Its finalizer is on the endpoint: let it delete the endpoint before it goes.
        cluster.kubectl("delete", "oe", "--all", "-n", namespace, "--wait=true",
                        "--timeout=60s", check=False, timeout_s=90)
        proc.stop()
        operator.start()
        for doc in rbac:
            cluster.kubectl("delete", doc["kind"], doc["metadata"]["name"],
                            *(["-n", doc["metadata"]["namespace"]]
                              if doc["metadata"].get("namespace") else []),
                            "--ignore-not-found", check=False)


def test_a_permission_the_chart_forgets_is_reported(cluster: LocalCluster, namespace: str,
                                                    forgetful: OperatorProcess) -> None:
    ns = namespace
    cluster.apply([h100_pool("forgetful-pool", count=8)])
    cluster.apply([{
        "apiVersion": "trilemma.dev/v1alpha1", "kind": "OptimizedEndpoint",
        "metadata": {"name": "chat", "namespace": ns},
        "spec": {"model": {"id": "meta-llama/Llama-3.1-8B-Instruct"},
                 "workload": {"promptTokens": {"kind": "fixed", "value": 512},
                              "outputTokens": {"kind": "fixed", "value": 128},
                              "arrivals": {"kind": "poisson", "requestsPerSecond": 1}},
                 "bounds": {"maxReplicas": 1, "allowDisaggregation": False},
                 "hardwarePoolRef": {"name": "forgetful-pool"},
                 "prometheus": {"url": NO_PROMETHEUS}}}])

    # The harness reports the refusal: the POST of the Deployment, refused by RBAC.
    refused = wait_for(lambda: [line for line in forgetful.problems()
                                if "/deployments" in line and "403" in line],
                       "the operator's log to report the refused Deployment", timeout_s=120,
                       explain=lambda: forgetful.tail(20))
    assert f"/namespaces/{ns}/deployments" in refused[0], refused

    # What the user sees: nothing deployed, the endpoint Failed with the API's reason (and
    # retried with backoff), and a Warning Event with the server's 403 and what to look at.
    assert items(cluster, "deployments", ns) == []
    st = wait_for(lambda: (s := (endpoint(cluster, ns, "chat").get("status") or {})).get(
        "phase") == "Failed" and s, "the refusal in status", timeout_s=30)
    deployed = next(c for c in st["conditions"] if c["type"] == "Deployed")
    assert deployed["reason"] == "ApiForbidden", deployed
    assert st.get("allocatedGpus", {}) == {}

    def endpoint_events() -> list[dict[str, Any]]:
        return list(json.loads(cluster.kubectl(
            "get", "events", "-n", ns, "--field-selector",
            "involvedObject.kind=OptimizedEndpoint,involvedObject.name=chat",
            "-o", "json").stdout)["items"])

    events = wait_for(lambda: [e for e in endpoint_events()
                               if e.get("reason") == "ApiForbidden"],
                      "an ApiForbidden Event on the endpoint", timeout_s=30,
                      explain=lambda: "; ".join(f"{e.get('type')} {e.get('reason')}: "
                                                f"{e.get('message')}"
                                                for e in endpoint_events()))
    event = events[0]
    assert event["type"] == "Warning"
    assert f"POST /apis/apps/v1/namespaces/{ns}/deployments: HTTP 403" in event["message"]
    # The server's own words name the account and the missing verb.
    assert (f'User "system:serviceaccount:{OPERATOR_NS}:{ACCOUNT}" cannot create resource '
            '"deployments"') in event["message"], event["message"]
