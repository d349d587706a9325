"""From a validated spec to a plan with its GPUs reserved.

The pool (and the hostPath caches it allows), the candidate models (bundled ids, or a
config.json from a ConfigMap), what the pool has left after other endpoints, the stored plan
for the same planning input, or a search in the worker pool; then the plan's GPUs are reserved
in the ledger, planning again if another endpoint took them meanwhile.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import pydantic

from trilemma.operator import apply as applying
from trilemma.operator import calibration, children, naming, pool, status
from trilemma.operator.endpoint import (
    Endpoint,
    Outcome,
    Runtime,
    failed,
    input_message,
    owns,
)
from trilemma.operator.kube import Kube, Ref
from trilemma.operator.optimize import (
    Models,
    model_choice,
    plan_request,
    request_digest,
)
from trilemma.operator.resources import (
    ConditionType,
    EndpointPhase,
    HardwarePoolSpec,
    Optimization,
    OptimizedEndpointSpec,
    TunedWorkload,
)
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.search import InfeasibleSLO, Plan
from trilemma.optimizer.spec import (
    HardwarePool,
    Objective,
    spec_error_to_input_error,
)

Obj = dict[str, Any]
PLAN_ATTEMPTS = 3  # re-plans when another endpoint took the GPUs while this one searched
OPTIMIZING_NOTICE_S = 0.5  # a search still running after this is reported in status


def tuned(ep: Endpoint, spec: OptimizedEndpointSpec) -> OptimizedEndpointSpec:
    """The spec with the workload the closed loop re-planned for, while the spec it was
    observed under stands (a spec change drops it: the user's word is newer)."""
    found = ep.written.get("tunedWorkload")
    try:
        tuned_for = TunedWorkload.model_validate(found) if found else None
    except pydantic.ValidationError:
        tuned_for = None  # unreadable: plan for the spec's own workload
    if tuned_for is None or tuned_for.spec_digest != ep.status.get("specDigest"):
        ep.put(tuned_workload=None)
        return spec
    return spec.model_copy(update={"workload": tuned_for.workload})


def calibrated(ep: Endpoint, spec: OptimizedEndpointSpec) -> OptimizedEndpointSpec:
    """The spec with its latency targets divided by the fitted correction factors: planning
    against them with the model's predictions is planning against corrected predictions."""
    # The status being built: the closed loop may have just updated the factors, and the
    # re-plan it judged must be the plan this reconcile finds.
    cal = calibration.Calibration.from_status(ep.status.get("calibration"))
    return spec.model_copy(update={"slo": calibration.apply(spec.slo, cal)})


async def store_plan(rt: Runtime, ep: Endpoint, plan: Plan, digest: str) -> None:
    """The plan ConfigMap for `plan`, made for the request named by `digest`."""
    await applying.apply(rt.kube, children.plan_config_map(
        ep.owner, plan, request_digest=digest,
        config_hash=plan.recommended.config.config_hash()))


def optimization(plan: Plan, digest: str, seconds: float, *, reused: bool) -> Optimization:
    """status.lastOptimization for `plan`, made (or found) now for the request `digest`."""
    return Optimization(time=status.now_rfc3339(), duration_seconds=round(seconds, 3),
                        candidates=plan.counts.enumerated, request_digest=digest,
                        reused=reused)


def check_host_path(spec: OptimizedEndpointSpec, pool_spec: HardwarePoolSpec) -> None:
    """A hostPath model cache mounts a node directory into a pod: only where the platform team
    allows it, in the (cluster-scoped, admin-owned) pool the endpoint draws from."""
    cache = spec.serving.model_cache
    if cache is None or cache.host_path is None or pool_spec.allows_host_path(cache.host_path):
        return
    allowed = ", ".join(pool_spec.model_cache_host_paths) or "none"
    raise failed("HostPathNotAllowed",
                 f"serving.modelCache.hostPath={cache.host_path!r}: not under a directory "
                 f"HardwarePool {spec.hardware_pool_ref.name} allows in "
                 f"modelCacheHostPaths (allowed: {allowed}); use claimName (a PVC) instead")


async def read_pool(kube: Kube, name: str) -> HardwarePoolSpec:
    found = await kube.get(Ref(naming.API_VERSION, "HardwarePool", None, name))
    if found is None:
        pools = await kube.list(naming.API_VERSION, "HardwarePool")
        known = ", ".join(sorted(p["metadata"]["name"] for p in pools)) or "none"
        raise failed("HardwarePoolNotFound",
                     f"hardwarePoolRef.name={name!r}: no HardwarePool of that name "
                     f"(existing: {known})")
    raw = found.get("spec") or {}
    try:
        return HardwarePoolSpec.model_validate(raw)
    except pydantic.ValidationError as err:
        problems = spec_error_to_input_error(err, raw)
        raise failed("InvalidHardwarePool", f"HardwarePool {name}: {problems}") from None


async def resolve_models(rt: Runtime, ep: Endpoint, spec: OptimizedEndpointSpec) -> Models:
    choices, checkpoints = [], {}
    indexed = spec.model is not None
    for i, ref in enumerate(spec.candidates):
        text = None
        where = "model" if indexed else f"models.{i}"
        if ref.config_map is not None:
            cm = await rt.kube.get(Ref("v1", "ConfigMap", ep.namespace, ref.config_map.name))
            if cm is None:
                raise failed("ModelConfigMapNotFound",
                             f"{where}.configMap.name={ref.config_map.name!r}: no such "
                             f"ConfigMap in namespace {ep.namespace}")
            text = (cm.get("data") or {}).get(ref.config_map.key)
            if text is None:
                raise failed("ModelConfigMapNotFound",
                             f"{where}.configMap.key={ref.config_map.key!r}: ConfigMap "
                             f"{ref.config_map.name} has no such key")
        try:
            # Off the event loop: a config.json of up to 1 MiB is parsed and written.
            choice, served = await asyncio.to_thread(model_choice, ref, None if indexed else i,
                                                     text, Path(rt.config.cache_dir))
        except InputError as err:
            raise failed("UnknownModel", input_message(err)) from None
        choices.append(choice)
        checkpoints[choice.id] = served
    return Models(choices=choices, checkpoints=checkpoints)


async def availability(rt: Runtime, ep: Endpoint, pool_name: str, full_pool: HardwarePool,
                       *, beside: dict[str, int] | None = None) -> pool.Availability:
    """Called under the ledger's lock. `beside`: GPUs of the endpoint's own that stay taken
    (the configuration serving while a new one rolls out next to it)."""
    if not rt.ledger.seeded:
        rt.ledger.seed(await rt.kube.list(naming.API_VERSION, "OptimizedEndpoint"))
    held = rt.ledger.others(pool_name, ep.key)
    if beside:
        held = {**held, f"{ep.key} (serving)": Counter(beside)}
    return pool.available(full_pool, held)


async def plan_and_reserve(rt: Runtime, ep: Endpoint, spec: OptimizedEndpointSpec, models: Models,
                           full_pool: HardwarePool) -> tuple[Plan, str, Optimization]:
    """The plan for the endpoint, its request digest and the lastOptimization status.

    Plans against what the pool has left, then reserves the plan's GPUs; if another endpoint
    reserved them meanwhile, plans again (a few times) with what is left then.
    """
    pool_name = spec.hardware_pool_ref.name
    for _ in range(PLAN_ATTEMPTS):
        async with rt.ledger.lock:
            avail = await availability(rt, ep, pool_name, full_pool)
        if avail.pool is None:
            raise Outcome(EndpointPhase.INFEASIBLE, ConditionType.OPTIMIZED, "PoolExhausted",
                          avail.exhausted_message())
        try:
            request = plan_request(spec, models, avail.pool)
        except InputError as err:
            raise Outcome(EndpointPhase.INFEASIBLE, ConditionType.OPTIMIZED, "PoolExhausted",
                          f"{input_message(err)} (other endpoints hold the rest of the pool: "
                          f"{', '.join(sorted(avail.held)) or 'none'})") from None
        digest = request_digest(request, models)
        plan, made = await _stored_plan(rt, ep, digest)
        if plan is None or made is None:
            plan, made = await _search(rt, ep, request, digest, avail)
        gpus = status.config_gpus(plan.recommended.config)
        async with rt.ledger.lock:
            now = await availability(rt, ep, pool_name, full_pool)
            if pool.fits(gpus, now):
                rt.ledger.reserve(pool_name, ep.key, gpus)
                return plan, digest, made
    raise Outcome(EndpointPhase.INFEASIBLE, ConditionType.OPTIMIZED, "PoolContention",
                  f"other endpoints took the planned GPUs {PLAN_ATTEMPTS} times in a row; "
                  "will retry on the next change")


async def _stored_plan(rt: Runtime, ep: Endpoint,
                       digest: str) -> tuple[Plan | None, Optimization | None]:
    cm = await rt.kube.get(Ref("v1", "ConfigMap", ep.namespace, f"{ep.name}-plan"))
    ep.seen[f"ConfigMap/{ep.name}-plan"] = cm
    if cm is None or not owns(ep, cm):
        return None, None  # not ours: never read (and applying the plan reports the conflict)
    notes = cm.get("metadata", {}).get("annotations") or {}
    if notes.get(naming.ANNOTATION_REQUEST_DIGEST) != digest:
        return None, None
    plan = children.stored_plan(cm)
    if plan is None:
        # Unreadable (another format, edited): plan again, and store the plan again even when
        # it is the same one, which its applied-hash annotation would take as up to date.
        ep.seen[f"ConfigMap/{ep.name}-plan"] = applying.without_hash(cm)
        return None, None
    previous = ep.written.get("lastOptimization") or {}
    if previous.get("requestDigest") == digest:
        try:
            return plan, Optimization.model_validate(previous)
        except pydantic.ValidationError:
            pass  # written by another version: said again below
    return plan, optimization(plan, digest, 0.0, reused=True)


async def _search(rt: Runtime, ep: Endpoint, request: Any, digest: str,
                  avail: pool.Availability) -> tuple[Plan, Optimization]:
    search = asyncio.ensure_future(rt.optimizer.run(request))
    # Say "Optimizing" only when the search takes long enough to be seen doing so: a quick
    # one (a small space, a warm cache) goes straight to its result, one write instead of two.
    done, _ = await asyncio.wait({search}, timeout=OPTIMIZING_NOTICE_S)
    if not done:
        ep.phase(EndpointPhase.OPTIMIZING, "searching the configuration space")
        ep.condition(ConditionType.OPTIMIZED, None, "Optimizing", "search running")
        # Not the spec digest yet: it marks a finished reconcile.
        done_marker = ep.status.get("specDigest")
        ep.put(spec_digest=None)
        await ep.commit(rt.kube)
        ep.put(spec_digest=done_marker)
    try:
        run = await search
    except InfeasibleSLO as err:
        rt.metrics.optimization_failed()
        others = ", ".join(sorted(avail.held))
        held = f" Other endpoints hold part of the pool: {others}." if others else ""
        nearest = await _nearest_with_more_gpus(rt, request) if err.binding == "pool" else ""
        raise Outcome(EndpointPhase.INFEASIBLE, ConditionType.OPTIMIZED,
                      "PoolTooSmall" if err.binding in ("pool", "budget") else "SLOUnreachable",
                      err.why + held + nearest) from None
    except InputError as err:
        rt.metrics.optimization_failed()
        raise failed("OptimizationFailed", input_message(err),
                     ConditionType.OPTIMIZED) from None
    rt.metrics.optimized(run.seconds)
    rec = run.plan.recommended
    p = rec.prediction
    rt.events(ep.body, "Normal", "Planned",
              f"{rec.config.summary()}: ${p.cost_per_hour:.2f}/h, TTFT p90 "
              f"{p.ttft_p90_ms:.0f} ms, TPOT p90 {p.tpot_p90_ms:.1f} ms "
              f"({run.seconds:.1f} s search)")
    return run.plan, optimization(run.plan, digest, run.seconds, reused=False)


# How much larger than the available pool the "nearest feasible" search may look.
NEAREST_POOL_FACTOR = 8


async def _nearest_with_more_gpus(rt: Runtime, request: Any) -> str:
    """For a pool too small: the cheapest configuration that would meet the SLO with more
    GPUs of the same types, and how many it needs (one more search), as a sentence."""
    bigger = request.hardware.model_copy(update={"gpus": [
        g.model_copy(update={"count": g.count * NEAREST_POOL_FACTOR})
        for g in request.hardware.gpus]})
    try:
        run = await rt.optimizer.run(request.model_copy(update={
            "hardware": bigger, "objective": Objective.MIN_COST}))
    except InputError:
        return (f" Even {NEAREST_POOL_FACTOR}x the available GPUs would not meet it.")
    rec = run.plan.recommended
    offered = {g.gpu: g.count for g in request.hardware.gpus}
    needs = status.config_gpus(rec.config).items()
    return (f" Nearest feasible: {rec.config.summary()} (${rec.prediction.cost_per_hour:.2f}/h)"
            f" needs {' + '.join(f'{n} {gpu}' for gpu, n in needs)}; "
            f"{' + '.join(f'{offered.get(gpu, 0)} {gpu}' for gpu, _ in needs)} available.")

