"""The search facade: `plan(request) -> Plan`.

Runs the stages in order (space -> screening -> sizing -> ranking -> confirming ->
explaining) and returns one typed, canonical result: the recommendation for the request's
objective, the cost/latency front around it, why it was chosen, and how many candidates each
stage enumerated, pruned, screened and simulated. Timings are kept apart from the canonical
form: the same spec and seed must serialise to the same bytes on any machine.
"""

from __future__ import annotations

import dataclasses
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from trilemma.optimizer.catalog.engines import Engine
from trilemma.optimizer.catalog.quantization import KvDtype, QuantRecipe
from trilemma.optimizer.catalog.speculation import SpecMethod
from trilemma.optimizer.search import (
    alternatives,
    confirming,
    crossing,
    decoding,
    explaining,
    mixing,
    parallel,
    ranking,
    screening,
    sizing,
    space,
)
from trilemma.optimizer.search.alternatives import Alternative, By
from trilemma.optimizer.search.configs import OMIT_AT_DEFAULT, Choice, WorkerConfig, _plain
from trilemma.optimizer.search.explaining import Explanation
from trilemma.optimizer.search.space import SearchSettings
from trilemma.optimizer.spec.objective import Objective
from trilemma.optimizer.spec.plan_request import PlanRequest

Progress = Callable[[str, float], None]
_KEEP_TOP = 8  # analytic best by the objective kept beside the front
_SIMULATE_MIXES = 2  # mixed plans confirmed, best by the objective first (mixing.py)


@dataclass(frozen=True, kw_only=True)
class Counts:
    """How many candidates each stage saw. `pruned` adds "coarse" (layouts the coarse screen
    left out) to the space's and sizing's reasons."""

    enumerated: int
    pruned: dict[str, int]
    coarse_layouts: int       # layouts priced once by the coarse screen
    screened: int             # candidates (rows x modes x replica options) fully screened
    feasible: int             # candidates meeting every SLO, pool and budget limit
    simulated: int            # configurations confirmed by the simulator
    # Plans spanning GPU types composed (mixing.py, crossing.py); left out of the JSON form
    # at 0, so that plans without any keep their bytes.
    mixed: int = field(default=0, metadata={OMIT_AT_DEFAULT: True})

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> Counts:
        return decoding.record(cls, data, where)


@dataclass(frozen=True, kw_only=True)
class WorkloadDigest:
    """The workload's means at the design rate, as the plan saw them."""

    prompt_tokens_mean: float
    output_tokens_mean: float
    cached_tokens_mean: float
    predictability: float


@dataclass(frozen=True, kw_only=True)
class RequestDigest:
    """What a plan was made for, stored with it: a later traffic check compares what it
    observes with this (the keys are part of the stored plan's format; keep them)."""

    models: list[str]
    workload: WorkloadDigest
    design_rate_rps: float
    slo: dict[str, Any]       # the SLO as the spec states it (its JSON form)
    pool: dict[str, int]      # GPUs the plan could use, by type
    allow_disaggregation: bool

    def to_dict(self) -> dict[str, Any]:
        plain: dict[str, Any] = _plain(self)
        return plain

    @classmethod
    def from_dict(cls, data: Any, where: str = "") -> RequestDigest:
        def workload(d: Any, at: str) -> WorkloadDigest:
            return decoding.record(WorkloadDigest, d, at)

        return decoding.record(cls, data, where, workload=workload)


@dataclass(frozen=True, kw_only=True)
class Plan:
    request: RequestDigest
    objective: Objective
    recommended: Choice
    front: list[Choice]       # cost/latency Pareto front, cheapest first
    explanation: Explanation
    counts: Counts
    # Best per GPU type and per engine, beside the front. Plans stored before alternatives
    # existed have none: written only when there are some, so those plans keep their bytes.
    alternatives: list[Alternative] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase; not canonical

    def to_dict(self, *, timings: bool = False) -> dict[str, Any]:
        """JSON-ready and deterministic; `timings=True` adds the (machine-dependent) timings."""
        out = {"request": self.request.to_dict(), "objective": self.objective.value,
               "recommended": self.recommended.to_dict(),
               "front": [c.to_dict() for c in self.front],
               "explanation": self.explanation.to_dict(), "counts": _plain(self.counts)}
        if self.alternatives:
            out["alternatives"] = [a.to_dict() for a in self.alternatives]
        if timings:
            out["timings"] = {k: round(v, 4) for k, v in self.timings.items()}
        return out

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        """The inverse of `to_dict` (timings included when present): for a plan read back
        from storage. decoding.MalformedPlan names the field that breaks, e.g. a plan written
        by another format."""
        def choices(d: Any, at: str) -> list[Choice]:
            return decoding.items(d, at, Choice.from_dict)

        def alts(d: Any, at: str) -> list[Alternative]:
            return decoding.items(d, at, Alternative.from_dict)

        return decoding.record(cls, data, "", request=RequestDigest.from_dict,
                               recommended=Choice.from_dict, front=choices,
                               explanation=Explanation.from_dict, counts=Counts.from_dict,
                               alternatives=alts)


def digest(request: PlanRequest) -> RequestDigest:
    wl = screening.WorkloadMeans.of(request)
    # Rounded as the stored form is, so that a decoded plan equals the one that was stored.
    return RequestDigest.from_dict(_plain(RequestDigest(
        models=[c.id for c in request.candidates],
        workload=WorkloadDigest(prompt_tokens_mean=wl.prompt_tokens,
                                output_tokens_mean=wl.output_tokens,
                                cached_tokens_mean=wl.cached_tokens,
                                predictability=wl.output_predictability),
        design_rate_rps=wl.design_rate,
        slo=request.slo.model_dump(mode="json", exclude_none=True),
        pool={k: request.hardware.group(k).count for k in request.allowed_gpus()},
        allow_disaggregation=request.bounds.allow_disaggregation)))


@dataclass(frozen=True, kw_only=True)
class Search:
    """What the analytic stages leave for confirming and explaining."""

    screens: list[screening.RowScreen]
    candidates: sizing.Candidates
    metrics: ranking.Metrics
    ranked: np.ndarray
    front: np.ndarray
    counts: Counts
    # Plans spanning GPU types (mixing.py, crossing.py), analytic.
    mixes: list[Choice] = field(default_factory=list)


def search(request: PlanRequest, settings: SearchSettings,
           report: Progress, timings: dict[str, float]) -> Search:
    """The analytic part: enumerate, screen, size, rank. Raises InfeasibleSLO."""
    t0 = time.perf_counter()
    sp = space.enumerate_space(request, settings)
    t1 = time.perf_counter()
    timings["enumerate"] = t1 - t0
    report("enumerate", 1.0)
    screens, dropped, coarse = parallel.screen_space(sp, request, settings)
    t2 = time.perf_counter()
    timings["screen"] = t2 - t1
    report("screen", 1.0)
    pruned: Counter[str] = Counter(sp.pruned)
    pruned["coarse"] += dropped
    wl = screening.WorkloadMeans.of(request)
    terms = screening.slo_terms(request)
    cands, nearest = sizing.size_all(screens, request, settings, wl, terms, pruned)
    mixes = [*mixing.compose(screens, request, wl, terms, settings.replica_factors),
             *crossing.compose(screens, request, wl, terms, settings.pd_ratios)
             ] if settings.mixed else []
    if len(cands) == 0 and not mixes:
        raise explaining.infeasible(request, screens, nearest, terms, pruned)
    m = ranking.metrics(cands, wl)
    ranked = ranking.order(request.objective, m)
    fr = ranking.front(m, settings.front_size)
    timings["size_rank"] = time.perf_counter() - t2
    report("rank", 1.0)
    counts = Counts(enumerated=sp.enumerated,
                    pruned={k: int(v) for k, v in sorted(pruned.items()) if v},
                    coarse_layouts=coarse,
                    screened=sum(len(rs.rows) for rs in screens) * sp.modes * sp.replica_options,
                    feasible=len(cands), simulated=0, mixed=len(mixes))
    return Search(screens=screens, candidates=cands, metrics=m, ranked=ranked, front=fr,
                  counts=counts, mixes=mixes)


def plan(request: PlanRequest, *, settings: SearchSettings | None = None,
         progress: Progress | None = None, seed: int = 0) -> Plan:
    """Plan a deployment of `request`: the recommendation for its objective and the front.

    `seed` drives the confirming simulations (sampled workload, speculative acceptances);
    `progress(phase, fraction)` is called as phases finish.
    """
    settings = settings or SearchSettings()
    report: Progress = progress or (lambda _phase, _fraction: None)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    s = search(request, settings, report, timings)
    wl = screening.WorkloadMeans.of(request)
    t = time.perf_counter()
    picked = confirming.pick(s.ranked, s.front, s.candidates, s.screens, settings)
    # The best few by the objective stay in the running even unsimulated: the objective's
    # winner need not sit on the cost/latency front (max_throughput rarely does).
    keep = list(dict.fromkeys([*picked, *(int(i) for i in s.ranked[:_KEEP_TOP]),
                               *(int(i) for i in s.front)]))
    analytic = {i: ranking.choice(s.candidates, i, s.screens, settings, wl) for i in keep}
    mixes = best_mixes(request.objective, s.mixes, wl)
    top = [analytic[i] for i in picked[:settings.simulate_top_k]]
    confirmed = confirming.confirm(request, [*(analytic[i] for i in picked),
                                             *contenders(request.objective, top, mixes, wl)],
                                   settings, seed=seed, progress=lambda f: report("simulate", f))
    timings["simulate"] = time.perf_counter() - t
    done = {c.config.config_hash(): c for c in confirmed.choices}
    failed = {c.config.config_hash() for c, _ in confirmed.failed}
    pool = [done.get(c.config.config_hash(), c) for c in [*analytic.values(), *mixes]
            if c.config.config_hash() not in failed]
    if not pool:
        # Everything simulated missed the SLO and nothing else was kept: the screen was too
        # optimistic here, and saying so beats recommending a configuration known to fail.
        raise explaining.failed_in_simulation(confirmed.failed)
    sim_ok = [c for c in pool if c.prediction.simulated]
    recommended, front = select(request.objective, sim_ok or pool, pool, wl,
                                settings.front_size)
    alts = alternatives.alternatives(
        alternatives.Context(objective=request.objective, candidates=s.candidates,
                             screens=s.screens, settings=settings, wl=wl,
                             recommended=recommended, front=front, simulated=done,
                             failed=failed),
        {By.GPU: list(request.allowed_gpus()),
         By.ENGINE: [e.value for e in request.bounds.engines or [Engine.VLLM]]})
    t = time.perf_counter()
    # Runners-up: the next distinct configurations by the objective, simulated or not.
    ranked = [pool[int(i)] for i in ranking.order(request.objective, choice_metrics(pool, wl))]
    seen = {recommended.config.summary()}
    others = []
    for c in ranked:
        if c.config.summary() not in seen:
            seen.add(c.config.summary())
            others.append(c)
    replan = (restricted_replan(request, settings, front)
              if settings.explain_sensitivity else None)
    explanation = explaining.explain(request, recommended, others,
                                     screening.slo_terms(request), wl, replan,
                                     parallel.mapper(settings.workers, min_items=2))
    timings["explain"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - start
    report("done", 1.0)
    counts = Counts(**{**_plain(s.counts), "simulated": confirmed.simulated})
    return Plan(request=digest(request), objective=request.objective, recommended=recommended,
                front=front, explanation=explanation, counts=counts, alternatives=alts,
                timings=timings)


def best_mixes(objective: Objective, mixes: list[Choice],
               wl: screening.WorkloadMeans) -> list[Choice]:
    """The mixed plans best first by the objective, the first `_KEEP_TOP`: the best
    `_SIMULATE_MIXES` are simulated beside the single-type picks, the others stay in the
    running analytic."""
    if not mixes:
        return []
    return [mixes[int(i)] for i in ranking.order(objective, choice_metrics(mixes, wl))][
        :_KEEP_TOP]


def contenders(objective: Objective, top: list[Choice], mixes: list[Choice],
               wl: screening.WorkloadMeans) -> list[Choice]:
    """The best `_SIMULATE_MIXES` mixed plans that rank among the single-type plans the
    objective simulates first (`top`): a mix that loses to all of them analytically is not
    worth a simulation (it stays in the running, unconfirmed, like the rest of the front)."""
    head = mixes[:_SIMULATE_MIXES]
    if not top:
        return head
    everything = [*top, *head]
    order = ranking.order(objective, choice_metrics(everything, wl))
    ahead = {int(i) for i in order[:len(top)]}
    return [m for j, m in enumerate(head) if len(top) + j in ahead]


def choice_metrics(choices: list[Choice], wl: screening.WorkloadMeans) -> ranking.Metrics:
    p = [c.prediction for c in choices]
    return ranking.Metrics(
        cost=np.array([x.cost_per_hour for x in p], dtype=np.float64),
        latency=np.array([ranking.e2e_ms(x.ttft_p90_ms, x.tpot_p90_ms, wl) for x in p],
                         dtype=np.float64),
        capacity=np.array([x.capacity_rps for x in p], dtype=np.float64))


def select(objective: Objective, eligible: list[Choice], pool: list[Choice],
           wl: screening.WorkloadMeans, size: int) -> tuple[Choice, list[Choice]]:
    """The recommendation among `eligible` (simulated survivors when there are any) and the
    front over `pool`, the recommendation always on it."""
    m = choice_metrics(eligible, wl)
    best = eligible[int(ranking.order(objective, m)[0])]
    everything = _unique([best, *pool])
    fm = choice_metrics(everything, wl)
    idx = [int(i) for i in ranking.front(fm, size)]
    chosen = [everything[i] for i in idx]
    if best not in chosen:
        chosen = [*chosen[:size - 1], best] if len(chosen) >= size else [*chosen, best]
    chosen.sort(key=lambda c: (c.prediction.cost_per_hour,
                               ranking.e2e_ms(c.prediction.ttft_p90_ms,
                                              c.prediction.tpot_p90_ms, wl),
                               c.config.config_hash()))
    return best, chosen


def _unique(choices: list[Choice]) -> list[Choice]:
    seen: set[str] = set()
    out = []
    for c in choices:
        h = c.config.config_hash()
        if h not in seen:
            seen.add(h)
            out.append(c)
    return out


def _group_key(w: WorkerConfig, model: str, engine: str) -> tuple[str, ...]:
    return (model, w.gpu, engine, w.quant, w.kv_dtype, w.spec_method, str(w.spec_k))


def restricted_replan(request: PlanRequest, settings: SearchSettings,
                      front: list[Choice]) -> explaining.Replan:
    """Re-screen a changed request over the front's groups only: every row of those groups,
    no coarse pass. Cheap (a handful of groups) and answers "what would we pick then"."""
    keys = {_group_key(c.config.worker, c.config.model, c.config.engine) for c in front}
    ks = tuple(sorted({c.config.worker.spec_k for c in front} - {0}))
    bounds = request.bounds.model_copy(update={
        "gpu_types": sorted({k[1] for k in keys}),
        "quantizations": sorted({QuantRecipe(k[3]) for k in keys}, key=lambda q: q.value),
        "kv_dtypes": sorted({KvDtype(k[4]) for k in keys}, key=lambda q: q.value),
        "speculation": sorted({SpecMethod(k[5]) for k in keys}, key=lambda q: q.value),
        "engines": sorted({Engine(k[2]) for k in keys}, key=lambda q: q.value)})
    narrow = dataclasses.replace(settings, spec_k=ks or settings.spec_k)

    def replan(req: PlanRequest) -> Choice | None:
        req = req.model_copy(update={"bounds": bounds})
        sp = space.enumerate_space(req, narrow)
        rows = [r for r in sp.rows
                if _group_key(ranking.worker_of_group(r.group), r.group.choice.id,
                              r.group.engine.value) in keys]
        wl = screening.WorkloadMeans.of(req)
        terms = screening.slo_terms(req)
        screens = [screening.screen_rows(r, req, wl, terms, req.bounds.allow_disaggregation)
                   for r in rows]
        cands, _ = sizing.size_all(screens, req, narrow, wl, terms, Counter())
        if len(cands) == 0:
            return None
        best = int(ranking.order(req.objective, ranking.metrics(cands, wl))[0])
        return ranking.choice(cands, best, screens, narrow, wl)

    return replan
