"""Small readers and waits over kubectl, shared by the cluster scenarios."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.support.cluster import OPERATOR_NS
from trilemma.simfleet.cluster import LocalCluster
from trilemma.simfleet.prometheus_server import free_port

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "operator"
# The examples name an in-cluster Prometheus; tests send nothing off loopback, so they point
# the endpoints at a loopback port where nothing listens (the retune check then reports
# PrometheusError, as it would with Prometheus down).
NO_PROMETHEUS = "http://127.0.0.1:9"
# Where the closed-loop scenario starts its Prometheus, chosen when the session starts: the
# operator may query only the URLs its configuration allows (the chart's
# prometheus.allowedUrls), and endpoints name this one.
CLOSED_LOOP_PROMETHEUS_PORT = free_port()
OPERATOR_ENV = {"TRILEMMA_PROMETHEUS_ALLOWED_URLS":
                f"{NO_PROMETHEUS},http://127.0.0.1:{CLOSED_LOOP_PROMETHEUS_PORT}"}


def h100_pool(name: str, *, count: int = 16, product: str | None = "NVIDIA-H100-80GB-HBM3",
              gpu: str = "h100_sxm") -> dict[str, Any]:
    """A HardwarePool of `gpu`s on the fake nodes labelled `product` (None: any node), tolerating
    the GPU nodes' taint."""
    entry: dict[str, Any] = {"gpu": gpu, "count": count, "gpusPerNode": 8,
                             "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                                              "effect": "NoSchedule"}]}
    if product:
        entry["nodeSelector"] = {"nvidia.com/gpu.product": product}
    return {"apiVersion": "trilemma.dev/v1alpha1", "kind": "HardwarePool",
            "metadata": {"name": name}, "spec": {"gpus": [entry]}}


CHAT_WORKLOAD: dict[str, Any] = {
    "promptTokens": {"kind": "lognormal", "mean": 1000, "p90": 2000},
    "outputTokens": {"kind": "lognormal", "mean": 200, "p90": 400},
    "arrivals": {"kind": "poisson", "requestsPerSecond": 2}}


def chat_endpoint(namespace: str, pool: str, **spec: Any) -> dict[str, Any]:
    """OptimizedEndpoint "chat": Llama-3.1-8B on vLLM, CHAT_WORKLOAD, TTFT p90 1 s and TPOT
    p90 50 ms, min_cost, drawing from `pool`; `spec` adds or replaces top-level spec keys."""
    return {"apiVersion": "trilemma.dev/v1alpha1", "kind": "OptimizedEndpoint",
            "metadata": {"name": "chat", "namespace": namespace},
            "spec": {"model": {"id": "meta-llama/Llama-3.1-8B-Instruct"},
                     "workload": CHAT_WORKLOAD,
                     "slo": {"ttftMs": {"p90": 1000}, "tpotMs": {"p90": 50}},
                     "objective": "min_cost", "hardwarePoolRef": {"name": pool},
                     "engine": {"name": "vllm"}, **spec}}


def load_examples(*names: str) -> list[dict[str, Any]]:
    docs = []
    for name in names:
        for doc in yaml.safe_load_all((EXAMPLES / name).read_text()):
            if doc and doc["kind"] == "OptimizedEndpoint" and "prometheus" in doc["spec"]:
                doc["spec"]["prometheus"]["url"] = NO_PROMETHEUS
            if doc:
                docs.append(doc)
    return docs


def endpoint(cluster: LocalCluster, namespace: str, name: str) -> dict[str, Any]:
    done = cluster.kubectl("get", "optimizedendpoint", name, "-n", namespace, "-o", "json",
                           check=False)
    return json.loads(done.stdout) if done.returncode == 0 else {}


def status(cluster: LocalCluster, namespace: str, name: str) -> dict[str, Any]:
    return endpoint(cluster, namespace, name).get("status") or {}


def items(cluster: LocalCluster, kind: str, namespace: str, *selector: str) -> list[Any]:
    args = ["get", kind, "-n", namespace, "-o", "json"]
    if selector:
        args += ["-l", ",".join(selector)]
    return json.loads(cluster.kubectl(*args).stdout)["items"]


def wait_for(check: Callable[[], Any], what: str, *, timeout_s: float = 180.0,
             explain: Callable[[], str] = lambda: "") -> Any:
    """Poll `check` until truthy; fail naming `what` and what `explain` says was last seen."""
    end = time.monotonic() + timeout_s
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}; "
                                 f"last seen: {explain()}")
        time.sleep(0.5)


def phase_is(cluster: LocalCluster, namespace: str, name: str, *phases: str,
             timeout_s: float = 180.0) -> dict[str, Any]:
    def explain() -> str:
        st = status(cluster, namespace, name)
        return f"phase {st.get('phase')}: {st.get('message', '')}"

    return wait_for(lambda: (st := status(cluster, namespace, name)).get("phase") in phases
                    and st, f"{namespace}/{name} in phase {'/'.join(phases)}",
                    timeout_s=timeout_s, explain=explain)


def deployments(cluster: LocalCluster, namespace: str, name: str) -> list[dict[str, Any]]:
    return items(cluster, "deployments", namespace, f"trilemma.dev/endpoint={name}")


def endpoint_ips(cluster: LocalCluster, namespace: str, service: str) -> set[str]:
    """The ready addresses the EndpointSlice controller lists behind a Service."""
    slices = items(cluster, "endpointslices", namespace, f"kubernetes.io/service-name={service}")
    return {a for s in slices for e in s.get("endpoints") or []
            if (e.get("conditions") or {}).get("ready") for a in e["addresses"]}


def pod_ips(cluster: LocalCluster, namespace: str, config_hash: str) -> set[str]:
    pods = items(cluster, "pods", namespace, f"trilemma.dev/config-hash={config_hash}")
    return {p["status"]["podIP"] for p in pods if (p.get("status") or {}).get("podIP")}


def _leaves(value: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    if isinstance(value, dict) and value:
        return [leaf for k, v in value.items() for leaf in _leaves(v, (*path, k))]
    return [(path, value)]


def _at(obj: Any, path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return _MISSING
        obj = obj[key]
    return obj


_MISSING = object()


def assert_status_writes_read_back(cluster: LocalCluster) -> set[str]:
    """Every leaf of every status merge-patch the operator sent is in the stored object the
    server returned for that very request (null leaves delete, so they are skipped): a key
    the CRD does not declare would be pruned silently. Returns the status keys written."""
    operator_user = f"system:serviceaccount:{OPERATOR_NS}:"
    patches = [e for e in cluster.audit()
               if e.get("verb") == "patch" and e["objectRef"].get("subresource") == "status"
               and e["objectRef"].get("resource") == "optimizedendpoints"
               and e["user"]["username"].startswith(operator_user)
               and e.get("responseStatus", {}).get("code") == 200]
    assert len(patches) >= 5, "the audit log holds the operator's status writes"
    dropped, written = set(), set()
    for event in patches:
        sent = (event.get("requestObject") or {}).get("status") or {}
        stored = (event.get("responseObject") or {}).get("status") or {}
        written |= {k for k, v in sent.items() if v is not None}
        for path, value in _leaves(sent):
            if value is None:
                continue
            if _at(stored, path) != value:
                dropped.add(".".join(("status", *path)))
    assert not dropped, f"written but not kept by the API server: {sorted(dropped)}"
    return written
