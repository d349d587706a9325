"""The replica count a reconcile deploys: decided (replicas.py), fitted into the pool, recorded.

The plan reserved the GPUs of its own count; the count deployed may differ (the scaler's, an
HPA's, one carried over from the previous configuration), so the reservation is redone for it,
capped by the room the pool has beside other endpoints. status.scaling records the count, who
owns it and the per-replica capacity, and `status.replicas` / `status.selector` are what the
scale subresource shows HPA, KEDA and `kubectl scale`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import pydantic

from trilemma.operator import plans, pool, replicas, status
from trilemma.operator.endpoint import Endpoint, Runtime
from trilemma.operator.endpoint_status import ScalingStatus
from trilemma.operator.resources import (
    MAX_REPLICAS,
    HardwarePoolSpec,
    OptimizedEndpointSpec,
    ReplicaOwner,
)
from trilemma.optimizer.search import Choice, ServingConfig

Obj = dict[str, Any]


@dataclass(frozen=True)
class Sized:
    """The plan's recommendation at the count to deploy, and status.scaling for it."""

    choice: Choice
    scaling: ScalingStatus


def prior(ep: Endpoint) -> ScalingStatus | None:
    """status.scaling as last written; None when absent or unreadable (another version)."""
    found = ep.written.get("scaling")
    try:
        return ScalingStatus.model_validate(found) if found else None
    except pydantic.ValidationError:
        return None


def layout_hash(config: ServingConfig, served_model: str) -> str:
    """The hash naming the configuration's children (render.layout's: the served model in
    place of the planned one, replica counts left out)."""
    if served_model != config.model:
        config = dataclasses.replace(config, model=served_model)
    return config.layout_hash()


async def size(rt: Runtime, ep: Endpoint, spec: OptimizedEndpointSpec,
               full_pool: HardwarePoolSpec, choice: Choice, served_model: str) -> Sized:
    """Decide the count, reserve its GPUs (no more than the pool has room for) and return the
    choice scaled to it. Called after plans.plan_and_reserve, which reserved the plan's."""
    policy = spec.replicas
    config = choice.config
    key = layout_hash(config, served_model)
    capacity = replicas.unit_capacity(choice)
    last = prior(ep)
    want = replicas.decide(policy, plan_replicas=config.replicas, layout_hash=key,
                           capacity=capacity, prior=last)
    name = spec.hardware_pool_ref.name
    serving, beside = _serving_beside(ep, spec, key)
    async with rt.ledger.lock:
        avail = await plans.availability(rt, ep, name, full_pool, beside=beside)
        room = _room(config, avail, ceiling=policy.max_replicas or MAX_REPLICAS,
                     floor=not beside)
        crowded = room == 0 and bool(beside)
        if crowded:
            # Not one replica fits beside: size as if the serving configuration were gone
            # (a known gap: on a real cluster its pods wait for GPUs the old one holds, and
            # the rollout is rolled back at its deadline; a replacement that shrinks the old
            # configuration first is not built).
            avail = await plans.availability(rt, ep, name, full_pool)
            room = _room(config, avail, ceiling=policy.max_replicas or MAX_REPLICAS)
        count = min(want.replicas, room)
        rt.ledger.reserve(name, ep.key, status.config_gpus(replicas.scaled(config, count)))
    held_back = bool(beside) and not crowded and count < want.replicas
    why = want.why
    if crowded:
        why += (f"; not one replica fits beside configuration {serving} ({_gpus(beside)}), "
                "which serves until this one is available: the pool has room for it only "
                "once that one is gone")
    elif count < want.replicas:
        why += (f"; {count} fit beside configuration {serving} while it serves the rollout "
                "(the count follows once the Service has moved)" if beside else
                f"; the pool has room for {count} (other endpoints hold the rest)")
    if policy.owner is ReplicaOwner.OPERATOR and policy.count is not None:
        why += (f"; replicas.count={policy.count} is ignored while replicas.owner is "
                "operator")
    operator_owned = policy.owner is ReplicaOwner.OPERATOR
    top = room if policy.max_replicas is None else min(room, policy.max_replicas)
    kept = last if last is not None and last.layout_hash == key else None
    scaling = ScalingStatus(
        owner=policy.owner.value, replicas=count, layout_hash=key,
        replica_capacity_rps=round(capacity, 4),
        min_replicas=policy.min_replicas if operator_owned else None,
        max_replicas=top,
        spec_count=policy.count if not operator_owned else None,
        desired_replicas=kept.desired_replicas if operator_owned and kept else None,
        observed_rps=kept.observed_rps if kept else None,
        reading=kept.reading if operator_owned and kept else "",
        recommendations=list(kept.recommendations) if operator_owned and kept else [],
        last_scale_time=(status.now_rfc3339() if last is None or last.replicas != count
                         else last.last_scale_time),
        message=why[:1024], held_back_beside=serving if held_back else None)
    return Sized(choice=_scaled_choice(choice, count), scaling=scaling)


def held_back(body: Obj) -> bool:
    """Whether the endpoint's count was held back beside a configuration that no longer
    serves (the rollout is done): the next reconcile deploys the count it wanted."""
    st = body.get("status") or {}
    beside = (st.get("scaling") or {}).get("heldBackBeside")
    return beside is not None and st.get("servingHash") not in (None, beside)


def _serving_beside(ep: Endpoint, spec: OptimizedEndpointSpec,
                    key: str) -> tuple[str | None, dict[str, int]]:
    """The configuration serving now and its GPUs, where deploying `key` rolls out beside it
    (a new layout: rollout.py keeps the old one serving until the new one is available);
    else (None, {}). A replica-only change scales in place, and recommend-only deploys
    nothing, so neither needs room beside anything."""
    serving = ep.written.get("servingHash")
    if not spec.rollout.auto_apply or serving in (None, key):
        return None, {}
    held = {g: n for g, n in ep.gpus_of(serving).items() if n > 0}
    return (serving, held) if held else (None, {})


def _gpus(counts: dict[str, int]) -> str:
    return " + ".join(f"{n} {g}" for g, n in sorted(counts.items()) if n > 0)


def _room(config: ServingConfig, avail: pool.Availability, *, ceiling: int,
          floor: bool = True) -> int:
    """The most replicas of `config` the pool has room for, up to `ceiling`. `floor`: at
    least the count already reserved for the plan (it fit a moment ago); not beside a
    serving configuration, which the plan did not count."""
    fitting = 0
    for n in range(1, min(max(ceiling, 1), MAX_REPLICAS) + 1):
        if not pool.fits(status.config_gpus(replicas.scaled(config, n)), avail):
            break
        fitting = n
    return max(fitting, min(config.replicas, ceiling)) if floor else fitting


def _scaled_choice(choice: Choice, count: int) -> Choice:
    """The choice at `count` replicas: its cost follows its GPUs; the latency predictions
    are the plan's (made at the planned rate; each replica serves its share of it)."""
    config = replicas.scaled(choice.config, count)
    if config == choice.config:
        return choice
    share = config.gpus / choice.config.gpus if choice.config.gpus else 0.0
    p = choice.prediction
    prediction = dataclasses.replace(p, cost_per_hour=p.cost_per_hour * share,
                                     capacity_rps=p.capacity_rps * count
                                     / max(choice.config.replicas, 1))
    return Choice(config=config, prediction=prediction)


def selector(service: Obj | None) -> str | None:
    """A Service's selector as the label-selector string the scale subresource reports."""
    chosen = (service or {}).get("spec", {}).get("selector") or {}
    return ",".join(f"{k}={v}" for k, v in sorted(chosen.items())) or None


def count_changed(body: Obj) -> bool:
    """Whether an externally owned count differs from the one last deployed: a reconcile for
    it is due even though the spec's digest (which leaves the count out) is unchanged."""
    wanted = (body.get("spec") or {}).get("replicas") or {}
    if wanted.get("owner") != ReplicaOwner.EXTERNAL.value:
        return False
    written = (body.get("status") or {}).get("scaling") or {}
    return bool(wanted.get("count") != written.get("specCount")
                or written.get("owner") != ReplicaOwner.EXTERNAL.value)
