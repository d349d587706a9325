"""Mixed plans: one model's aggregated replicas spread over several GPU types.

A pool of 2 H100s and 8 L40Ss may carry a rate that neither type carries alone, or carry it
cheaper than either: the cheapest type per req/s fills its GPUs and another type serves the
rest. Composed after sizing from the screen's per-replica figures (no new rows are screened):
per (model, engine) and GPU type, the one-node layout with the lowest $/hour per req/s it
carries within the SLO; then, in that order, each type takes as many replicas as the rate
still needs and its pool (and the budget) allow. Two fills per (model, engine): "to the
pool" (the best type fills its GPUs first) and "remainder" (the best type takes the whole
replicas the rate needs, the rest goes on whichever type serves it cheapest). The work is
bounded by GPU types x (model, engine) pairs, whatever the space's size.

The traffic split is in proportion to each type's capacity at the SLO (Part.weight): every
replica then runs at the same fraction of its own capacity, the split a load-aware router
(queue depth, KV-cache use: the InferencePool's endpoint picker) converges to. A plain Service
spreads requests evenly per pod instead, which would overload the slower type's replicas.
The screen's percentiles of a mix are its worst type's: the mixture's percentile never
exceeds the largest of its parts', so an SLO check on them stays sound (confirming then
simulates the real mixture).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from trilemma.optimizer import serving
from trilemma.optimizer.search import ranking, screening
from trilemma.optimizer.search.configs import Choice, Part, Prediction, ServingConfig
from trilemma.optimizer.search.screening import RowScreen, SloMetric, Term, WorkloadMeans
from trilemma.optimizer.spec.plan_request import PlanRequest

_SLO_SLACK = 1.0 + 1e-6
# The Prediction fields the screen fills, and the percentile each is.
PERCENTILES = (("ttft_p50_ms", SloMetric.TTFT, "p50"), ("ttft_p90_ms", SloMetric.TTFT, "p90"),
               ("tpot_p50_ms", SloMetric.TPOT, "p50"), ("tpot_p90_ms", SloMetric.TPOT, "p90"),
               ("e2e_p99_ms", SloMetric.E2E, "p99"))


@dataclass(frozen=True, kw_only=True)
class Layout:
    """The best aggregated layout of one (model, engine) on one GPU type."""

    screen: int
    row: int
    gpu: str
    capacity: float        # req/s one replica carries within the SLO
    unit_cost: float       # $/hour of one replica
    unit_gpus: int
    pool_gpus: int

    @property
    def per_rps(self) -> float:
        return self.unit_cost / self.capacity


def best_layouts(screens: list[RowScreen]) -> dict[tuple[str, str], list[Layout]]:
    """Per (model, engine): each GPU type's cheapest layout per req/s, cheapest type first."""
    best: dict[tuple[str, str, str], Layout] = {}
    for i, rs in enumerate(screens):
        g = rs.rows.group
        cap = rs.agg.capacity
        if not (cap > 0).any():
            continue
        gpus = (rs.rows.tp * rs.rows.pp * rs.rows.dp).astype(np.float64)
        # One node per replica: every part is then a Deployment serving the same component,
        # which the endpoint Service selects as one (a LeaderWorkerSet's leaders differ).
        fits = (cap > 0) & (gpus <= g.gpus_per_node)
        per = np.where(fits, gpus * g.price_per_gpu_hour / np.where(fits, cap, 1.0), np.inf)
        if not np.isfinite(per).any():
            continue
        r = int(np.argmin(per))  # first of equals: the space's order decides ties
        lay = Layout(screen=i, row=r, gpu=g.gpu.key, capacity=float(cap[r]),
                     unit_cost=float(gpus[r] * g.price_per_gpu_hour), unit_gpus=int(gpus[r]),
                     pool_gpus=g.pool_gpus)
        key = (g.choice.id, g.engine.value, g.gpu.key)
        if key not in best or lay.per_rps < best[key].per_rps:
            best[key] = lay
    out: dict[tuple[str, str], list[Layout]] = {}
    for (model, engine, _), lay in sorted(best.items()):
        out.setdefault((model, engine), []).append(lay)
    for lays in out.values():
        lays.sort(key=lambda x: (x.per_rps, x.gpu))
    return out


def _fill(lays: list[Layout], rate: float, budget: float) -> list[tuple[Layout, int]] | None:
    """Greedy: each layout in turn takes the replicas the rate still needs, up to its pool
    and the budget left. None when the rate is not met."""
    parts: list[tuple[Layout, int]] = []
    left, money = rate, budget
    for lay in lays:
        room = lay.pool_gpus // lay.unit_gpus
        if math.isfinite(money):
            room = min(room, math.floor(money / lay.unit_cost + 1e-9))
        n = min(math.ceil(left / lay.capacity - 1e-9), room)
        if n <= 0:
            continue
        parts.append((lay, n))
        left -= n * lay.capacity
        money -= n * lay.unit_cost
        if left <= 1e-9:
            return parts
    return None


def fills(lays: list[Layout], rate: float, budget: float) -> list[list[tuple[Layout, int]]]:
    """The two fills (module docstring) that use more than one GPU type."""
    out = []
    to_pool = _fill(lays, rate, budget)
    if to_pool is not None:
        out.append(to_pool)
    first = lays[0]
    whole = min(math.floor(rate / first.capacity), first.pool_gpus // first.unit_gpus)
    rest = rate - whole * first.capacity
    if whole > 0 and rest > 1e-9:
        money = budget - whole * first.unit_cost
        tails = [t for lay in lays[1:]
                 if (t := _fill([lay], rest, money)) is not None]
        if tails:
            tail = min(tails, key=lambda t: (t[0][1] * t[0][0].unit_cost, t[0][0].gpu))
            out.append([(first, whole), *tail])
    return [f for f in out if len(f) > 1]


def compose(screens: list[RowScreen], request: PlanRequest, wl: WorkloadMeans,
            terms: list[Term], factors: tuple[float, ...] = (1.0,)) -> list[Choice]:
    """Every mixed plan that meets the SLO, the pool, the budget and the replica bound, as
    analytic Choices (distinct configurations, in a deterministic order)."""
    budget = request.slo.max_cost_per_hour
    max_replicas = request.bounds.max_replicas
    out: dict[str, Choice] = {}
    for lays in best_layouts(screens).values():
        if len(lays) < 2:
            continue
        # Sized for the design rate times each replica factor (headroom, as sizing sizes
        # single-type plans; 0: all the pool holds): the front needs the slack ones too.
        whole = sum(lay.capacity * (lay.pool_gpus // lay.unit_gpus) for lay in lays)
        targets = sorted({wl.design_rate * f if f > 0 else whole for f in factors})
        every = [p for t in targets if t >= wl.design_rate
                 for p in fills(lays, t, math.inf if budget is None else budget)]
        for parts in every:
            if max_replicas is not None and sum(n for _, n in parts) > max_replicas:
                continue
            c = choice(parts, screens, wl, terms)
            if c is not None:
                out.setdefault(c.config.config_hash(), c)
    return list(out.values())


def choice(parts: list[tuple[Layout, int]], screens: list[RowScreen], wl: WorkloadMeans,
           terms: list[Term]) -> Choice | None:
    """The mixed configuration and its analytic prediction; None if a type misses the SLO at
    its share of the load."""
    total = sum(lay.capacity * n for lay, n in parts)
    use = wl.design_rate / total  # every replica at this fraction of its own capacity
    pcts: dict[str, float] = {}
    for lay, _ in parts:
        curve = screens[lay.screen].agg
        load = np.full((len(curve.capacity), 1), use * lay.capacity)
        ttft, tpot = (a[lay.row:lay.row + 1] for a in curve.at(load))
        ratio, _ = screening.worst(terms, ttft, tpot, wl)
        if terms and float(ratio.ravel()[0]) > _SLO_SLACK:
            return None
        for name, metric, q in PERCENTILES:
            v = float(screening.percentile(metric, q, ttft, tpot, wl).ravel()[0])
            pcts[name] = max(pcts.get(name, 0.0), v)
    first, n0 = parts[0]
    rs0 = screens[first.screen]
    config = ServingConfig(
        model=rs0.rows.group.choice.id, engine=rs0.rows.group.engine,
        worker=ranking.worker(rs0, first.row), replicas=n0,
        mixed=tuple(Part(worker=ranking.worker(screens[lay.screen], lay.row), replicas=n,
                         weight=round(lay.capacity / first.capacity, 6))
                    for lay, n in parts[1:]))
    cost = sum(lay.unit_cost * n for lay, n in parts)
    qualities = [screens[lay.screen].rows.group.quality for lay, _ in parts]
    split = ", ".join(f"{p.worker.gpu} {s:.0%}"
                      for p, s in zip(config.parts(), config.shares(), strict=True))
    provenance = {"latency": f"{ranking.ANALYTIC}; the worst GPU type's",
                  "capacity": "analytic: sum of each GPU type's capacity at the SLO",
                  "split": f"by capacity at the SLO: {split}"}
    kernels = sorted({g.kernels for lay, _ in parts
                      if not (g := screens[lay.screen].rows.group.gpu).calibrated})
    if kernels:
        provenance["kernels"] = "; ".join(kernels)
    tokens_per_hour = wl.design_rate * wl.output_tokens * 3600.0
    prediction = Prediction(
        ttft_p50_ms=pcts["ttft_p50_ms"], ttft_p90_ms=pcts["ttft_p90_ms"],
        tpot_p50_ms=pcts["tpot_p50_ms"], tpot_p90_ms=pcts["tpot_p90_ms"],
        e2e_p99_ms=pcts["e2e_p99_ms"], capacity_rps=total, cost_per_hour=cost,
        cost_per_mtok=cost / max(tokens_per_hour, 1e-12) * 1e6,
        quality=None if any(q is None for q in qualities)
        else min(q for q in qualities if q is not None),
        provenance=provenance)
    return Choice(config=config, prediction=prediction)


# ---- simulating a mix: each type's pool on its share of the arrivals --------------------


def split(config: ServingConfig, n: int) -> list[np.ndarray]:
    """Request indices (arrival order) each of `config.parts()` serves: a smooth weighted
    round robin on the shares, so every part sees an evenly spread, deterministic stream."""
    shares = np.array(config.shares())
    credit = np.zeros(len(shares))
    owner = np.empty(n, dtype=np.int64)
    for i in range(n):
        credit += shares
        k = int(np.argmax(credit))
        owner[i] = k
        credit[k] -= 1.0
    return [np.flatnonzero(owner == k) for k in range(len(shares))]


def part_config(config: ServingConfig, part: Part) -> ServingConfig:
    """One type's replicas as a configuration of their own (what its pool simulates)."""
    return ServingConfig(model=config.model, engine=config.engine, worker=part.worker,
                         replicas=part.replicas)


def part_stream(sample: serving.RequestStream, idx: np.ndarray) -> serving.RequestStream:
    return serving.RequestStream(
        prompt_tokens=sample.prompt_tokens[idx], output_tokens=sample.output_tokens[idx],
        prefix_id=sample.prefix_id[idx], prefix_tokens=sample.prefix_tokens[idx],
        arrival_ms=sample.arrival_ms[idx])


def mixture(runs: list[tuple[serving.SimResult, np.ndarray]]) -> serving.Summary:
    """One summary over every part's steady requests (result, steady mask): the mixture's own
    percentiles, and the rates summed."""
    def cat(values: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(values)

    def of(metric: str) -> serving.Stats:
        return serving.Stats.of(cat([getattr(r, metric)[m] for r, m in runs]))

    return serving.Summary(
        ttft_ms=of("ttft_ms"), tpot_ms=of("tpot_ms"), e2e_ms=of("e2e_ms"),
        queue_ms=of("queue_ms"),
        requests_per_s=sum(r.requests_per_s(m) for r, m in runs),
        output_tokens_per_s=sum(r.output_tokens_per_s(m) for r, m in runs),
        preempted_share=float(np.mean(cat([r.preemptions[m] > 0 for r, m in runs]))),
        prefix_hit_share=float(np.mean(cat([r.cached_tokens[m] > 0 for r, m in runs]))))
