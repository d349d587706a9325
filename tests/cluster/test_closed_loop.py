"""The closed loop on the real control plane: the operator (its own process, its
ServiceAccount) reads a real Prometheus, sees the traffic shift, re-plans, and the rollout runs
through the real Deployment controller, scheduler and EndpointSlice controller.

The fake pods kwok marks Ready serve no traffic: simulated vLLM servers (trilemma.simfleet)
in this process serve the plan's configuration and Prometheus scrapes them with the labels a
PodMonitor would give the endpoint's pods. The simulated fleet keeps serving the first
configuration after the rollout (what the test checks is the operator's decision and the
cluster's rollout, not the new configuration's speed).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from tests.cluster.kube_helpers import (
    CLOSED_LOOP_PROMETHEUS_PORT,
    NO_PROMETHEUS,
    assert_status_writes_read_back,
    chat_endpoint,
    deployments,
    endpoint_ips,
    h100_pool,
    phase_is,
    pod_ips,
    status,
    wait_for,
)
from tests.support.cluster import OperatorProcess
from tests.support.prometheus import PrometheusServer, ScrapeJob, prometheus_binary
from trilemma.optimizer.search import ServingConfig
from trilemma.simfleet.cluster import LocalCluster
from trilemma.simfleet.fleet import SimFleet
from trilemma.simfleet.loadgen import LoadStage, run_load

pytestmark = pytest.mark.slow

INTERVAL_S, WINDOW_S = 10, 30
DEADLINE_S = 300  # each wait returns as soon as its step happens; this is only the limit
MODEL = "meta-llama/Llama-3.1-70B"
STEADY = dict(rate=2.0, prompt_mean=1000.0, prompt_p90=2000.0, output_mean=200.0,
              output_p90=400.0)
POOL = h100_pool("loop-pool")


def _endpoint(ns: str) -> dict[str, Any]:
    return chat_endpoint(ns, "loop-pool", model={"id": MODEL}, retune={
        "enabled": True, "intervalSeconds": INTERVAL_S, "windowSeconds": WINDOW_S,
        "cooldownSeconds": 0, "minImprovement": 0.05}, prometheus={"url": NO_PROMETHEUS})


async def test_the_loop_replans_and_rolls_out_on_the_real_control_plane(
        cluster: LocalCluster, operator: OperatorProcess, namespace: str, tmp_path) -> None:
    binary = prometheus_binary()
    ns = namespace
    cluster.apply([POOL, _endpoint(ns)])
    st = await asyncio.to_thread(phase_is, cluster, ns, "chat", "Ready", timeout_s=DEADLINE_S)
    first = st["activeConfiguration"]["hash"]
    plan = json.loads(cluster.get("configmap", "chat-plan", ns)["data"]["plan.json"])
    config = ServingConfig.from_dict(plan["recommended"]["config"])

    async with SimFleet(config, replicas=min(config.replicas, 2), seed=1) as fleet:
        labels = {"namespace": ns, "trilemma_dev_endpoint": "chat"}
        prom = PrometheusServer(tmp_path / "prom", [
            ScrapeJob(f"sim-{i}", a, labels=labels) for i, a in enumerate(fleet.addresses)],
            binary=binary, port=CLOSED_LOOP_PROMETHEUS_PORT)
        await asyncio.to_thread(prom.start)
        load: asyncio.Task[Any] | None = None
        try:
            cluster.kubectl("patch", "oe", "chat", "-n", ns, "--type=merge", "-p",
                            json.dumps({"spec": {"prometheus": {"url": prom.url}}}))
            # Steady traffic as the spec describes it: metrics flow, nothing rolls out.
            await run_load(fleet.urls, [LoadStage(duration_s=45.0, name="steady", **STEADY)],
                           seed=3)
            st = status(cluster, ns, "chat")
            conditions = {c["type"]: c for c in st["conditions"]}
            assert conditions["MetricsAvailable"]["status"] == "True", conditions
            assert not [h for h in st.get("retuneHistory") or [] if h["action"] == "RollOut"]
            assert st["servingHash"] == first

            # Four times the rate: detected, re-planned, rolled out by the cluster.
            shifted = {**STEADY, "rate": 4 * STEADY["rate"]}
            started = time.monotonic()
            load = asyncio.create_task(run_load(fleet.urls, [LoadStage(
                duration_s=2 * DEADLINE_S, name="shift", **shifted)], seed=4))

            def moved() -> str | None:
                serving = status(cluster, ns, "chat").get("servingHash")
                return serving if serving not in (None, first) else None

            new = await asyncio.to_thread(
                wait_for, moved, "a re-tune rollout through the cluster", timeout_s=DEADLINE_S,
                explain=lambda: json.dumps(status(cluster, ns, "chat").get("retuneHistory"))[
                    -1500:])
            rolled_s = time.monotonic() - started
        finally:
            if load is not None:
                load.cancel()
            await asyncio.to_thread(prom.stop)

    history = status(cluster, ns, "chat")["retuneHistory"]
    assert [h for h in history if h["action"] == "Replan" and "rate" in h["reason"]], history
    assert [h for h in history if h["action"] == "RollOut"], history

    def settled() -> bool:
        names = [d["metadata"]["name"] for d in deployments(cluster, ns, "chat")]
        ips = pod_ips(cluster, ns, new)
        return names == [f"chat-{new}"] and bool(ips) and endpoint_ips(cluster, ns, "chat") == ips

    await asyncio.to_thread(wait_for, settled, "the old Deployment gone, the Service's "
                            "endpoints on the new pods", timeout_s=120)
    # The closed loop's status fields are declared by the CRD key for key: the server kept
    # every one the operator wrote.
    written = assert_status_writes_read_back(cluster)
    assert {"observedWorkload", "retune", "retuneHistory"} <= written, written
    print(f"\nclosed loop on the real control plane: rate x4 -> new configuration serving in "
          f"{rolled_s:.0f} s (window {WINDOW_S} s)")
