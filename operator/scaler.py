"""The operator-owned scaler's I/O shell: each resync tick, read the rate, decide, redeploy.

Runs for endpoints whose spec.replicas.owner is `operator` (the default) once a configuration
is applied and a Prometheus is configured. autoscale.py decides; this module reads the
endpoint's finished-request rate and queue from Prometheus, writes status.scaling (only when
the recommendation or the stabilized count changes) and, when the count changes, reconciles:
the reconciler deploys status.scaling.desiredReplicas (replicas.py), re-checking the pool.
With owner `external` nothing here runs: the count is the HPA's or KEDA's alone.
"""

from __future__ import annotations

import time
from typing import Any

from trilemma.operator import autoscale, closed_loop, naming, promql, reconcile, scale, status
from trilemma.operator.endpoint import Endpoint, Runtime, commit, live_spec
from trilemma.operator.endpoint_status import ScaleRecommendation, ScalingStatus
from trilemma.operator.kube import Ref
from trilemma.operator.prometheus import PrometheusClient, PrometheusError
from trilemma.operator.resources import OptimizedEndpointSpec, ReplicaOwner
from trilemma.optimizer.errors import InputError

Obj = dict[str, Any]


def _due(body: Obj) -> OptimizedEndpointSpec | None:
    """The spec when the scaler acts on this endpoint now: owner operator, a configuration
    applied and no rollout under way (the new configuration's count is the reconciler's)."""
    spec = live_spec(body)
    if spec is None:
        return None
    written = body.get("status") or {}
    active = written.get("activeConfiguration") or {}
    if spec.replicas.owner is not ReplicaOwner.OPERATOR or not active.get("applied"):
        return None
    if (written.get("rollout") or {}).get("state") == "Progressing":
        return None
    scaling = written.get("scaling") or {}
    return spec if scaling.get("layoutHash") == active.get("hash") else None


async def check(rt: Runtime, namespace: str, name: str, *, seen: Obj,
                now: float | None = None) -> None:
    """One look at an operator-owned endpoint's traffic; quiet when nothing changed.

    `seen`: the endpoint as the timer's watch last saw it. An endpoint that cannot be scaled
    and says so already (no Prometheus to ask) costs no read."""
    spec = _due(seen)
    if spec is None:
        return
    blocked = _unreadable(rt, spec)
    said = ((seen.get("status") or {}).get("scaling") or {}).get("reading")
    if blocked is not None and blocked == said:
        return
    now = time.time() if now is None else now
    async with rt.lock(f"{namespace}/{name}"):
        body = await rt.kube.get(Ref(naming.API_VERSION, "OptimizedEndpoint", namespace, name))
        spec = _due(body) if body is not None else None
        last = scale.prior(Endpoint.of(body)) if body is not None else None
        if body is None or spec is None or last is None:
            return
        ep = Endpoint.of(body)
        reading = await _read(rt, ep, spec, str(ep.written["activeConfiguration"]["engine"]))
        if isinstance(reading, str):
            if reading != last.reading:
                ep.put(scaling=last.model_copy(update={"reading": reading}))
                await commit(rt, ep)
            return
        updated = _decide(spec, last, reading, now)
        if updated is None:
            return
        ep.put(scaling=updated)
        if updated.desired_replicas == last.replicas:
            await commit(rt, ep)
            return
        rt.events(ep.body, "Normal", "Scaling",
                  f"{last.replicas} -> {updated.desired_replicas} replicas: {updated.reading}")
        await commit(rt, ep)
        await reconcile.reconcile_locked(rt, ep.ref)


def _decide(spec: OptimizedEndpointSpec, last: ScalingStatus, reading: autoscale.Reading,
            now: float) -> ScalingStatus | None:
    """status.scaling after this reading; None when it would say what it says already."""
    policy = spec.replicas
    current = last.replicas
    room = last.max_replicas if last.max_replicas is not None else current
    wanted = autoscale.recommend(policy, reading, capacity_rps=last.replica_capacity_rps,
                                 current=current, room=room)
    before = [autoscale.Run(since=status.parse_time(r.time).timestamp(), count=r.replicas)
              for r in last.recommendations]
    keep = max(policy.scale_up_stabilization_seconds, policy.scale_down_stabilization_seconds)
    runs = autoscale.record(before, now, wanted, keep_s=keep)
    desired = autoscale.stabilize(policy, runs, now, current)
    if runs == before and desired == last.desired_replicas:
        return None
    cap = last.replica_capacity_rps
    why = (f"{reading.rate_rps:.3g} req/s observed over {policy.window_seconds} s, "
           f"{cap:.3g} req/s per replica at {policy.target_utilization:g} utilization, "
           f"{reading.waiting:.3g} waiting: {wanted} recommended, {desired} after "
           "stabilization")
    return last.model_copy(update={
        "desired_replicas": desired, "observed_rps": round(reading.rate_rps, 4),
        "recommendations": [ScaleRecommendation(time=status.rfc3339(r.since), replicas=r.count)
                            for r in runs],
        "reading": why})


def _unreadable(rt: Runtime, spec: OptimizedEndpointSpec) -> str | None:
    """Why the endpoint has no Prometheus to read, decided without I/O; None when it has."""
    try:
        url = closed_loop.prometheus_url(rt, spec)
    except InputError as err:
        return f"not scaling: {err.field}={err.value!r}: {err.why}"
    if not url:
        return ("not scaling: no Prometheus URL (chart value prometheus.url); the plan's count "
                "stands")
    return None


async def _read(rt: Runtime, ep: Endpoint, spec: OptimizedEndpointSpec,
                engine: str) -> autoscale.Reading | str:
    """The reading, or the sentence saying why there is none."""
    blocked = _unreadable(rt, spec)
    if blocked is not None:
        return blocked
    try:
        url, token = await closed_loop.access(rt, ep, spec)
    except InputError as err:
        return f"not scaling: {err.field}={err.value!r}: {err.why}"
    assert url is not None  # _unreadable said there is one
    scope = promql.scope(engine, closed_loop.selector(ep, spec), spec.replicas.window_seconds)
    try:
        async with PrometheusClient(url, token=token,
                                    timeout_s=closed_loop.PROMETHEUS_TIMEOUT_S) as client:
            rate = (await client.query(promql.request_rate(scope))).value()
            waiting = (await client.query(promql.mean_waiting(scope))).value()
    except (PrometheusError, ValueError) as err:
        return f"not scaling: Prometheus: {err}"
    if rate is None:
        # No series at all is not zero traffic: the engines may not be scraped yet.
        return "not scaling: no request-rate series for the endpoint in Prometheus yet"
    return autoscale.Reading(rate_rps=rate, waiting=waiting or 0.0)
