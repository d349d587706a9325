"""The closed loop: observe an endpoint's traffic in Prometheus, decide, re-plan, roll out.

Runs from the endpoint's periodic timer. The decisions are pure and elsewhere: retune.py's
state machine (drift with hysteresis, SLO violations, cooldown), acceptance.py's minimum
improvement, calibration.py's latency corrections. This module is their I/O shell: it only
gathers their inputs (the estimator's queries, the stored plan, a re-plan in the worker pool,
the clock) and writes the outcome: `status.observedWorkload`, the
MetricsAvailable condition, `status.retune`, `status.retuneHistory`, Events. A rollout reuses
the reconciler's path: the accepted plan is stored for the tuned workload, then reconciled.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import re
import time
from typing import Any

import pydantic

from trilemma.operator import (
    acceptance,
    calibration,
    children,
    naming,
    plans,
    promql,
    reconcile,
    retune,
    retune_history,
    status,
)
from trilemma.operator.drift import WorkloadSummary
from trilemma.operator.endpoint import Endpoint, Outcome, Runtime, commit, live_spec
from trilemma.operator.estimator import (
    MetricsReason,
    ObservedWorkload,
    estimate_workload,
    to_workload_spec,
)
from trilemma.operator.kube import Ref
from trilemma.operator.optimize import plan_request, request_digest
from trilemma.operator.prometheus import PrometheusClient
from trilemma.operator.resources import ConditionType, OptimizedEndpointSpec, TunedWorkload
from trilemma.optimizer import search
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.search import InfeasibleSLO, Plan

Obj = dict[str, Any]
PROMETHEUS_TIMEOUT_S = 5.0
CALIBRATION_REQUESTS = 300


def selector(ep: Endpoint, spec: OptimizedEndpointSpec) -> dict[str, str]:
    """The endpoint's series (promql.endpoint_selector)."""
    return promql.endpoint_selector(ep.namespace, ep.name, spec.prometheus.label_selector)


# A bearer token goes into an HTTP header: visible ASCII only (no CR/LF to inject headers),
# and a bound on its size.
_TOKEN = re.compile(r"^[\x21-\x7e]{1,8192}$")


async def _token(rt: Runtime, ep: Endpoint, spec: OptimizedEndpointSpec) -> str | None:
    """The bearer token the spec names, read only from a Secret of the endpoint's own namespace
    whose name the operator's configuration (the chart, the platform team) allows."""
    ref = spec.prometheus.auth_secret
    if ref is None:
        return None
    if ref.name not in rt.config.prometheus_secret_names:
        allowed = ", ".join(rt.config.prometheus_secret_names) or "none"
        raise InputError("prometheus.authSecret.name", ref.name,
                         "the operator reads only the Secrets the platform team allows "
                         f"(chart value prometheus.authSecretNames: {allowed})")
    secret = await rt.kube.get(Ref("v1", "Secret", ep.namespace, ref.name))
    data = (secret or {}).get("data") or {}
    if ref.key not in data:
        raise InputError("prometheus.authSecret", f"{ref.name}/{ref.key}",
                         "no such Secret key in the endpoint's namespace")
    try:
        token = base64.b64decode(data[ref.key], validate=True).decode("ascii").strip()
    except (ValueError, UnicodeDecodeError):
        token = ""
    if not _TOKEN.match(token):
        # Never the value itself: it is a credential.
        raise InputError("prometheus.authSecret", f"{ref.name}/{ref.key}",
                         "not a bearer token: 1-8192 visible ASCII characters, no spaces or "
                         "line breaks")
    return token


def prometheus_url(rt: Runtime, spec: OptimizedEndpointSpec) -> str | None:
    """Where to query: the operator's URL, or one the spec names from the platform team's
    allow-list. InputError for any other: a spec must not send the operator (and a bearer
    token) to an address of its choosing."""
    if spec.prometheus.url is None:
        return rt.config.prometheus_url
    if not rt.config.allows_prometheus_url(spec.prometheus.url):
        raise InputError("prometheus.url", spec.prometheus.url,
                         "not a Prometheus the operator may query; the platform team allows "
                         "URLs with the chart values prometheus.url and "
                         "prometheus.allowedUrls")
    return spec.prometheus.url


async def access(rt: Runtime, ep: Endpoint, spec: OptimizedEndpointSpec
                 ) -> tuple[str | None, str | None]:
    """(URL, bearer token) of the Prometheus the endpoint's queries go to: URL None when there
    is none; InputError when the spec names one (or a Secret) it may not."""
    url = prometheus_url(rt, spec)
    return url, (await _token(rt, ep, spec) if url else None)


async def observe(rt: Runtime, ep: Endpoint, spec: OptimizedEndpointSpec,
                  engine: str) -> ObservedWorkload | None:
    """The traffic over the retune window, or None (and the condition says why) when there
    is no Prometheus to ask."""
    try:
        url, token = await access(rt, ep, spec)
    except InputError as err:
        ep.condition(ConditionType.METRICS_AVAILABLE, False,
                     MetricsReason.PROMETHEUS_ERROR.value, f"{err.field}={err.value!r}: {err.why}")
        return None
    if not url:
        ep.condition(ConditionType.METRICS_AVAILABLE, False, MetricsReason.MISSING.value,
                     "no Prometheus URL: the operator's TRILEMMA_PROMETHEUS_URL (chart value "
                     "prometheus.url) is not set")
        return None
    async with PrometheusClient(url, token=token, timeout_s=PROMETHEUS_TIMEOUT_S) as client:
        observed = await estimate_workload(client, engine=engine, selector=selector(ep, spec),
                                           window_s=spec.retune.window_seconds)
    ep.put(observed_workload=observed.to_status())
    ep.condition(ConditionType.METRICS_AVAILABLE, observed.availability.ok,
                 observed.availability.reason.value, observed.availability.message)
    return observed


def _due(body: Obj, now: float) -> tuple[OptimizedEndpointSpec, Obj,
                                          retune.RetuneState] | None:
    """(spec, active configuration, retune state) when a traffic check of the endpoint is
    due at `now`; None when it is not (retune off, nothing applied yet, too soon)."""
    spec = live_spec(body)
    if spec is None:
        return None
    written = body.get("status") or {}
    active = written.get("activeConfiguration")
    if not spec.retune.enabled or not active or not active.get("applied"):
        return None
    state = retune.RetuneState.from_status(written.get("retune"))
    return (spec, active, state) if retune.due(state, now, spec.retune) else None


async def check(rt: Runtime, namespace: str, name: str, *, now: float | None = None,
                seen: Obj | None = None) -> None:
    """One periodic look at an endpoint's traffic; re-plans and rolls out when retune.py
    says so. Quiet (no write) when the check is not due.

    `seen`: the endpoint as the caller last saw it (the timer's body, from Kopf's watch).
    When even that says no check is due, the endpoint is not read: most ticks of most
    endpoints end here. (It can only lag: a check it misses is done on the next tick.)"""
    now = time.time() if now is None else now
    if seen is not None and _due(seen, now) is None:
        return
    ref = Ref(naming.API_VERSION, "OptimizedEndpoint", namespace, name)
    async with rt.lock(f"{namespace}/{name}"):
        body = await rt.kube.get(ref)
        due = _due(body, now) if body is not None else None
        if body is None or due is None:
            return
        ep = Endpoint.of(body)
        spec, active, state = due
        observed = await observe(rt, ep, spec, active["engine"])
        if observed is None:
            ep.put(retune=dataclasses.replace(state, last_check=now).to_status())
            await commit(rt, ep)
            return
        await _decide(rt, ep, spec, state, observed, now)


async def _decide(rt: Runtime, ep: Endpoint, spec: OptimizedEndpointSpec,
                  state: retune.RetuneState, observed: ObservedWorkload, now: float) -> None:
    plan = await _stored_plan(rt, ep)
    if plan is None:
        return
    ok = observed.availability.ok
    if ok:
        await _calibrate(rt, ep, spec, plan, observed)
    violations = retune.slo_violations(observed, spec.slo) if ok else []
    rollout = ep.written.get("rollout") or {}
    started = rollout.get("started")
    decision = retune.decide(state, retune.Check(
        now=now, observed=observed, availability=observed.availability.reason,
        planned=WorkloadSummary.of_plan(plan, peak_factor=spec.workload.peak_factor),
        violations=tuple(violations), rolling_out=rollout.get("state") == "Progressing",
        basis=str(ep.written.get("specDigest") or ""),
        serving_since=status.parse_time(started).timestamp() if started else None),
        spec.retune)
    serving = ep.written.get("servingHash")
    history = retune_history.append(ep.written.get("retuneHistory"),
                                    retune_history.RetuneEvent.of_decision(decision, now, serving))
    ep.put(retune_history=history)
    state = decision.state
    kind = "Normal" if decision.action is not retune.Action.HOLD or decision.why in (
        retune.Why.NOT_DUE, retune.Why.COOLDOWN) else "Warning"
    rt.events(ep.body, kind, f"Retune{decision.action.value}", decision.message)
    if decision.action is retune.Action.REPLAN and decision.workload is not None:
        state = await _replan(rt, ep, spec, plan, observed, decision, violations, state, now)
    ep.put(retune=state.to_status())
    await commit(rt, ep)


async def _stored_plan(rt: Runtime, ep: Endpoint) -> Plan | None:
    """The running plan; None when there is none that decodes (nothing to compare with: the
    check waits for the reconciler to store one)."""
    return children.stored_plan(
        await rt.kube.get(Ref("v1", "ConfigMap", ep.namespace, f"{ep.name}-plan")))


async def _replan(rt: Runtime, ep: Endpoint, spec: OptimizedEndpointSpec, stored: Plan,
                  observed: ObservedWorkload, decision: retune.Decision, violations: list[str],
                  state: retune.RetuneState, now: float) -> retune.RetuneState:
    """Plan for the observed workload; roll out if acceptance.accept says the plan is worth it."""
    assert decision.workload is not None
    workload = decision.workload  # narrowed once, for the closures below too
    basis = str(ep.written.get("specDigest") or "")
    thresholds = spec.retune.drift

    def failed(reason: str) -> retune.RetuneState:
        rt.events(ep.body, "Warning", "RetuneFailed", reason)
        ep.put(retune_history=retune_history.append(
            ep.status.get("retuneHistory"), retune_history.RetuneEvent(
                time=now, action=retune_history.Step.KEEP, reason=reason)))
        return retune.record_failure(state, now, workload, reason, thresholds=thresholds,
                                     basis=basis)

    try:
        tuned = spec.model_copy(update={
            "workload": to_workload_spec(observed, base=spec.workload)})
        models = await plans.resolve_models(rt, ep, tuned)
        full_pool = await plans.read_pool(rt.kube, tuned.hardware_pool_ref.name)
        async with rt.ledger.lock:
            avail = await plans.availability(rt, ep, tuned.hardware_pool_ref.name,
                                                 full_pool)
        if avail.pool is None:
            return failed(avail.exhausted_message())
        request = plan_request(plans.calibrated(ep, tuned), models, avail.pool)
        run = await rt.optimizer.run(request)
    except InfeasibleSLO as err:
        return failed(f"no configuration serves the observed workload: {err.why}")
    except (InputError, Outcome) as err:
        rt.metrics.optimization_failed()
        return failed(str(err))
    rt.metrics.optimized(run.seconds)  # a re-plan is a search too: the dashboard counts it
    # The running configuration, re-predicted at the observed workload: the old plan's figures
    # were for the old one, and a fair comparison puts both at the same traffic.
    loop = asyncio.get_running_loop()
    current = await loop.run_in_executor(None, search.predict, stored.recommended.config,
                                         request)
    verdict = acceptance.accept(current, run.plan, spec.objective,
                                spec.retune.min_improvement, bool(violations))
    ep.put(retune_history=retune_history.append(
        ep.status.get("retuneHistory"), retune_history.RetuneEvent.of_acceptance(verdict, now)))
    if not verdict.roll_out or not spec.rollout.auto_apply:
        why = verdict.reason if verdict.roll_out is False else (
            "autoApply is false: the better plan is only recommended")
        rt.events(ep.body, "Normal", "RetuneKept", why)
        return retune.record_failure(state, now, workload, why,
                                     thresholds=thresholds, basis=basis)
    # Store the accepted plan under the tuned request's digest, so that the reconcile below
    # finds it instead of searching again, and record the workload it was made for.
    digest = request_digest(request, models)
    rt.events(ep.body, "Normal", "RetuneRollout", verdict.reason)
    ep.put(tuned_workload=TunedWorkload(spec_digest=basis, workload=tuned.workload),
           last_optimization=plans.optimization(run.plan, digest, run.seconds, reused=False))
    await plans.store_plan(rt, ep, run.plan, digest)
    state = retune.rolled_out(state, now)
    ep.put(retune=state.to_status())
    await commit(rt, ep)
    await reconcile.reconcile_locked(rt, ep.ref)
    return state


async def _calibrate(rt: Runtime, ep: Endpoint, spec: OptimizedEndpointSpec, stored: Plan,
                     observed: ObservedWorkload) -> None:
    """Fold one (predicted, observed) latency pair of the serving configuration into
    status.calibration: its prediction at the observed workload and rate (not the plan's
    design-rate figures) against the p90s Prometheus saw."""
    cal = calibration.Calibration.from_status(ep.written.get("calibration"))
    if observed.samples < calibration.SETTINGS.min_samples:
        return
    try:
        models = await plans.resolve_models(rt, ep, spec)
        full_pool = await plans.read_pool(rt.kube, spec.hardware_pool_ref.name)
        request = acceptance.observed_request(plan_request(spec, models, full_pool),
                                              observed, at_peak=False)
    except (InputError, Outcome, pydantic.ValidationError):
        return  # the reconciler reports spec and pool problems
    loop = asyncio.get_running_loop()
    # A few hundred simulated requests pin a p90 well enough for a smoothed factor, at a
    # fraction of the CPU the re-plan's comparison spends.
    predicted = await loop.run_in_executor(None, functools.partial(
        search.predict, stored.recommended.config, request, requests=CALIBRATION_REQUESTS))
    rollout = ep.written.get("rollout") or {}
    since = (status.parse_time(rollout["started"]).timestamp()
             if rollout.get("started") else None)
    cal = calibration.update(cal, predicted=predicted.choice.prediction,
                             observed=observed, config_hash=ep.written.get("servingHash"),
                             serving_since=since)
    ep.put(calibration=cal.to_status())
