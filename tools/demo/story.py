"""The demo's story, once the operator runs against an API server: declare the pool and the
endpoint, wait for the plan, serve it with a simulated vLLM fleet that a real Prometheus
scrapes, send the steady traffic and then the shifted one, until the loop has re-planned and
rolled out (or time runs out), and score the operator's estimates.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import TYPE_CHECKING

from trilemma.simfleet import loadgen
from trilemma.simfleet.prometheus_server import (
    INSTALL_HINT,
    PrometheusServer,
    ScrapeJob,
    free_port,
)
from trilemma.tools.demo.scenario import (
    INTERVAL_S,
    MAX_REPLICAS,
    MODEL,
    NAME,
    NAMESPACE,
    PLAN_TIMEOUT_S,
    POOL,
    READY_TIMEOUT_S,
    SLO_TPOT_P90_MS,
    SLO_TTFT_P90_MS,
    WINDOW_S,
    describe_phase,
    endpoint_manifest,
    phases,
    pool_manifest,
)
from trilemma.tools.demo.scoring import (
    EXIT_NO_PROMETHEUS,
    EXIT_NO_ROLLOUT,
    EXIT_ROLLED_OUT,
    DemoResult,
    estimates,
    phase_figures,
)
from trilemma.tools.demo.watcher import Watcher

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from trilemma.operator.metrics import OperatorMetrics

# The scrape job of the operator's own /metrics (the chart's ServiceMonitor, in a cluster).
OPERATOR_JOB = "trilemma-operator"


async def tell(watcher: Watcher, binary: str | None, tmp: Path, prometheus_port: int,
               operator_metrics: OperatorMetrics | None = None) -> DemoResult:
    """The story against the API server `watcher.api` serves, with the operator running;
    Prometheus also scrapes `operator_metrics` when given (the dashboard's operator series)."""
    options, timeline, api = watcher.options, watcher.timeline, watcher.api
    result = watcher.result
    prometheus_url = f"http://127.0.0.1:{prometheus_port}"
    await api.create(pool_manifest())
    timeline.add("create", f"HardwarePool {POOL}: 16x h100_sxm")
    await api.create(endpoint_manifest(prometheus_url))
    timeline.add("create", f"OptimizedEndpoint {NAMESPACE}/{NAME}: {MODEL} on vLLM; "
                           f"{describe_phase(phases(options)[0])}; SLO TTFT p90 "
                           f"{SLO_TTFT_P90_MS:.0f} ms, TPOT p90 {SLO_TPOT_P90_MS:.0f} ms; "
                           f"objective min_cost; re-tune checked every {INTERVAL_S} s over "
                           f"a {WINDOW_S} s window from {prometheus_url}")

    planned = await watcher.poll_until(
        lambda: watcher.planned or watcher.phase in ("Failed", "Infeasible"),
        PLAN_TIMEOUT_S, "the plan")
    if not planned or not watcher.planned:
        result.message = f"no plan: {watcher.status.get('message') or 'timed out'}"
        return result
    if binary is None:
        result.message = (f"the closed loop needs a Prometheus server, and none was found: "
                          f"{INSTALL_HINT}")
        timeline.add("stop", result.message)
        result.exit_code = EXIT_NO_PROMETHEUS
        return result
    if not await watcher.poll_until(lambda: watcher.phase == "Ready", READY_TIMEOUT_S, "Ready"):
        result.message = "the endpoint did not become Ready"
        return result
    await _serve(watcher, binary, tmp, prometheus_port, operator_metrics)
    result.exit_code = EXIT_ROLLED_OUT if result.rolled_out else EXIT_NO_ROLLOUT
    return result


async def _serve(watcher: Watcher, binary: str, tmp: Path, prometheus_port: int,
                 operator_metrics: OperatorMetrics | None) -> None:
    """The plan served by a simulated fleet that Prometheus scrapes, under the traffic."""
    from trilemma.operator.children import stored_plan
    from trilemma.simfleet.fleet import SimFleet

    options, timeline, api = watcher.options, watcher.timeline, watcher.api
    result = watcher.result
    prometheus_url = f"http://127.0.0.1:{prometheus_port}"
    cm = api.get("v1", "ConfigMap", NAMESPACE, f"{NAME}-plan") or {}
    plan = stored_plan(cm)
    if plan is None:  # the operator wrote it just before rolling out: a bug if unreadable
        raise RuntimeError(f"{NAME}-plan holds no readable plan")
    config = plan.recommended.config
    replicas = min(config.replicas, MAX_REPLICAS)
    served = (watcher.status.get("activeConfiguration") or {}).get("model") or config.model
    async with SimFleet(config, replicas=replicas, served_model_name=served,
                        seed=options.seed) as fleet:
        capped = (f" (the plan has {config.replicas}; capped)"
                  if replicas < config.replicas else "")
        limit = fleet.model.max_model_len
        timeline.add("fleet", f"{replicas} simulated vLLM replica(s){capped} of "
                              f"{config.summary()} at "
                              f"{', '.join(fleet.urls)}: step times from the same "
                              f"performance model, --max-model-len {limit}")
        labels = {"namespace": NAMESPACE, "trilemma_dev_endpoint": NAME}
        jobs = [ScrapeJob(f"{NAME}-{i}", address, labels=labels)
                for i, address in enumerate(fleet.addresses)]
        exporter: WSGIServer | None = None
        if operator_metrics is not None:
            port = free_port()
            exporter = operator_metrics.serve(port, addr="127.0.0.1")
            jobs.append(ScrapeJob(OPERATOR_JOB, f"127.0.0.1:{port}"))
        prometheus = PrometheusServer(options.prometheus_dir or tmp / "prometheus", jobs,
                                      binary=binary, port=prometheus_port)
        loop = asyncio.get_running_loop()
        # Blocking calls (a subprocess, HTTP polls): off the loop the operator runs in.
        starting = loop.run_in_executor(None, _start_prometheus, prometheus)
        try:
            try:
                await asyncio.shield(starting)
            except RuntimeError as err:
                result.message = f"Prometheus did not start: {err}"
                timeline.add("stop", result.message)
                return
            also = " and the operator's own metrics" if exporter is not None else ""
            timeline.add("prom", f"Prometheus at {prometheus_url} scrapes the fleet{also} "
                                 f"every 1 s, labelling the fleet's series "
                                 f"namespace={NAMESPACE}, trilemma_dev_endpoint={NAME} (what a "
                                 f"PodMonitor adds)")
            await _traffic(watcher, fleet.urls, served)
        finally:
            # Cancelled (Ctrl-C) while starting, the thread may still be launching the
            # process: let it finish, so that the stop below finds and ends it.
            with contextlib.suppress(Exception):
                await asyncio.shield(starting)
            await loop.run_in_executor(None, prometheus.stop)
            if exporter is not None:
                await loop.run_in_executor(None, _close, exporter)


def _close(server: WSGIServer) -> None:
    server.shutdown()
    server.server_close()


def _start_prometheus(prometheus: PrometheusServer) -> None:
    prometheus.start()
    prometheus.wait_for_targets()


async def _traffic(watcher: Watcher, urls: list[str], model: str) -> None:
    options, timeline = watcher.options, watcher.timeline
    steady, shifted = phases(options)
    stop = asyncio.Event()
    clock = watcher.clock
    clock.load_start = time.time()
    clock.shift_start = clock.load_start + options.steady_s
    load = asyncio.create_task(loadgen.run_load(urls, [steady, shifted], seed=options.seed,
                                                model=model, drain_s=15.0, stop=stop))
    try:
        timeline.add("traffic", f"steady phase for {options.steady_s:g} s: "
                                f"{describe_phase(steady)} (the spec's workload)")
        settled = await watcher.poll_until(lambda: watcher.settled() or load.done(),
                                           options.steady_s + options.shift_s + 30.0,
                                           "the loop to settle")
        if not watcher.settled():
            why = "gave up" if not settled else "the shifted traffic ended"
            since = time.time() - (clock.shift_start or 0.0)
            watcher.result.message = (f"{why} {since:.0f} s after the shift, waiting for "
                                      f"{watcher.pending()}")
            watcher.timeline.add("stop", watcher.result.message)
        stop.set()
        # Observations seen so far belong to the traffic, even one whose whole-second stamp
        # lies a fraction past this moment: settled() may have counted it.
        clock.load_end = max([time.time()] + [o.at for o in watcher.observations])
        report = await load
    finally:
        if not load.done():
            load.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await load
    await watcher.poll()
    timeline.add("traffic", f"stopped: {report.overall.sent} requests sent, "
                            f"{report.overall.completed} completed, "
                            f"{report.overall.failed} failed")
    watcher.result.load = {p.name: phase_figures(p) for p in report.phases}
    watcher.result.estimates = estimates(watcher.observations, clock, report, timeline)
