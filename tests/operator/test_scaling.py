"""Operator-owned replicas: the Kopf operator (against KMock) scales an endpoint's Deployment
from the finished-request rate a real Prometheus scrapes, up at once and down only after the
stabilization window, within minReplicas..maxReplicas; a count an HPA writes is ignored.

The engines' metrics come from a simulated vLLM registry fed at a chosen rate (the exporter
stands in for the endpoint's pods); KMock has no controllers, so the test marks Deployments
available itself.
"""

from __future__ import annotations

import asyncio
import copy
import time
from typing import Any

import pytest

from tests.operator.test_closed_loop import LabelledPrometheus
from tests.operator.test_reconcile import ENDPOINT, NS, POOL, make_available, status
from tests.support.kube import Api
from tests.support.prometheus import (
    MetricsExporter,
    ScrapeJob,
    prometheus_binary,
)
from trilemma.operator.endpoint import OperatorConfig
from trilemma.simfleet.prometheus_server import free_port
from trilemma.simfleet.vllm_metrics import EngineMetrics
from trilemma.tools.inprocess import CACHE_DIR

pytestmark = pytest.mark.slow
DEADLINE_S = 120


def _endpoint(prometheus_url: str) -> dict[str, Any]:
    body = copy.deepcopy(ENDPOINT)
    body["spec"]["prometheus"] = {"url": prometheus_url}
    body["spec"]["replicas"] = {"minReplicas": 1, "maxReplicas": 4, "windowSeconds": 30,
                                "scaleDownStabilizationSeconds": 10, "count": 5}
    return body


def _replicas(api: Api) -> int:
    (dep,) = [d for d in api.list("apps/v1", "Deployment", NS)
              if d["metadata"]["name"].startswith("chat-")]
    return int(dep["spec"]["replicas"])


async def _feed(metrics: EngineMetrics, rate: dict[str, float], stop: asyncio.Event) -> None:
    """Finished requests at `rate["rps"]` per second until `stop`."""
    while not stop.is_set():
        n = rate["rps"]
        if n > 0:
            for _ in range(max(1, round(n / 10))):
                metrics.request_finished(prompt_tokens=1000, output_tokens=200,
                                         cached_tokens=0, ttft_s=0.2,
                                         inter_token_s=(0.02,) * 199, e2e_s=4.2, queue_s=0.0)
        await asyncio.sleep(0.1 if n <= 0 else max(1, round(n / 10)) / n)


async def test_the_operator_scales_from_the_rate_up_fast_and_down_slow(
        api: Api, operator_factory: Any, tmp_path: Any) -> None:
    prometheus_binary()
    metrics = EngineMetrics(model_name="meta-llama/Llama-3.1-8B-Instruct", engine="vllm")
    exporter = MetricsExporter({"/metrics": metrics}).start()
    port = free_port()
    prom = LabelledPrometheus(tmp_path / "prom", [ScrapeJob("chat", exporter.address)],
                              port=port).start()
    rate = {"rps": 0.0}
    stop = asyncio.Event()
    feeding = asyncio.create_task(_feed(metrics, rate, stop))
    try:
        await operator_factory(config=OperatorConfig(cache_dir=CACHE_DIR,
                                                     prometheus_urls=(prom.url,)))
        # Room for more replicas than the default test pool's 8 GPUs hold.
        pool = copy.deepcopy(POOL)
        pool["spec"]["gpus"][0]["count"] = 32
        await api.create(pool)
        await api.create(_endpoint(prom.url))
        first = await api.wait(lambda: status(api).get("scaling"), timeout=DEADLINE_S,
                               what="status.scaling")
        planned = status(api)["activeConfiguration"]["replicas"]
        # The count an HPA might write is not the operator-owned endpoint's: ignored, said.
        assert _replicas(api) == planned and "ignored" in first["message"]
        capacity = first["replicaCapacityRps"]
        assert capacity > 0
        deployment = next(d for d in api.list("apps/v1", "Deployment", NS)
                          if d["metadata"]["name"].startswith("chat-"))
        await make_available(api, deployment)
        await api.wait(lambda: status(api).get("phase") == "Ready", timeout=DEADLINE_S,
                       what="Ready")

        # Three replicas' worth of traffic at 80 % utilization: scaled up within a check.
        rate["rps"] = 2.2 * capacity
        started = time.monotonic()
        await api.wait(lambda: _replicas(api) == 3, timeout=DEADLINE_S,
                       what="scaled up to 3")
        up_s = time.monotonic() - started
        st = await api.wait(lambda: status(api).get("replicas") == 3 and status(api),
                            what="status.replicas 3")
        assert st["scaling"]["desiredReplicas"] == 3 and st["replicas"] == 3
        assert st["activeConfiguration"]["replicas"] == 3
        # A scale-up is no rollout: the configuration keeps serving while replicas start.
        assert st["phase"] == "Ready" and (st.get("rollout") or {}).get("state") != "Progressing"

        # Traffic stops: the count holds through the down window, then falls to minReplicas.
        rate["rps"] = 0.0
        stopped = time.monotonic()
        await api.wait(lambda: _replicas(api) == 1, timeout=DEADLINE_S,
                       what="scaled down to minReplicas")
        down_s = time.monotonic() - stopped
        # The rate window (30 s) drains first, then the 10 s stabilization holds.
        assert down_s >= 10
        print(f"\nscaling: up to 3 in {up_s:.0f} s, down to 1 in {down_s:.0f} s")
    finally:
        stop.set()
        await feeding
        prom.stop()
        exporter.stop()
