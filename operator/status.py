"""Status of an OptimizedEndpoint: conditions, the active plan, the front.

Pure functions of the (typed) plan and the previous status, so that a reconcile that changes nothing
writes nothing (a condition keeps its lastTransitionTime while its status holds).
"""

from __future__ import annotations

import datetime
from typing import Any

from trilemma.operator.resources import (
    ActiveConfiguration,
    Condition,
    ConditionType,
    FrontPoint,
    Predictions,
    to_wire,
)
from trilemma.optimizer.search import Choice, Mode, Plan, ServingConfig

Obj = dict[str, Any]
FRONT_POINTS = 8


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat().replace(
        "+00:00", "Z")


def rfc3339(unix_s: float) -> str:
    """`unix_s` as status writes times: RFC 3339, UTC, whole seconds."""
    stamp = datetime.datetime.fromtimestamp(int(unix_s), datetime.UTC)
    return stamp.isoformat().replace("+00:00", "Z")


def parse_time(text: str) -> datetime.datetime:
    return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))


def set_condition(conditions: list[Obj], kind: ConditionType, ok: bool | None, reason: str,
                  message: str, *, generation: int | None, now: str) -> list[Obj]:
    """`conditions` with `kind` set; lastTransitionTime changes only when the status does."""
    status = "Unknown" if ok is None else ("True" if ok else "False")
    previous = next((c for c in conditions if c.get("type") == kind.value), None)
    since = previous["lastTransitionTime"] if previous and previous.get(
        "status") == status else now
    new = to_wire(Condition(type=kind, status=status, reason=reason, message=message,
                            last_transition_time=since, observed_generation=generation))
    out = [c for c in conditions if c.get("type") != kind.value] + [new]
    order = [t.value for t in ConditionType]
    return sorted(out, key=lambda c: order.index(c["type"]) if c["type"] in order else 99)


def short_summary(config: ServingConfig) -> str:
    """The printer column's form of a configuration: the (decode) worker's own summary,
    e.g. "fp8 TP2 eagle3x3", marked "disagg" for prefill/decode plans and "+N type(s)" for
    plans spanning GPU types (the GPU column names the worker's)."""
    disagg = " disagg" if config.mode is Mode.DISAGGREGATED else ""
    more = len(config.gpus_by_type()) - 1
    return config.worker.summary() + disagg + (
        f" +{more} type{'s' if more > 1 else ''}" if more else "")


def config_gpus(config: ServingConfig) -> dict[str, int]:
    """GPUs a configuration holds, by type (a mixed plan holds several: the pool's accounting
    and the ledger count each type apart)."""
    return config.gpus_by_type()


def config_gpus_from_active(active: Obj | None) -> dict[str, int]:
    """GPUs the status's active configuration holds, by type."""
    if not active:
        return {}
    by_type = active.get("gpusByType")
    if by_type:
        return {str(g): int(n) for g, n in by_type.items()}
    return {active["gpu"]: int(active["gpus"])}


def active_configuration(choice: Choice, *, config_hash: str, served_model: str,
                         engine_args: list[str], applied: bool) -> ActiveConfiguration:
    config = choice.config
    return ActiveConfiguration(
        hash=config_hash, summary=config.summary(), short=short_summary(config),
        model=served_model, engine=config.engine, gpu=config.worker.gpu,
        gpus=sum(config_gpus(config).values()),
        gpus_by_type=by_type if len(by_type := config_gpus(config)) > 1 else None,
        replicas=config.replicas,
        engine_args=engine_args, applied=applied)


def predictions(choice: Choice) -> Predictions:
    # Rounded as stored plans round them (to 6 digits) first: the status of a plan read back
    # from its ConfigMap must be the status of the plan that wrote it, digit for digit.
    p = choice.prediction.to_dict()
    return Predictions(
        ttft_p90_ms=round(p["ttft_p90_ms"], 3), tpot_p90_ms=round(p["tpot_p90_ms"], 3),
        capacity_rps=round(p["capacity_rps"], 3), cost_per_hour=round(p["cost_per_hour"], 4),
        cost_per_million_tokens=round(p["cost_per_mtok"], 4),
        quality=None if p["quality"] is None else round(p["quality"], 2),
        simulated=bool(p["simulated"]))


def pareto_front(plan: Plan) -> list[FrontPoint]:
    """At most 8 points of the plan's front, cheapest first, the recommendation kept."""
    front = plan.front
    best = plan.recommended.config.config_hash()
    if len(front) > FRONT_POINTS:
        # Keep the ends and spread the rest evenly; never drop the recommendation.
        step = (len(front) - 1) / (FRONT_POINTS - 1)
        picked = sorted({round(i * step) for i in range(FRONT_POINTS)})
        chosen = [front[i] for i in picked]
        if not any(c.config.config_hash() == best for c in chosen):
            chosen[len(chosen) // 2] = next(c for c in front if c.config.config_hash() == best)
        front = sorted(chosen, key=lambda c: c.prediction.cost_per_hour)
    return [_front_point(c, best) for c in front]


def _front_point(choice: Choice, best: str) -> FrontPoint:
    p = choice.prediction.to_dict()  # rounded as stored: see predictions()
    config_hash = choice.config.config_hash()
    return FrontPoint(
        hash=config_hash, summary=choice.config.summary(),
        ttft_p90_ms=round(p["ttft_p90_ms"], 3), tpot_p90_ms=round(p["tpot_p90_ms"], 3),
        capacity_rps=round(p["capacity_rps"], 3), cost_per_hour=round(p["cost_per_hour"], 4),
        recommended=config_hash == best)


def patch_for(current: Obj, desired: Obj, owned: list[str]) -> Obj:
    """A merge patch taking the operator-owned status keys from `current` to `desired`:
    changed keys set, vanished keys nulled, at every depth (a JSON merge patch merges nested
    objects, so a key dropped inside one must be sent as null or it stays); empty when
    nothing changes."""
    return _diff({k: current.get(k) for k in owned if k in current},
                 {k: desired.get(k) for k in owned if k in desired})


def _diff(current: Obj, desired: Obj) -> Obj:
    patch: Obj = {}
    for key in current.keys() - desired.keys():
        patch[key] = None
    for key, want in desired.items():
        have = current.get(key)
        if have == want:
            continue
        if isinstance(have, dict) and isinstance(want, dict):
            patch[key] = _diff(have, want)
        else:
            patch[key] = want
    return patch
