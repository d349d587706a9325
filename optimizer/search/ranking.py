"""Objectives over priced candidates: the cost/latency front, the pick, and typed Choices.

Fourth step of the search (space -> screening -> sizing -> ranking -> confirming ->
explaining). Sizing leaves parallel arrays; here each objective becomes one number per
candidate, the cost/latency Pareto front is thinned to what a person can read, and the rows
that leave the search become `Choice`s (the plan IR the renderer and operator consume).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from trilemma.optimizer.catalog.speculation import SpecMethod
from trilemma.optimizer.search import pareto, screening
from trilemma.optimizer.search.configs import (
    Choice,
    Mode,
    Prediction,
    ServingConfig,
    WorkerConfig,
)
from trilemma.optimizer.search.screening import RowScreen, SloMetric, WorkloadMeans
from trilemma.optimizer.search.sizing import Candidates
from trilemma.optimizer.search.space import Group, SearchSettings
from trilemma.optimizer.spec.objective import Objective

ANALYTIC = "analytic: closed-loop step model, percentiles = mean x PERCENTILE_FACTORS"


@dataclass(frozen=True, kw_only=True)
class Metrics:
    """One value per candidate for each axis the objectives rank on."""

    cost: np.ndarray          # $/hour, lower is better
    latency: np.ndarray       # ms: TTFT p90 + TPOT p90 x (mean output - 1), lower is better
    capacity: np.ndarray      # requests/s within the SLO, higher is better


def metrics(c: Candidates, wl: WorkloadMeans) -> Metrics:
    ttft90 = screening.percentile(SloMetric.TTFT, "p90", c.ttft_mean, c.tpot_mean, wl)
    tpot90 = screening.percentile(SloMetric.TPOT, "p90", c.ttft_mean, c.tpot_mean, wl)
    return Metrics(cost=c.cost.astype(np.float64),
                   latency=ttft90 + tpot90 * max(wl.output_tokens - 1.0, 0.0),
                   capacity=c.capacity.astype(np.float64))


def e2e_ms(ttft_p90: float, tpot_p90: float, wl: WorkloadMeans) -> float:
    """The latency axis for one prediction (simulated or analytic)."""
    return ttft_p90 + tpot_p90 * max(wl.output_tokens - 1.0, 0.0)


def order(objective: Objective, m: Metrics) -> np.ndarray:
    """Candidate indices best first; ties broken by the other axes, then by index, so that the
    same candidates always rank the same way."""
    idx = np.arange(len(m.cost))
    if objective is Objective.MIN_COST:
        return np.lexsort((idx, -m.capacity, m.latency, m.cost))
    if objective is Objective.MAX_THROUGHPUT:
        return np.lexsort((idx, m.latency, m.cost, -m.capacity))
    if objective is Objective.MIN_LATENCY:
        return np.lexsort((idx, -m.capacity, m.cost, m.latency))
    # Balanced: distance to the utopia point of the front, normalised per axis; off-front
    # points rank by the same distance, so a runner-up is the next nearest to the knee.
    d = knee_distance(m.cost, m.latency)
    return np.lexsort((idx, m.latency, m.cost, d))


def knee_distance(cost: np.ndarray, latency: np.ndarray) -> np.ndarray:
    """Distance of each point to (min cost, min latency), both axes scaled to the front's
    range, so that neither dollars nor milliseconds dominate by their units."""
    if len(cost) == 0:
        return np.zeros(0)
    front = pareto.pareto_front(np.stack([cost, latency], 1), [pareto.Sense.MIN] * 2)
    c0, c1 = cost[front].min(), cost[front].max()
    l0, l1 = latency[front].min(), latency[front].max()
    x = (cost - c0) / max(c1 - c0, 1e-12 * max(c1, 1.0))
    y = (latency - l0) / max(l1 - l0, 1e-12 * max(l1, 1.0))
    distance: np.ndarray = np.hypot(x, y)
    return distance


def front(m: Metrics, size: int) -> np.ndarray:
    """The cost/latency Pareto front: one candidate per distinct point, cheapest first,
    thinned to `size` points spread evenly along the front (both ends kept)."""
    if len(m.cost) == 0:
        return np.zeros(0, dtype=np.int64)
    pts = np.stack([m.cost, m.latency], 1)
    idx = pareto.pareto_front(pts, [pareto.Sense.MIN] * 2)
    # Equal points differ only in settings that change nothing predicted: keep the one with
    # most capacity (then the lowest index) as their representative.
    idx = idx[np.lexsort((idx, -m.capacity[idx], m.latency[idx], m.cost[idx]))]
    _, first = np.unique(np.round(pts[idx], 9), axis=0, return_index=True)
    idx = idx[np.sort(first)]
    idx = idx[np.lexsort((idx, m.latency[idx], m.cost[idx]))]
    if len(idx) <= size:
        return idx
    # Even spacing in normalised arc length, so crowded stretches do not crowd the output.
    c = (m.cost[idx] - m.cost[idx].min()) / max(np.ptp(m.cost[idx]), 1e-12)
    lat = (m.latency[idx] - m.latency[idx].min()) / max(np.ptp(m.latency[idx]), 1e-12)
    arc = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(c), np.diff(lat)))])
    want = np.linspace(0.0, arc[-1], size)
    pick = np.unique(np.searchsorted(arc, want, side="left").clip(0, len(idx) - 1))
    picked: np.ndarray = idx[pick]
    return picked


def worker(rs: RowScreen, row: int, *, prefill: bool = False) -> WorkerConfig:
    rows, g = rs.rows, rs.rows.group
    spec = g.spec
    # A prefill worker never decodes past the first token: speculation buys it nothing.
    method, k = (SpecMethod.NONE, 0) if prefill else (spec.method, spec.k)
    return WorkerConfig(
        gpu=g.gpu.key, tp=int(rows.tp[row]), pp=int(rows.pp[row]), dp=int(rows.dp[row]),
        ep=bool(rows.ep[row]), quant=g.quant, kv_dtype=g.kv,
        spec_method=method, spec_k=int(k), draft_model=spec.draft_model,
        max_num_seqs=int(rows.max_num_seqs[row]),
        max_num_batched_tokens=int(rows.max_num_batched_tokens[row]),
        prefix_caching=bool(rows.prefix_caching[row]), max_model_len=g.max_model_len,
        cp=int(rows.cp[row]))


def config(c: Candidates, i: int, screens: list[RowScreen],
           settings: SearchSettings) -> ServingConfig:
    rs = screens[int(c.screen[i])]
    row = int(c.row[i])
    g = rs.rows.group
    mode = int(c.mode[i])
    w = worker(rs, row)
    if mode == 0:
        return ServingConfig(model=g.choice.id, engine=g.engine, worker=w,
                             replicas=int(c.replicas[i]))
    return ServingConfig(model=g.choice.id, engine=g.engine, mode=Mode.DISAGGREGATED,
                         worker=w, replicas=int(c.replicas[i]),
                         prefill=worker(rs, row, prefill=True),
                         prefill_replicas=int(c.prefill_replicas[i]))


def prediction(c: Candidates, i: int, wl: WorkloadMeans) -> Prediction:
    t, p = c.ttft_mean[i:i + 1], c.tpot_mean[i:i + 1]

    def pct(metric: SloMetric, q: str) -> float:
        return float(screening.percentile(metric, q, t, p, wl)[0])

    cost = float(c.cost[i])
    tokens_per_hour = wl.design_rate * wl.output_tokens * 3600.0
    q = float(c.quality[i])
    return Prediction(
        ttft_p50_ms=pct(SloMetric.TTFT, "p50"), ttft_p90_ms=pct(SloMetric.TTFT, "p90"),
        tpot_p50_ms=pct(SloMetric.TPOT, "p50"), tpot_p90_ms=pct(SloMetric.TPOT, "p90"),
        e2e_p99_ms=pct(SloMetric.E2E, "p99"), capacity_rps=float(c.capacity[i]),
        cost_per_hour=cost,
        cost_per_mtok=cost / max(tokens_per_hour, 1e-12) * 1e6,
        quality=None if np.isnan(q) else q,
        provenance={"latency": ANALYTIC, "capacity": "analytic: largest load meeting the SLO"})


def choice(c: Candidates, i: int, screens: list[RowScreen], settings: SearchSettings,
           wl: WorkloadMeans) -> Choice:
    pred = prediction(c, i, wl)
    gpu = screens[int(c.screen[i])].rows.group.gpu
    if not gpu.calibrated:
        # A plan on a GPU without measured kernel tables says what its numbers rest on.
        pred = dataclasses.replace(pred, provenance={**pred.provenance, "kernels": gpu.kernels})
    return Choice(config=config(c, i, screens, settings), prediction=pred)


def worker_of_group(g: Group) -> WorkerConfig:
    """The group-level fields of a worker (layout and limits left at their defaults)."""
    return WorkerConfig(gpu=g.gpu.key, quant=g.quant, kv_dtype=g.kv,
                        spec_method=g.spec.method, spec_k=int(g.spec.k),
                        draft_model=g.spec.draft_model)
