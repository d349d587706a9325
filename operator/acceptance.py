"""Re-planning for observed traffic: the request to plan for, and whether the new plan's
recommendation should replace the running configuration.

Pure: the closed loop (closed_loop.py) runs the search and the re-prediction, this module
judges their results. Both sides are typed: the running configuration re-predicted at the new
workload (search.Predicted) and the new Plan.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from trilemma.operator import estimator
from trilemma.operator.estimator import ObservedWorkload
from trilemma.optimizer.search import Plan, Predicted, Prediction
from trilemma.optimizer.spec import Objective, PlanRequest


def observed_request(request: PlanRequest, observed: ObservedWorkload, *,
                     at_peak: bool = True) -> PlanRequest:
    """`request` with its workload replaced by the observed one (estimator.to_workload_spec,
    which keeps the spec's peak factor and predictability). `at_peak=False` plans for the
    observed mean rate itself: what calibration compares observed latencies with."""
    workload = estimator.to_workload_spec(observed, base=request.workload)
    if not at_peak:
        workload = workload.model_copy(update={"peak_factor": 1.0})
    data = request.model_dump(by_alias=True, mode="json", exclude_none=True)
    data["workload"] = workload.model_dump(by_alias=True, mode="json", exclude_none=True)
    # Validated again: the document-wide rules see the new workload.
    return PlanRequest.model_validate(data)


@dataclass(frozen=True, kw_only=True)
class Acceptance:
    roll_out: bool
    reason: str
    improvement: float | None  # share by which the candidate beats the current on the objective
    current_hash: str
    candidate_hash: str
    figures: dict[str, float] = field(default_factory=dict)


def accept(current: Predicted, candidate: Plan, objective: Objective | str,
           min_improvement: float, current_violates_slo: bool) -> Acceptance:
    """Whether the re-plan's recommendation should replace the running configuration.

    `current` is the running configuration re-predicted at the new workload (search.predict:
    the old plan's figures were for the old workload); `candidate` is the new plan,
    whose recommendation was predicted at that same workload and meets the SLO by
    construction. Roll out when the current configuration violates the SLO (observed, as
    `current_violates_slo`, or re-predicted, its `slo_miss`), else when the candidate beats it
    on the objective by at least `min_improvement`:

    - min_cost: $/hour (both carry the observed design rate);
    - max_throughput: requests/s within the SLO;
    - min_latency: TTFT p90 + TPOT p90 x (mean output - 1), the search's latency axis, with
      the mean output of the new workload (the candidate plan's request);
    - balanced: the geometric mean of the cost and latency ratios, which like the search's
      knee distance weighs a share of dollars as much as the same share of milliseconds.
    """
    objective = Objective(objective)
    rec = candidate.recommended
    cur_hash, new_hash = current.choice.config.config_hash(), rec.config.config_hash()
    cur_name, new_name = current.choice.config.summary(), rec.config.summary()
    cur, new = current.choice.prediction, rec.prediction
    output_tokens = candidate.request.workload.output_tokens_mean
    figures = {"currentCostPerHour": round(cur.cost_per_hour, 4),
               "candidateCostPerHour": round(new.cost_per_hour, 4),
               "currentTtftP90Ms": round(cur.ttft_p90_ms, 3),
               "candidateTtftP90Ms": round(new.ttft_p90_ms, 3),
               "currentTpotP90Ms": round(cur.tpot_p90_ms, 3),
               "candidateTpotP90Ms": round(new.tpot_p90_ms, 3)}

    def result(roll_out: bool, reason: str, improvement: float | None) -> Acceptance:
        extra = {} if improvement is None else {"improvement": round(improvement, 4)}
        return Acceptance(roll_out=roll_out, reason=reason, improvement=improvement,
                          current_hash=cur_hash, candidate_hash=new_hash,
                          figures={**figures, **extra})

    if new_hash == cur_hash:
        return result(False, f"the re-plan recommends the running configuration "
                             f"{new_name} ({cur_hash})", 0.0)
    improvement, what = _improvement(objective, cur, new, output_tokens)
    miss = current.slo_miss
    if current_violates_slo or miss:
        why = "violates the SLO as observed" if current_violates_slo else f"would miss {miss}"
        return result(True, f"the running {cur_name} {why}; {new_name} is "
                            f"planned to meet it", improvement)
    if improvement is None:
        return result(False, f"cannot compare {what} of {cur_name} and "
                             f"{new_name}", None)
    verdict = (f"{new_name} improves {what} by {improvement:.1%} over the running "
               f"{cur_name}")
    # Exactly the share asked for counts as enough, whatever the float rounding (1 - 9/10).
    if improvement >= min_improvement - 1e-9:
        return result(True, f"{verdict} (at least {min_improvement:.0%} needed)", improvement)
    return result(False, f"{verdict}, less than the {min_improvement:.0%} needed", improvement)


def _improvement(objective: Objective, cur: Prediction, new: Prediction,
                 output_tokens: float) -> tuple[float | None, str]:
    """(share by which `new` beats `cur`, what was compared); None when undefined."""
    def lat(p: Prediction) -> float:
        return p.ttft_p90_ms + p.tpot_p90_ms * max(output_tokens - 1.0, 0.0)

    def gain(old: float, value: float) -> float | None:  # lower is better
        return 1.0 - value / old if old > 0 and math.isfinite(old) else None

    if objective is Objective.MIN_COST:
        return gain(cur.cost_per_hour, new.cost_per_hour), "cost per hour"
    if objective is Objective.MIN_LATENCY:
        return gain(lat(cur), lat(new)), "latency"
    if objective is Objective.MAX_THROUGHPUT:
        if cur.capacity_rps <= 0:
            return (math.inf if new.capacity_rps > 0 else None), "capacity"
        return new.capacity_rps / cur.capacity_rps - 1.0, "capacity"
    if cur.cost_per_hour <= 0 or lat(cur) <= 0:
        return None, "cost and latency"
    return (1.0 - math.sqrt(new.cost_per_hour / cur.cost_per_hour * lat(new) / lat(cur)),
            "cost x latency")
