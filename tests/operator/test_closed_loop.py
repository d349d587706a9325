"""The closed loop with real parts: the Kopf operator (against KMock), a real Prometheus
scraping simulated vLLM servers, and loadgen shifting the traffic.

Prints the acceptance figures of issue #5: estimator error against loadgen's truth, rollouts
under steady noisy load, detection delay after a shift. KMock has no controllers, so the test
marks new Deployments available itself; the simulated fleet stands in for their pods.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import json
import time
from typing import Any

import pytest

from tests.operator.test_reconcile import ENDPOINT, NS, POOL, make_available, status
from tests.support.kube import Api
from tests.support.prometheus import PrometheusServer, ScrapeJob, prometheus_binary
from trilemma.operator.endpoint import OperatorConfig
from trilemma.optimizer.search import ServingConfig
from trilemma.simfleet.fleet import SimFleet
from trilemma.simfleet.loadgen import LoadStage, run_load
from trilemma.simfleet.prometheus_server import free_port
from trilemma.tools.inprocess import CACHE_DIR

pytestmark = pytest.mark.slow

WINDOW_S = 30
INTERVAL_S = 10
# Llama 3.1 70B at 2 requests/s: the cheapest plan is one fp8 TP2 replica; at 4x the rate it
# is not (TP4), and the running one misses the TTFT target.
MODEL = "meta-llama/Llama-3.1-70B"
# Deadlines only: each wait returns as soon as its step happens; on a starved machine it may
# take this long before the test fails naming the step.
DEADLINE_S = 300
STEADY = dict(rate=2.0, prompt_mean=1000.0, prompt_p90=2000.0, output_mean=200.0,
              output_p90=400.0)


class LabelledPrometheus(PrometheusServer):
    """Scrapes the fleet with the labels a PodMonitor would give the endpoint's pods
    (namespace, and trilemma_dev_endpoint from podTargetLabels): what the operator selects."""

    def config(self) -> dict[str, Any]:
        config = super().config()
        for job in config["scrape_configs"]:
            for group in job["static_configs"]:
                group["labels"] = {"namespace": NS, "trilemma_dev_endpoint": "chat"}
        return config


def retuned_endpoint(prometheus_url: str) -> dict[str, Any]:
    body = copy.deepcopy(ENDPOINT)
    spec = body["spec"]
    spec["model"] = {"id": MODEL}
    spec["workload"] = {"promptTokens": {"kind": "lognormal", "mean": 1000, "p90": 2000},
                        "outputTokens": {"kind": "lognormal", "mean": 200, "p90": 400},
                        "arrivals": {"kind": "poisson", "requestsPerSecond": 2}}
    spec["serving"] = {}
    # The cheapest plan for the load at hand: a heavier load needs a different one.
    spec["objective"] = "min_cost"
    spec["retune"] = {"enabled": True, "intervalSeconds": INTERVAL_S,
                      "windowSeconds": WINDOW_S, "cooldownSeconds": 0,
                      "minImprovement": 0.05}
    spec["prometheus"] = {"url": prometheus_url}
    return body


def history(api: Api) -> list[dict[str, Any]]:
    return status(api).get("retuneHistory") or []


async def _serve_plan(api: Api) -> tuple[SimFleet, ServingConfig]:
    plan = json.loads(api.get("v1", "ConfigMap", NS, "chat-plan")["data"]["plan.json"])
    config = ServingConfig.from_dict(plan["recommended"]["config"])
    fleet = SimFleet(config, replicas=min(config.replicas, 2), seed=1)
    await fleet.start()
    return fleet, config


def window_truth(report: Any, started: float, observed: dict[str, Any]) -> dict[str, float]:
    """What loadgen sent that finished inside the estimator's window (the same requests the
    server's counters saw there): rate, mean prompt and output tokens."""
    at = datetime.datetime.fromisoformat(observed["observedAt"].replace("Z", "+00:00"))
    end = at.timestamp()
    window = float(observed["windowSeconds"])
    done = [r for r in report.requests if r.ok and r.e2e_s is not None
            and end - window <= started + r.sent_s + r.e2e_s <= end]
    return {"rate": len(done) / window,
            "prompt_mean": sum(r.prompt_tokens for r in done) / len(done),
            "output_mean": sum(r.output_tokens for r in done) / len(done)}


def _error(observed: float | None, truth: float) -> float:
    return float("inf") if observed is None else abs(observed - truth) / truth


async def test_the_loop_follows_a_traffic_shift_and_ignores_steady_noise(
        api, operator_factory, tmp_path, capsys):
    prometheus_binary()  # skips (or fails in CI) without the binary
    # The platform team's allow-list names the Prometheus the endpoint may point at (its port
    # chosen now, the server started once the fleet it scrapes exists).
    port = free_port()
    op = await operator_factory(config=OperatorConfig(
        cache_dir=CACHE_DIR, prometheus_urls=("http://127.0.0.1:9", f"http://127.0.0.1:{port}")))
    await api.create(POOL)
    # Prometheus first (the endpoint names its URL), scraping a fleet started below: the
    # scrape config needs the fleet's addresses, so start the fleet from a first plan.
    await api.create(retuned_endpoint("http://127.0.0.1:9"))  # no Prometheus there yet
    await api.wait(lambda: status(api).get("phase") == "Deploying", timeout=DEADLINE_S,
                   what="the first plan")
    fleet, _config = await _serve_plan(api)
    prom = LabelledPrometheus(tmp_path / "prom", [
        ScrapeJob(name=f"sim-{i}", address=a)
        for i, a in enumerate(fleet.addresses)], port=port).start()
    load: asyncio.Task[Any] | None = None
    try:
        await api.patch("trilemma.dev/v1alpha1", "OptimizedEndpoint", NS, "chat",
                        {"spec": {"prometheus": {"url": prom.url}}})
        first = status(api)["activeConfiguration"]["hash"]
        await make_available(api, api.get("apps/v1", "Deployment", NS, f"chat-{first}"))
        await api.wait(lambda: status(api).get("phase") == "Ready", timeout=DEADLINE_S,
                       what="Ready")

        # Steady, noisy (Poisson) traffic as the spec describes it: no rollout.
        steady_s = 45.0
        started = time.time()
        report = await run_load(fleet.urls, [LoadStage(duration_s=steady_s, name="steady",
                                                       **STEADY)], seed=3)
        observed = status(api).get("observedWorkload") or {}
        truth = window_truth(report, started, observed)
        rollouts_steady = sum(1 for h in history(api) if h["action"] == "RollOut")
        assert rollouts_steady == 0
        conditions = {c["type"]: c for c in status(api)["conditions"]}
        assert conditions["MetricsAvailable"]["status"] == "True", conditions

        # Four times the rate: detected, re-planned, rolled out.
        shift_start = time.monotonic()
        shifted = {**STEADY, "rate": 4 * STEADY["rate"]}
        # Longer than any wait below: the traffic must not end before the loop reacts.
        load = asyncio.create_task(run_load(fleet.urls, [LoadStage(
            duration_s=2 * DEADLINE_S, name="shift", **shifted)], seed=4))
        try:
            rolling = await api.wait(lambda: (status(api).get("rollout") or {}).get("toHash")
                                     not in (None, first) and status(api),
                                     timeout=DEADLINE_S, what="a retune rollout")
        except AssertionError:
            print(json.dumps({k: status(api).get(k) for k in (
                "retuneHistory", "observedWorkload", "retune")}, indent=1))
            raise
        detected_s = time.monotonic() - shift_start
        new = rolling["rollout"]["toHash"]
        await make_available(api, api.get("apps/v1", "Deployment", NS, f"chat-{new}"))
        await api.wait(lambda: api.get("v1", "Service", NS, "chat")["spec"]["selector"][
            "trilemma.dev/config-hash"] == new, timeout=DEADLINE_S, what="the Service switched")
        replans = [h for h in history(api) if h["action"] == "Replan"]
        assert replans and "rate" in replans[-1]["reason"]
        tuned_rate = status(api)["tunedWorkload"]["workload"]["arrivals"]["requestsPerSecond"]
        assert tuned_rate > 1.3 * STEADY["rate"]

        # Prometheus down: no change, and the condition says so.
        prom.stop()
        await api.wait(lambda: {c["type"]: c for c in status(api)["conditions"]}[
            "MetricsAvailable"]["reason"] == "PrometheusError", timeout=DEADLINE_S,
            what="MetricsAvailable PrometheusError")
        assert status(api)["servingHash"] == new
    finally:
        if load is not None:
            load.cancel()
            # Its requests end with it, before the fleet they go to and the operator stop.
            await asyncio.gather(load, return_exceptions=True)
        prom.stop()
        await fleet.stop()
        del op

    errors = {
        "rate": _error(observed.get("rateRps"), truth["rate"]),
        "prompt_mean": _error((observed.get("promptTokens") or {}).get("mean"),
                              truth["prompt_mean"]),
        "output_mean": _error((observed.get("outputTokens") or {}).get("mean"),
                              truth["output_mean"]),
    }
    with capsys.disabled():
        print("\nclosed loop: estimator error vs loadgen truth over the steady phase: "
              + ", ".join(f"{k} {v:.1%}" for k, v in errors.items()))
        print(f"closed loop: rollouts under {steady_s:.0f} s of steady noisy load: "
              f"{rollouts_steady}; shift (rate x4) to rollout: "
              f"{detected_s:.0f} s (window {WINDOW_S} s, target <= {2 * WINDOW_S} s)")
    assert all(e <= 0.10 for e in errors.values()), errors
