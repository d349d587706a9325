"""Explaining: why the recommendation, why not the runners-up, and what would change it.

Last stage of the search (confirming -> explaining). Also builds `InfeasibleSLO`, the error
for a request nothing meets, from sizing's nearest misses: a person reading either should
learn which limit binds and by how much, without rerunning anything.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from trilemma.optimizer.errors import InputError
from trilemma.optimizer.search import decoding, ranking
from trilemma.optimizer.search.configs import Choice, Prediction, _plain
from trilemma.optimizer.search.screening import (
    PERCENTILE_FACTORS,
    Mapper,
    RowScreen,
    SloMetric,
    Term,
    WorkloadMeans,
)
from trilemma.optimizer.search.sizing import Nearest
from trilemma.optimizer.spec.lengths import FixedLengths, HistogramLengths, LognormalLengths
from trilemma.optimizer.spec.objective import Objective
from trilemma.optimizer.spec.plan_request import PlanRequest


class InfeasibleSLO(InputError):
    """No configuration in the space meets the SLO within the pool and budget.

    `binding` names the constraint that fails for the nearest configurations; `nearest` holds
    one line per nearest configuration (summary, predicted value vs target).
    """

    def __init__(self, binding: str, nearest: list[str], why: str) -> None:
        self.binding = binding
        self.nearest = nearest
        super().__init__("slo", binding, why)


@dataclass(frozen=True, kw_only=True)
class Limit:
    """One constraint of the recommendation and how close it is to binding (used / limit)."""

    name: str
    used: float
    limit: float
    unit: str
    # used / limit, computed when not given. A decoded plan passes its stored figure: `used`
    # and `limit` are stored rounded, and their quotient may differ in the last digit.
    ratio: float = field(default=math.nan)

    def __post_init__(self) -> None:
        if math.isnan(self.ratio):
            object.__setattr__(self, "ratio", self.used / self.limit)

    def sentence(self) -> str:
        return (f"{self.name}: {self.used:.4g} {self.unit} of {self.limit:.4g} {self.unit} "
                f"({self.ratio * 100:.0f}%)")


@dataclass(frozen=True, kw_only=True)
class Scenario:
    """What the search recommends if the workload changes one way."""

    name: str                      # "rate x2", "prompt x2"
    summary: str | None            # None: nothing in the front's groups copes
    cost_per_hour: float | None
    note: str


@dataclass(frozen=True, kw_only=True)
class Explanation:
    binding: str                   # the limit closest to binding, with numbers
    limits: tuple[Limit, ...]      # every SLO term, pool and budget, closest first
    runners_up: tuple[str, ...]    # one sentence per next choice: why it loses
    sensitivity: tuple[Scenario, ...]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = _plain(self)
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> Explanation:
        """The inverse of `to_dict`; decoding.MalformedPlan naming the field that breaks."""
        def limits(d: Any, at: str) -> tuple[Limit, ...]:
            return tuple(decoding.items(d, at, lambda x, a: decoding.record(Limit, x, a)))

        def scenarios(d: Any, at: str) -> tuple[Scenario, ...]:
            return tuple(decoding.items(d, at, lambda x, a: decoding.record(Scenario, x, a)))

        return decoding.record(cls, data, where, limits=limits, sensitivity=scenarios)


def term_value(t: Term, p: Prediction, wl: WorkloadMeans) -> float:
    """The prediction's value for an SLO term (p99s scaled from p90 by the screen's factors)."""
    def pct(metric: SloMetric, q: str) -> float:
        p50, p90 = ((p.ttft_p50_ms, p.ttft_p90_ms) if metric is SloMetric.TTFT
                    else (p.tpot_p50_ms, p.tpot_p90_ms))
        if q == "p50":
            return p50
        f = PERCENTILE_FACTORS[metric]
        return p90 if q == "p90" else p90 * f["p99"] / f["p90"]

    if t.metric is SloMetric.E2E:
        if t.pct == "p99":
            return p.e2e_p99_ms
        decode_steps = max(wl.output_tokens_pct[t.pct] - 1.0, 0.0)
        return pct(SloMetric.TTFT, t.pct) + decode_steps * pct(SloMetric.TPOT, t.pct)
    return pct(t.metric, t.pct)


def limits(request: PlanRequest, c: Choice, terms: list[Term], wl: WorkloadMeans) -> list[Limit]:
    out = [Limit(name=t.name, used=term_value(t, c.prediction, wl), limit=t.target_ms,
                 unit="ms") for t in terms]
    for key, used in c.config.gpus_by_type().items():  # a mixed plan: each type's pool
        out.append(Limit(name=f"{key} pool", used=float(used),
                         limit=float(request.hardware.group(key).count), unit="GPUs"))
    if request.slo.max_cost_per_hour is not None:
        out.append(Limit(name="budget", used=c.prediction.cost_per_hour,
                         limit=request.slo.max_cost_per_hour, unit="$/h"))
    out.append(Limit(name="design rate vs capacity", used=wl.design_rate,
                     limit=max(c.prediction.capacity_rps, 1e-9), unit="req/s"))
    out.sort(key=lambda x: (-x.ratio, x.name))
    return out


def runners_up(objective: Objective, best: Choice, ranked: list[Choice],
               wl: WorkloadMeans) -> list[str]:
    """Why each of the next choices (ranked by the objective) loses to `best`."""
    b = best.prediction
    b_lat = ranking.e2e_ms(b.ttft_p90_ms, b.tpot_p90_ms, wl)
    out = []
    for c in ranked[:3]:
        p = c.prediction
        lat = ranking.e2e_ms(p.ttft_p90_ms, p.tpot_p90_ms, wl)
        head = f"{c.config.summary()} (${p.cost_per_hour:.2f}/h, e2e p90 {lat:.0f} ms, " \
               f"{p.capacity_rps:.2f} req/s)"
        if objective is Objective.MIN_COST:
            why = (f"costs ${p.cost_per_hour - b.cost_per_hour:.2f}/h more "
                   f"({_pct(p.cost_per_hour, b.cost_per_hour)})" if
                   p.cost_per_hour > b.cost_per_hour else
                   f"costs the same but is {lat - b_lat:.0f} ms slower end to end")
        elif objective is Objective.MAX_THROUGHPUT:
            why = (f"carries {b.capacity_rps - p.capacity_rps:.2f} req/s less "
                   f"({_pct(p.capacity_rps, b.capacity_rps)})")
        elif objective is Objective.MIN_LATENCY:
            why = f"is {lat - b_lat:.0f} ms slower end to end ({_pct(lat, b_lat)})"
        else:
            dc, dl = _pct(p.cost_per_hour, b.cost_per_hour), _pct(lat, b_lat)
            why = (f"sits farther from the cost/latency knee: {dc} cost and {dl} latency "
                   "against the recommendation")
        out.append(f"{head} {why}.")
    return out


def _pct(x: float, ref: float) -> str:
    return f"{(x / ref - 1.0) * 100:+.0f}%" if ref > 0 else "n/a"


Replan = Callable[[PlanRequest], Choice | None]


def sensitivity(request: PlanRequest, replan: Replan,
                mapper: Mapper | None = None) -> list[Scenario]:
    """The recommendation if the design rate doubles, and if prompts double in length.

    The scenarios are independent replans: `mapper` (e.g. parallel.mapper) may run them in
    other processes; results come back in order, so the explanation is the same."""
    wl = request.workload
    scenarios = [("rate x2", request.model_copy(update={"workload": wl.model_copy(
        update={"peak_factor": wl.peak_factor * 2.0})}))]
    doubled = _double(wl.prompt_tokens)
    if doubled is not None:
        scenarios.append(("prompt x2", request.model_copy(update={"workload": wl.model_copy(
            update={"prompt_tokens": doubled})})))
    items = list(range(len(scenarios)))
    found = (mapper(lambda i: replan(scenarios[i][1]), items) if mapper is not None
             else [replan(req) for _, req in scenarios])
    out = [_scenario(name, c) for (name, _), c in zip(scenarios, found, strict=True)]
    if doubled is None:
        out.append(Scenario(name="prompt x2", summary=None, cost_per_hour=None,
                            note="not evaluated: prompt lengths come from a trace"))
    return out


def _double(d: Any) -> Any:
    if isinstance(d, FixedLengths):
        return d.model_copy(update={"value": d.value * 2})
    if isinstance(d, LognormalLengths):
        return d.model_copy(update={"mean": d.mean * 2, "p90": d.p90 * 2})
    if isinstance(d, HistogramLengths):
        if d.values is not None:
            return d.model_copy(update={"values": [v * 2 for v in d.values]})
        if d.edges is not None:
            return d.model_copy(update={"edges": [e * 2 for e in d.edges]})
    return None


def _scenario(name: str, c: Choice | None) -> Scenario:
    if c is None:
        return Scenario(name=name, summary=None, cost_per_hour=None,
                        note="nothing in the current front's groups meets the SLO")
    return Scenario(name=name, summary=c.config.summary(),
                    cost_per_hour=round(c.prediction.cost_per_hour, 6),
                    note="analytic screen restricted to the current front's groups")


def explain(request: PlanRequest, best: Choice, ranked: list[Choice], terms: list[Term],
            wl: WorkloadMeans, replan: Replan | None,
            mapper: Mapper | None = None) -> Explanation:
    lim = limits(request, best, terms, wl)
    top = lim[0]
    binding = f"closest to binding: {top.sentence()}"
    sens = tuple(sensitivity(request, replan, mapper)) if replan is not None else ()
    return Explanation(binding=binding, limits=tuple(lim),
                       runners_up=tuple(runners_up(request.objective, best, ranked, wl)),
                       sensitivity=sens)


def infeasible(request: PlanRequest, screens: list[RowScreen], nearest: list[Nearest],
               terms: list[Term], pruned: Counter[str]) -> InfeasibleSLO:
    """The error for an empty result: the SLO term the nearest rows miss, or the pool/budget."""
    if nearest and terms:
        lines = []
        for n in nearest:
            rs = screens[n.screen]
            t = terms[n.term]
            g = rs.rows.group
            w = ranking.worker(rs, n.row)
            line = (f"{g.choice.id} {w.summary()} on {g.gpu.key}: {t.name.split(' <=')[0]}"
                    f" {n.ratio * t.target_ms:.1f} ms vs {t.target_ms:g} ms target at the "
                    "lightest load")
            if line not in lines:  # rows that differ only in engine limits read the same
                lines.append(line)
        votes = Counter(terms[n.term].name for n in nearest)
        binding = sorted(votes.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]
        best = nearest[0]
        why = (f"no configuration meets the SLO; the binding constraint is {binding}: the "
               f"nearest configurations miss it by {(best.ratio - 1) * 100:.1f}% or more even "
               f"unloaded. Nearest: " + "; ".join(lines))
        return InfeasibleSLO(binding, lines, why)
    parts = [f"{k}: {pruned[k]}" for k in ("slo", "pool", "budget") if pruned.get(k)]
    binding = "budget" if pruned.get("budget") else "pool"
    why = (f"no configuration meets the SLO within the {binding}: every configuration fast "
           f"enough needs more GPUs or dollars than allowed (candidates pruned by "
           f"{', '.join(parts) or 'the SLO'})")
    return InfeasibleSLO(binding, [], why)


def failed_in_simulation(failed: list[tuple[Choice, str]]) -> InfeasibleSLO:
    lines = [f"{c.config.summary()}: {why}" for c, why in failed]
    binding = failed[0][1].split(":")[0] if failed else "slo"
    return InfeasibleSLO(binding, lines, "the configurations the screen found feasible all "
                         "miss the SLO in simulation: " + "; ".join(lines))
