"""The reconciler: one OptimizedEndpoint from spec to running children and written status.

validate -> resolve the pool (minus GPUs other endpoints hold) -> plan (in a worker thread,
or reuse the stored plan for the same input) -> render -> apply the children -> status.
Rollouts: a new configuration gets its own hashed Deployment; the Service moves to it only
when it is available, then the old one goes (`advance`). Bad input ends in phase Failed or
Infeasible with the cause in status and an Event, never in an exception loop.

This module is the sequence; its rooms: endpoint.py (the resource, settings, outcomes),
plans.py (pool, models, plan and GPU reservation), rollout.py (children and rollouts).
"""

from __future__ import annotations

import re
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import pydantic

from trilemma.operator import apply as applying
from trilemma.operator import children, keda, scale, status
from trilemma.operator.endpoint import (
    Endpoint,
    Outcome,
    RetryLater,
    Runtime,
    api_refusal,
    commit,
    failed,
    input_message,
    is_transient,
    spec_digest,
    together,
)
from trilemma.operator.kube import KubeError, Ref
from trilemma.operator.optimize import Models, plan_request
from trilemma.operator.plans import (
    calibrated,
    check_host_path,
    plan_and_reserve,
    read_pool,
    resolve_models,
    tuned,
)
from trilemma.operator.resources import (
    ConditionType,
    EndpointPhase,
    HardwarePoolSpec,
    Optimization,
    OptimizedEndpointSpec,
    ReplicaOwner,
    RolloutState,
)
from trilemma.operator.rollout import delete_owned, deploy
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.search import Choice, Plan
from trilemma.optimizer.spec import spec_error_to_input_error

Obj = dict[str, Any]
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


async def reconcile(rt: Runtime, body: Obj, *, force: bool = True) -> None:
    """Bring one endpoint to its spec. Raises only for transient API errors (Kopf retries).

    `force=False` (create and update events) returns at once when the status already
    describes this exact spec: an event replayed after the work is done changes nothing.
    """
    ep = Endpoint.of(body)
    async with rt.lock(ep.key):
        await reconcile_locked(rt, ep.ref, force=force)


async def reconcile_locked(rt: Runtime, ref: Ref, *, force: bool = True) -> None:
    """`reconcile`, for a caller that holds the endpoint's lock already."""
    # The event's body may predate this operator's own status writes (made by another
    # handler while this one waited for the lock): work from the object as it is now.
    fresh = await rt.kube.get(ref)
    if fresh is None or fresh.get("metadata", {}).get("deletionTimestamp"):
        return
    ep = Endpoint.of(fresh)
    digest = spec_digest(fresh)
    if not force and ep.written.get("specDigest") == digest and not scale.count_changed(fresh):
        return
    ep.put(spec_digest=digest)
    try:
        try:
            await _reconcile(rt, ep)
        except KubeError as err:
            if is_transient(err):
                raise
            raise api_refusal(err) from None
        except applying.NotOwned as err:
            raise Outcome(EndpointPhase.FAILED, ConditionType.DEPLOYED, "Conflict",
                          f"{err}: the operator neither changes nor adopts it; rename or "
                          "remove it, or rename the endpoint", retry=True) from None
        rt.metrics.reconciled("ok")
    except Outcome as out:
        ep.phase(out.phase, out.message)
        ep.condition(out.condition, False, out.reason, out.message)
        ep.put(observed_generation=ep.generation)
        if out.retry:
            # Not "done for this spec": the retry (or a replayed event) must do the work.
            ep.put(spec_digest=None)
        # Whatever was reserved for this attempt is free again: a refused endpoint holds
        # no GPUs that another one could use.
        rt.ledger.release(ep.pool_name, ep.key)
        await commit(rt, ep)
        rt.events(ep.body, "Warning", out.reason, out.message)
        rt.metrics.reconciled(out.phase.value.lower())
        rt.metrics.error(out.reason)
        if out.retry:
            raise RetryLater(f"{out.reason}: {out.message}") from None
    finally:
        rt.metrics.endpoint_phase(ep.key, ep.status.get("phase"))
        rt.metrics.endpoint_status(ep.key, ep.status)


@dataclass(frozen=True)
class Target:
    """What the plan deploys here: its configuration, rendered for this endpoint."""

    choice: Choice
    served: str  # the checkpoint the engine loads
    kids: children.Children
    engine_args: list[str]
    plan_map: Obj  # the plan ConfigMap

    @property
    def config_hash(self) -> str:
        return self.kids.config_hash


async def _reconcile(rt: Runtime, ep: Endpoint) -> None:
    spec, full_pool, models = await _validate(rt, ep)
    plan, digest, optimization = await plan_and_reserve(rt, ep, spec, models, full_pool)
    planned = plan.recommended.config
    sized = await scale.size(rt, ep, spec, full_pool, plan.recommended,
                             models.checkpoints.get(planned.model, planned.model))
    target = _render(ep, spec, full_pool, models, plan, digest, sized.choice,
                     sample=_keda_sample(rt, ep, spec, sized))
    _record_plan(ep, spec, plan, optimization, target, sized)
    key = f"ConfigMap/{target.plan_map['metadata']['name']}"
    # A new endpoint: no plan ConfigMap (read while planning) and no status about children.
    # Its children are then created side by side, none of them read first.
    new = key in ep.seen and ep.seen[key] is None and not any(
        ep.written.get(k) for k in ("servingHash", "rollout", "activeConfiguration"))

    async def write_plan() -> None:
        if key in ep.seen:
            await applying.apply(rt.kube, target.plan_map, current=ep.seen[key])
        else:
            await applying.apply(rt.kube, target.plan_map)

    if not spec.rollout.auto_apply:
        ep.phase(EndpointPhase.PENDING, f"recommend-only (autoApply false): "
                                f"{target.choice.config.summary()}; the plan is in ConfigMap "
                                f"{ep.name}-plan")
        ep.condition(ConditionType.DEPLOYED, False, "RecommendOnly",
                     "autoApply is false: nothing was deployed or changed")
        await write_plan()
    elif _failed_before(ep, target, digest):
        # This exact plan already failed to become ready; retrying it would fail the same way.
        ep.condition(ConditionType.DEPLOYED, False, "RolloutFailed",
                     (ep.status.get("rollout") or {}).get("message", ""))
        await write_plan()
    else:
        await _deploy(rt, ep, spec, target, write_plan(), new=new)
    await _finish(rt, ep, spec)


async def _validate(rt: Runtime, ep: Endpoint) -> tuple[OptimizedEndpointSpec, HardwarePoolSpec,
                                                         Models]:
    """The spec (tuned and calibrated), its pool and models, checked against each other."""
    spec = _validate_spec(ep)
    spec = calibrated(ep, tuned(ep, spec))
    full_pool = await read_pool(rt.kube, spec.hardware_pool_ref.name)
    check_host_path(spec, full_pool)
    models = await resolve_models(rt, ep, spec)
    # Rules that only the whole document can check (bounds vs pool) first against the whole
    # pool: breaking them is the spec's fault, not the other endpoints'.
    try:
        plan_request(spec, models, full_pool)
    except InputError as err:
        raise failed("InvalidSpec", input_message(err)) from None
    ep.condition(ConditionType.VALIDATED, True, "Valid", "spec, pool and models check out")
    return spec, full_pool, models


def _render(ep: Endpoint, spec: OptimizedEndpointSpec, full_pool: HardwarePoolSpec,
            models: Models, plan: Plan, digest: str, choice: Choice, *,
            sample: Obj | None = None) -> Target:
    """The children of `choice`: the plan's recommendation at the count to deploy."""
    config = choice.config
    served = models.checkpoints.get(config.model, config.model)
    group = full_pool.group(config.worker.gpu)
    # The other GPU types' groups: a mixed plan's parts, a crossed plan's prefill.
    others = tuple(full_pool.group(gpu) for gpu in config.gpus_by_type()
                   if gpu != config.worker.gpu)
    try:
        kids = children.build(config, spec, ep.owner, group, served_model=served,
                              e2e_p99_ms=choice.prediction.e2e_p99_ms, other_groups=others)
    except InputError as err:
        raise failed("RenderFailed", input_message(err), ConditionType.OPTIMIZED) from None
    engine_args = next(c["args"] for w in kids.workloads for c in _containers(w)
                       if c["name"] == "engine")
    plan_map = children.plan_config_map(ep.owner, plan, request_digest=digest,
                                        config_hash=kids.config_hash, keda=sample)
    return Target(choice=choice, served=served, kids=kids,
                  engine_args=list(engine_args), plan_map=plan_map)


def _record_plan(ep: Endpoint, spec: OptimizedEndpointSpec, plan: Plan,
                 optimization: Optimization, target: Target, sized: scale.Sized) -> None:
    """The plan's part of status: what was planned, predicted and (to be) deployed, at the
    count deployed (predictions stay the plan's, made for its count at the planned rate)."""
    choice = target.choice
    applied = spec.rollout.auto_apply
    ep.put(scaling=sized.scaling, replicas=sized.scaling.replicas if applied else 0,
           selector=scale.selector(target.kids.services[0] if target.kids.services else None))
    ep.put(last_optimization=optimization, predictions=status.predictions(plan.recommended),
           pareto_front=status.pareto_front(plan), observed_generation=ep.generation)
    ep.condition(ConditionType.OPTIMIZED, True,
                 "PlanReused" if optimization.reused else "Planned",
                 f"{choice.config.summary()}: {optimization.candidates} configurations "
                 f"searched")
    ep.put(active_configuration=status.active_configuration(
        choice, config_hash=target.config_hash, served_model=target.served,
        engine_args=target.engine_args, applied=spec.rollout.auto_apply),
        cost_per_hour=round(choice.prediction.cost_per_hour, 4))


def _keda_sample(rt: Runtime, ep: Endpoint, spec: OptimizedEndpointSpec,
                 sized: scale.Sized) -> Obj | None:
    """With replicas.owner external, the ScaledObject the plan ConfigMap offers; it names
    the spec's Prometheus only where the operator could query it too (else the operator's)."""
    if spec.replicas.owner is not ReplicaOwner.EXTERNAL:
        return None
    url = spec.prometheus.url
    if url is None or not rt.config.allows_prometheus_url(url):
        url = rt.config.prometheus_url
    return keda.scaled_object(ep.name, ep.namespace, spec, prometheus_url=url,
                              max_replicas=sized.scaling.max_replicas)


def _failed_before(ep: Endpoint, target: Target, digest: str) -> bool:
    """Whether this exact plan already failed to roll out (and the request is unchanged)."""
    rollout = ep.status.get("rollout") or {}
    return (rollout.get("state") == RolloutState.FAILED.value
            and rollout.get("toHash") == target.config_hash
            and (ep.written.get("lastOptimization") or {}).get("requestDigest") == digest)


async def _deploy(rt: Runtime, ep: Endpoint, spec: OptimizedEndpointSpec, target: Target,
                  write_plan: Coroutine[Any, Any, None], *, new: bool) -> None:
    kids = target.kids
    gpus = status.config_gpus(target.choice.config)
    if not new:
        await write_plan
        await deploy(rt, ep, spec, kids, gpus)
        return
    try:
        await together(write_plan, deploy(rt, ep, spec, kids, gpus, new=True))
    except (applying.NotOwned, KubeError) as err:
        if isinstance(err, KubeError) and is_transient(err):
            raise
        # Created side by side, so one child's conflict or refusal may come after the
        # others exist: a new endpoint that failed keeps nothing it made (no GPUs held).
        await delete_owned(rt.kube, ep, kids.owned())
        raise


async def _finish(rt: Runtime, ep: Endpoint, spec: OptimizedEndpointSpec) -> None:
    await commit(rt, ep)
    # The status now records what this endpoint holds; the reservation has done its job.
    rt.ledger.release(spec.hardware_pool_ref.name, ep.key)


def _containers(workload: Obj) -> list[Obj]:
    spec = workload["spec"]
    if workload["kind"] == "Deployment":
        return list(spec["template"]["spec"]["containers"])
    return list(spec["leaderWorkerTemplate"]["leaderTemplate"]["spec"]["containers"])


def _validate_spec(ep: Endpoint) -> OptimizedEndpointSpec:
    if len(ep.name) > children.MAX_NAME or not _DNS_LABEL.match(ep.name):
        raise failed("InvalidName", f"metadata.name={ep.name!r}: must be a DNS label of at "
                                     f"most {children.MAX_NAME} characters, because the "
                                     "children's names and labels append to it")
    raw = ep.body.get("spec") or {}
    try:
        return OptimizedEndpointSpec.model_validate(raw)
    except pydantic.ValidationError as err:
        raise failed("InvalidSpec", str(spec_error_to_input_error(err, raw))) from None

