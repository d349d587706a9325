"""From per-replica capacity to whole deployments: replicas, GPUs, $/hour and latencies.

Third step of screening (space -> screening -> sizing -> pareto). Each screened row becomes
one candidate per serving mode (aggregated, or a prefill:decode ratio) and replica option
(the fewest replicas that carry the design rate, more of them for latency headroom, or as many
as the pool and budget allow). Candidates that miss the SLO, exceed the pool or the budget
are counted and dropped; the rest are parallel numpy arrays.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, fields

import numpy as np

from trilemma.optimizer.search import screening
from trilemma.optimizer.search.screening import RowScreen, SloMetric, Term, WorkloadMeans
from trilemma.optimizer.search.space import SearchSettings
from trilemma.optimizer.spec.plan_request import PlanRequest

_SLO_SLACK = 1.0 + 1e-6  # interpolation rounding at the capacity point


@dataclass(frozen=True, kw_only=True)
class Candidates:
    """Priced candidates that meet every constraint: parallel arrays, one entry each."""

    screen: np.ndarray            # index into the RowScreen list
    row: np.ndarray               # row within that RowScreen
    mode: np.ndarray              # 0 aggregated; i > 0 settings.pd_ratios[i - 1]
    replicas: np.ndarray          # aggregated replicas, or decode replicas
    prefill_replicas: np.ndarray
    gpus: np.ndarray
    cost: np.ndarray              # $/hour
    capacity: np.ndarray          # requests/s within the SLO, whole deployment
    ttft_mean: np.ndarray
    tpot_mean: np.ndarray
    quality: np.ndarray           # nan where unknown
    binding: np.ndarray           # SLO term index limiting a replica's load, or SLOTS

    def __len__(self) -> int:
        return len(self.screen)

    def take(self, idx: np.ndarray) -> Candidates:
        return Candidates(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})

    @classmethod
    def concat(cls, parts: list[Candidates]) -> Candidates:
        if not parts:
            return cls(**{f.name: np.zeros(0) for f in fields(cls)})
        return cls(**{f.name: np.concatenate([getattr(p, f.name) for p in parts])
                      for f in fields(cls)})

    def pct(self, metric: SloMetric, pct: str, wl: WorkloadMeans) -> np.ndarray:
        return screening.percentile(metric, pct, self.ttft_mean, self.tpot_mean, wl)


@dataclass(frozen=True, kw_only=True)
class Nearest:
    """A row that meets no SLO at any load: how far its lightest load misses, and on what."""

    screen: int
    row: int
    ratio: float       # predicted / target of the worst term (> 1)
    term: int


def size_all(screens: list[RowScreen], request: PlanRequest, settings: SearchSettings,
             wl: WorkloadMeans, terms: list[Term],
             pruned: Counter[str]) -> tuple[Candidates, list[Nearest]]:
    parts: list[Candidates] = []
    nearest: list[Nearest] = []
    for i, rs in enumerate(screens):
        part, near = _size(i, rs, request, settings, wl, terms, pruned)
        parts.extend(part)
        nearest.extend(near)
    nearest.sort(key=lambda n: (n.ratio, n.screen, n.row))
    return Candidates.concat(parts), nearest[:5]


def _units(need: np.ndarray, unit_gpus: np.ndarray, price: float, pool: int,
           budget: float | None, factors: tuple[float, ...]) -> np.ndarray:
    """(n, R) deployment units per replica option; 0 where the option does not exist."""
    cap = np.floor(pool / unit_gpus)
    if budget is not None:
        cap = np.minimum(cap, np.floor(budget / (unit_gpus * price)))
    cols = []
    for f in factors:
        if f > 0:
            cols.append(np.ceil(need * f - 1e-9))
        else:
            cols.append(np.where(cap >= need, cap, 0.0))
    units = np.stack(cols, 1)
    # Two options that land on the same count are one candidate.
    dup = np.zeros_like(units, dtype=bool)
    for j in range(1, units.shape[1]):
        dup[:, j] = (units[:, :j] == units[:, j:j + 1]).any(1)
    return np.where(dup, -1.0, units)


@dataclass(frozen=True, kw_only=True)
class _ModePlan:
    """One serving mode sized for every row of a screen: arrays (rows, replica factors)."""

    mode: int                # 0 aggregated, m > 0 the m-th prefill:decode ratio
    ok: np.ndarray           # (n,) rows that can run the mode within the SLO at all
    units: np.ndarray        # deployment units (0: not kept; < 0: a duplicate)
    replicas: np.ndarray     # of the (decode or aggregated) worker
    prefill_replicas: np.ndarray
    unit_gpus: np.ndarray    # (n,) GPUs per unit
    ttft: np.ndarray
    tpot: np.ndarray
    capacity: np.ndarray     # requests/s within the SLO
    binding: np.ndarray      # (n,) what limits the capacity


def _size(i: int, rs: RowScreen, request: PlanRequest, settings: SearchSettings, wl: WorkloadMeans,
          terms: list[Term], pruned: Counter[str]) -> tuple[list[Candidates], list[Nearest]]:
    gpus_row = (rs.rows.tp * rs.rows.pp * rs.rows.dp).astype(np.float64)
    near: list[Nearest] = []
    plans = [_aggregated(i, rs, request, settings, wl, gpus_row, pruned, near)]
    if rs.decode is not None and rs.prefill_rate is not None:
        plans += _disaggregated(rs, request, settings, wl, terms, gpus_row, pruned)
    out = [c for plan in plans
           if (c := _kept(i, plan, rs, request, wl, terms, pruned)) is not None]
    return out, near


def _aggregated(i: int, rs: RowScreen, request: PlanRequest, settings: SearchSettings,
                wl: WorkloadMeans, gpus_row: np.ndarray, pruned: Counter[str],
                near: list[Nearest]) -> _ModePlan:
    """Replicas of the aggregated worker that carry the design rate; the rows that cannot,
    first 50, go to `near` (what came closest, for the explanation)."""
    g = rs.rows.group
    R = len(settings.replica_factors)
    cap = rs.agg.capacity
    ok_rows = cap > 0
    pruned["slo"] += int((~ok_rows).sum()) * R
    for r in np.flatnonzero(~ok_rows)[:50]:
        near.append(Nearest(screen=i, row=int(r), ratio=float(rs.agg.best_ratio[r]),
                            term=int(rs.agg.best_term[r])))
    need = np.ceil(wl.design_rate / np.where(ok_rows, cap, np.inf))
    need = np.where(ok_rows, np.maximum(need, 1.0), np.inf)
    units = _units(need, gpus_row, g.price_per_gpu_hour, g.pool_gpus,
                   request.slo.max_cost_per_hour, settings.replica_factors)
    units = np.where(ok_rows[:, None], units, 0.0)
    load = wl.design_rate / np.maximum(units, 1.0)
    ttft, tpot = rs.agg.at(load)
    return _ModePlan(mode=0, ok=ok_rows, units=units, replicas=units,
                     prefill_replicas=units * 0, unit_gpus=gpus_row, ttft=ttft, tpot=tpot,
                     capacity=cap[:, None] * units, binding=rs.agg.binding)


def _disaggregated(rs: RowScreen, request: PlanRequest, settings: SearchSettings,
                   wl: WorkloadMeans, terms: list[Term], gpus_row: np.ndarray,
                   pruned: Counter[str]) -> list[_ModePlan]:
    """Units of p prefill + d decode workers, one plan per prefill:decode ratio."""
    assert rs.decode is not None and rs.prefill_rate is not None
    g = rs.rows.group
    R = len(settings.replica_factors)
    dec = rs.decode
    first_step = dec.tpot[:, 0]
    rho_max = screening.prefill_rho_max(rs, terms, first_step)
    cap_p = rho_max * rs.prefill_rate
    ok = (cap_p > 0) & (dec.capacity > 0)
    plans = []
    for m, (p, d) in enumerate(settings.pd_ratios, start=1):
        pruned["slo"] += int((~ok).sum()) * R
        need_u = np.maximum(np.ceil(wl.design_rate / np.where(ok, p * cap_p, np.inf)),
                            np.ceil(wl.design_rate / np.where(ok, d * dec.capacity, np.inf)))
        need_u = np.where(ok, np.maximum(need_u, 1.0), np.inf)
        unit_gpus = (p + d) * gpus_row
        u = _units(need_u, unit_gpus, g.price_per_gpu_hour, g.pool_gpus,
                   request.slo.max_cost_per_hour, settings.replica_factors)
        # Rows that cannot run this mode have no finite unit count: price them at one unit
        # (their `units` is zeroed below, so they are never kept) instead of inf * 0.
        uu = np.where(np.isfinite(u), np.maximum(u, 1.0), 1.0)
        rho = wl.design_rate / (p * uu * rs.prefill_rate[:, None])
        _, tpot_d = dec.at(wl.design_rate / (d * uu))
        ttft_d = screening.prefill_ttft(rs, rho) + tpot_d
        capacity = np.minimum(p * uu * cap_p[:, None], d * uu * dec.capacity[:, None])
        binding = np.where(p * cap_p <= d * dec.capacity, -2, dec.binding)
        plans.append(_ModePlan(mode=m, ok=ok, units=np.where(ok[:, None], u, 0.0),
                               replicas=d * u, prefill_replicas=p * u, unit_gpus=unit_gpus,
                               ttft=ttft_d, tpot=tpot_d, capacity=capacity, binding=binding))
    return plans


def _kept(i: int, plan: _ModePlan, rs: RowScreen, request: PlanRequest, wl: WorkloadMeans,
          terms: list[Term], pruned: Counter[str]) -> Candidates | None:
    """The plan's (row, replica factor) cells that meet the SLO within the pool, the budget
    and the replica bound; each cell pruned is counted under its reason."""
    g = rs.rows.group
    budget = request.slo.max_cost_per_hour
    max_replicas = request.bounds.max_replicas
    units, reps, preps = plan.units, plan.replicas, plan.prefill_replicas
    valid = units > 0
    pruned["duplicate"] += int((units < 0).sum())
    ratio, _ = screening.worst(terms, plan.ttft, plan.tpot, wl)
    late = valid & (ratio > _SLO_SLACK)
    pruned["slo"] += int(late.sum())
    gpus = units * plan.unit_gpus[:, None]
    cost = gpus * g.price_per_gpu_hour
    over_pool = valid & ~late & (gpus > g.pool_gpus)
    pruned["pool"] += int(over_pool.sum())
    over_budget = valid & ~late & ~over_pool & (budget is not None) & (
        cost > (budget if budget is not None else np.inf))
    pruned["budget"] += int(over_budget.sum())
    over_replicas = valid & ~late & ~over_pool & ~over_budget & (
        reps + preps > (max_replicas if max_replicas is not None else np.inf))
    pruned["replicas"] += int(over_replicas.sum())
    keep = valid & ~late & ~over_pool & ~over_budget & ~over_replicas
    # "Fill the pool" below what the rate needs: the pool (or budget) is too small.
    pruned["pool"] += int(((units == 0) & plan.ok[:, None]).sum())
    r_idx, o_idx = np.nonzero(keep)
    if len(r_idx) == 0:
        return None
    quality = np.nan if g.quality is None else g.quality
    return Candidates(
        screen=np.full(len(r_idx), i), row=r_idx, mode=np.full(len(r_idx), plan.mode),
        replicas=reps[r_idx, o_idx].astype(np.int64),
        prefill_replicas=preps[r_idx, o_idx].astype(np.int64),
        gpus=gpus[r_idx, o_idx].astype(np.int64), cost=cost[r_idx, o_idx],
        capacity=plan.capacity[r_idx, o_idx], ttft_mean=plan.ttft[r_idx, o_idx],
        tpot_mean=plan.tpot[r_idx, o_idx], quality=np.full(len(r_idx), quality),
        binding=np.asarray(plan.binding)[r_idx])
