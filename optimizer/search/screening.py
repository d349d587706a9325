"""Analytic screening: price every surviving candidate with the closed-loop model, vectorized.

Second stage of the search (space -> screening -> pareto -> confirming). Per group, one
StepModel prices every row: the largest concurrency at which the predicted percentiles meet
the SLO (a geometric ladder of concurrencies, then a few bisection steps), the requests/s
that concurrency sustains (Little's law, as the closed loop computes it), replicas for the
design rate, and the latencies at the rate each replica then actually carries (interpolated
along the ladder). Disaggregated rows size a prefill pool (M/D/1 queue on prefill service, KV
transfer added to TTFT) and a decode pool (the closed loop with a one-token prefill).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import numpy.typing as npt

from trilemma.optimizer.catalog import speculation
from trilemma.optimizer.catalog.speculation import SpecMethod
from trilemma.optimizer.perf import engine as perf_engine
from trilemma.optimizer.perf import latency, memory, steps
from trilemma.optimizer.search.space import Group, Rows, SearchSettings, Space
from trilemma.optimizer.spec.plan_request import PlanRequest


class SloMetric(enum.StrEnum):
    """What an SLO term bounds: time to first token, time per output token, end to end."""

    TTFT = "ttft"
    TPOT = "tpot"
    E2E = "e2e"

# The closed-loop model predicts means. Percentile = mean x factor. Open-loop arrivals queue
# prefills, so TTFT spreads much more than TPOT (a step time averaged over a whole output).
# Chosen by hand, not fitted (a calibration against the simulator is still to do); confirming
# replaces them by simulated percentiles for the configurations near the front.
PERCENTILE_FACTORS: dict[SloMetric, dict[str, float]] = {
    SloMetric.TTFT: {"p50": 0.9, "p90": 1.7, "p99": 2.8},
    SloMetric.TPOT: {"p50": 1.0, "p90": 1.15, "p99": 1.4},
}
_LEVELS = 8            # concurrency ladder points, 1 .. the slots that fit
_BISECTIONS = 3        # refine the largest passing concurrency to ~(ladder ratio)^(1/8)
_MAX_PREFILL_RHO = 0.9  # a prefill pool run hotter than this has no TTFT headroom
KV_TRANSFER_LATENCY_MS = 1.0  # NIXL setup per hand-off, as serving.cluster assumes

SLOTS = -1  # binding code: capacity limited by sequences that fit (memory or max_num_seqs)


@dataclass(frozen=True, kw_only=True)
class Term:
    """One SLO bound the screen checks: metric, percentile ("p50", "p90", "p99"), ms."""

    metric: SloMetric
    pct: str
    target_ms: float

    @property
    def name(self) -> str:
        return f"{self.metric} {self.pct} <= {self.target_ms:g} ms"


def slo_terms(request: PlanRequest) -> list[Term]:
    slo = request.slo
    terms: list[Term] = []
    if slo.ttft_ms is not None:
        terms += [Term(metric=SloMetric.TTFT, pct=p, target_ms=v)
                  for p, v in slo.ttft_ms.items()]
    if slo.tpot_ms is not None:
        terms += [Term(metric=SloMetric.TPOT, pct=p, target_ms=v)
                  for p, v in slo.tpot_ms.items()]
    if slo.min_tokens_per_second_per_user is not None:
        terms.append(Term(metric=SloMetric.TPOT, pct="p50",
                          target_ms=1000.0 / slo.min_tokens_per_second_per_user))
    if slo.end_to_end_ms is not None:
        terms += [Term(metric=SloMetric.E2E, pct=p, target_ms=v)
                  for p, v in slo.end_to_end_ms.items()]
    return terms


@dataclass(frozen=True, kw_only=True)
class WorkloadMeans:
    """The spec's workload reduced to what the screen needs: means at the design rate.

    Field names follow the glossary (README, "How the model works"): prompt_tokens and
    output_tokens are per-request means, cached_tokens the mean prompt tokens served from the
    prefix cache, design_rate the requests/s to size for (mean rate x peak factor), and
    output_tokens_pct the output length's percentiles ("p50", "p90", "p99").
    """

    prompt_tokens: float
    output_tokens: float
    cached_tokens: float
    design_rate: float
    output_predictability: float
    output_tokens_pct: dict[str, float]

    @classmethod
    def of(cls, request: PlanRequest) -> WorkloadMeans:
        wl = request.workload
        out = wl.output_distribution()
        return cls(prompt_tokens=wl.prompt_distribution().mean_tokens(),
                   output_tokens=out.mean_tokens(), cached_tokens=wl.expected_cached_tokens(),
                   design_rate=wl.design_rate(), output_predictability=wl.output_predictability,
                   output_tokens_pct={p: out.percentile_tokens(float(p[1:])) for p in
                                      ("p50", "p90", "p99")})


def percentile(metric: SloMetric, pct: str, ttft: np.ndarray, tpot: np.ndarray,
               wl: WorkloadMeans) -> np.ndarray:
    """A percentile of `metric` from predicted means (the factors above)."""
    if metric is SloMetric.TTFT:
        return ttft * PERCENTILE_FACTORS[SloMetric.TTFT][pct]
    if metric is SloMetric.TPOT:
        return tpot * PERCENTILE_FACTORS[SloMetric.TPOT][pct]
    # End to end: a long answer, not a slow step, makes a request late.
    decode_steps = max(wl.output_tokens_pct[pct] - 1.0, 0.0)
    return ttft * PERCENTILE_FACTORS[SloMetric.TTFT][pct] + decode_steps * tpot


def worst(terms: list[Term], ttft: np.ndarray, tpot: np.ndarray,
          wl: WorkloadMeans) -> tuple[np.ndarray, np.ndarray]:
    """Largest predicted/target ratio over the SLO terms (<= 1 meets all) and its term."""
    if not terms:
        z = np.zeros(np.broadcast(ttft, tpot).shape)
        return z, z.astype(np.int64)
    ratios = np.stack([percentile(t.metric, t.pct, ttft, tpot, wl) / t.target_ms
                       for t in terms])
    return ratios.max(0), ratios.argmax(0)


@dataclass(frozen=True, kw_only=True)
class Curve:
    """Per row: the concurrency ladder (ascending rps) and the capacity found on it."""

    rps: np.ndarray        # (n, L) requests/s per replica
    ttft: np.ndarray       # (n, L) mean ms
    tpot: np.ndarray       # (n, L) mean ms
    capacity: np.ndarray   # (n,) requests/s per replica within the SLO (0 if none)
    binding: np.ndarray    # (n,) term index that stops more load, or SLOTS
    best_ratio: np.ndarray  # (n,) worst SLO ratio at the lightest load (nearest misses)
    best_term: np.ndarray  # (n,) its term

    def at(self, rate: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mean TTFT and TPOT of each row when one replica carries `rate` (n, K) req/s."""
        return _interp(self.rps, self.ttft, rate), _interp(self.rps, self.tpot, rate)


def _interp(xg: np.ndarray, yg: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Row-wise linear interpolation; x below the grid takes the first point."""
    L = xg.shape[1]
    idx = (xg[:, None, :] < x[:, :, None]).sum(-1)
    i1 = np.clip(idx, 1, L - 1)
    i0 = i1 - 1
    x0 = np.take_along_axis(xg, i0, 1)
    x1 = np.take_along_axis(xg, i1, 1)
    y0 = np.take_along_axis(yg, i0, 1)
    y1 = np.take_along_axis(yg, i1, 1)
    w = np.clip((x - x0) / np.maximum(x1 - x0, 1e-12), 0.0, 1.0)
    y: np.ndarray = y0 + w * (y1 - y0)
    return y


def capacity_curve(evaluate: Callable[[np.ndarray], tuple[np.ndarray, ...]], cmax: np.ndarray,
                   terms: list[Term], wl: WorkloadMeans, levels: int = _LEVELS,
                   bisections: int = _BISECTIONS) -> Curve:
    """The largest concurrency per row (<= cmax) whose predictions meet `terms`."""
    ev = evaluate  # C (n, k) -> (ttft, tpot, rps), each (n, k)
    n = len(cmax)
    ar = np.arange(n)
    _LEVELS = levels
    frac = np.linspace(0.0, 1.0, _LEVELS)
    C = np.exp(np.log(np.maximum(cmax, 1.0))[:, None] * frac[None, :])
    ttft, tpot, rps = ev(C)
    ratio, term = worst(terms, ttft, tpot, wl)
    ok = ratio <= 1.0
    # Latency grows with load: the largest passing level, then bisection towards the next.
    last = np.where(ok.any(1), _LEVELS - 1 - np.argmax(ok[:, ::-1], axis=1), 0)
    any_ok = ok.any(1)
    lo = C[ar, last]
    top = last == _LEVELS - 1
    hi = C[ar, np.minimum(last + 1, _LEVELS - 1)]
    binding = np.where(top, SLOTS, term[ar, np.minimum(last + 1, _LEVELS - 1)])
    lo_t, lo_p, lo_r = ttft[ar, last], tpot[ar, last], rps[ar, last]
    todo = any_ok & ~top
    for _ in range(bisections):
        if not todo.any():
            break
        mid = np.sqrt(lo * hi)
        t, p, r = (a[:, 0] for a in ev(mid[:, None]))
        rr, _ = worst(terms, t, p, wl)
        up = todo & (rr <= 1.0)
        down = todo & ~up
        lo = np.where(up, mid, lo)
        lo_t, lo_p, lo_r = (np.where(up, a, b) for a, b in ((t, lo_t), (p, lo_p), (r, lo_r)))
        hi = np.where(down, mid, hi)
    # Add the refined capacity point to the ladder so interpolation up to it stays inside.
    grid_r = np.concatenate([rps, lo_r[:, None]], 1)
    grid_t = np.concatenate([ttft, lo_t[:, None]], 1)
    grid_p = np.concatenate([tpot, lo_p[:, None]], 1)
    order = np.argsort(grid_r, axis=1, kind="stable")
    grid_r, grid_t, grid_p = (np.take_along_axis(a, order, 1) for a in (grid_r, grid_t, grid_p))
    return Curve(rps=grid_r, ttft=grid_t, tpot=grid_p,
                 capacity=np.where(any_ok, lo_r, 0.0), binding=binding,
                 best_ratio=ratio[:, 0], best_term=term[:, 0])


@dataclass(frozen=True, kw_only=True)
class RowScreen:
    """Per-replica results of one group's rows."""

    rows: Rows
    cached_tokens: np.ndarray  # per row: prompt tokens served from the prefix cache
    agg: Curve
    decode: Curve | None
    prefill_service_ms: np.ndarray | None    # one request's prefill on an idle rank
    prefill_rate: np.ndarray | None          # requests/s one prefill replica sustains at rho=1
    transfer_ms: np.ndarray | None
    overhead_ms: float


_STEP_MODELS: dict[tuple[str, str, str, str, str], steps.StepModel] = {}


def _step_model(g: Group) -> steps.StepModel:
    """One StepModel per (model, GPU, quantization, KV dtype, engine): speculation and layout
    are arguments of its calls, and building one loads kernel tables (milliseconds)."""
    key = (g.arch.id, g.gpu.key, g.quant.value, g.kv.value, g.engine.value)
    sm = _STEP_MODELS.get(key)
    if sm is None:
        sm = steps.StepModel(g.arch, g.gpu, g.quant, g.kv, perf_engine.engine_facts(g.engine))
        _STEP_MODELS[key] = sm
    return sm


def screen_rows(rows: Rows, request: PlanRequest, wl: WorkloadMeans, terms: list[Term],
                disaggregate: bool, coarse: bool = False) -> RowScreen:
    g = rows.group
    facts = perf_engine.engine_facts(g.engine)
    sm = _step_model(g)
    cached = np.where(rows.prefix_caching, min(wl.cached_tokens, wl.prompt_tokens - 1.0), 0.0)
    spec = g.spec
    k = float(spec.k)
    mem = memory.breakdown(g.arch, g.gpu, g.quant, g.kv, facts, tp=rows.tp, pp=rows.pp,
                           dp=rows.dp, seq_len=wl.prompt_tokens + wl.output_tokens + k,
                           max_batched_tokens=rows.max_num_batched_tokens,
                           max_num_seqs=rows.max_num_seqs, cp=rows.cp)
    seats = np.minimum(rows.max_num_seqs, rows.max_num_batched_tokens // (1 + spec.k))
    cmax = rows.dp * np.maximum(np.minimum(seats, mem.max_seqs), 1.0)

    def col(a: npt.ArrayLike) -> np.ndarray:
        column: np.ndarray = np.asarray(a)[:, None]  # rows along axis 0
        return column

    def run(C: np.ndarray, cached_tokens: np.ndarray) -> tuple[np.ndarray, ...]:
        r = latency.closed_loop(
            sm, tp=col(rows.tp), pp=col(rows.pp), dp=col(rows.dp), ep=col(rows.ep),
            concurrency=C, prompt_tokens=wl.prompt_tokens, output_tokens=wl.output_tokens,
            cached_tokens=col(cached_tokens),
            max_batched_tokens=col(rows.max_num_batched_tokens),
            max_num_seqs=col(rows.max_num_seqs), spec=spec,
            output_predictability=wl.output_predictability,
            first_wave_weight=0.0,  # open-loop serving has no synchronized first wave
            cp=col(rows.cp))
        return r.ttft_ms, r.tpot_ms, r.requests_per_s

    if coarse:
        agg_curve = capacity_curve(lambda C: run(C, cached), cmax, terms, wl, levels=4,
                                   bisections=0)
        return RowScreen(rows=rows, cached_tokens=cached, agg=agg_curve, decode=None,
                         prefill_service_ms=None, prefill_rate=None, transfer_ms=None,
                         overhead_ms=facts.request_overhead_ms)
    agg_curve = capacity_curve(lambda C: run(C, cached), cmax, terms, wl)
    if not disaggregate:
        return RowScreen(rows=rows, cached_tokens=cached, agg=agg_curve, decode=None,
                         prefill_service_ms=None, prefill_rate=None, transfer_ms=None,
                         overhead_ms=facts.request_overhead_ms)
    # Decode pool: requests arrive with their KV; only TPOT terms apply to it.
    tpot_terms = [t for t in terms if t.metric is SloMetric.TPOT]
    decode = capacity_curve(lambda C: run(C, np.full(len(rows), wl.prompt_tokens - 1.0)), cmax,
                            tpot_terms, wl)
    # Prefill pool: chunks of the token budget, batched when several prompts fit one.
    prefill = np.maximum(wl.prompt_tokens - cached, 1.0)
    budget = rows.max_num_batched_tokens.astype(np.float64)
    chunk = np.minimum(prefill, budget)
    ones = np.ones(len(rows))

    def pf(tokens: np.ndarray, seqs: np.ndarray, kv: np.ndarray) -> np.ndarray:
        return sm.step(tp=rows.tp, dp=rows.dp, ep=rows.ep, pp=rows.pp, dec_seqs=0.0 * ones,
                       dec_kv=0.0 * ones, pf_tokens=tokens, pf_seqs=seqs, pf_kv=kv,
                       cp=rows.cp).total

    t_chunk = pf(chunk, ones, cached + 0.5 * (prefill + chunk))
    service = prefill / chunk * t_chunk
    batch = np.maximum(np.floor(budget / prefill), 1.0)
    t_batch = pf(batch * prefill, batch, cached + prefill)
    per_rank = np.where(batch > 1, batch / t_batch, 1.0 / service)  # requests/ms
    per_token = memory.kv_bytes_per_token_per_gpu(g.arch, g.kv, rows.tp, rows.pp, rows.cp)
    # Pools sit on different nodes: the KV crosses the scale-out network.
    transfer = KV_TRANSFER_LATENCY_MS + wl.prompt_tokens * per_token / g.gpu.inter_node_bw * 1e3
    return RowScreen(rows=rows, cached_tokens=cached, agg=agg_curve, decode=decode,
                     prefill_service_ms=service, prefill_rate=per_rank * rows.dp * 1e3,
                     transfer_ms=transfer, overhead_ms=facts.request_overhead_ms)


def prefill_ttft(rs: RowScreen, rho: np.ndarray) -> np.ndarray:
    """Mean TTFT of the prefill side (before the first decode step) at utilisation rho."""
    assert rs.prefill_service_ms is not None and rs.transfer_ms is not None
    s = rs.prefill_service_ms[:, None]
    rho = np.minimum(rho, 0.999)
    ttft: np.ndarray = (rs.overhead_ms + s * (1.0 + rho / (2.0 * (1.0 - rho)))
                        + rs.transfer_ms[:, None])
    return ttft


def prefill_rho_max(rs: RowScreen, terms: list[Term], first_step_ms: np.ndarray) -> np.ndarray:
    """Highest prefill utilisation whose TTFT meets every TTFT term (0 where none does)."""
    assert rs.prefill_service_ms is not None and rs.transfer_ms is not None
    rho = np.full(len(rs.rows), _MAX_PREFILL_RHO)
    s = rs.prefill_service_ms
    for t in terms:
        if t.metric is not SloMetric.TTFT:
            continue
        slack = (t.target_ms / PERCENTILE_FACTORS[SloMetric.TTFT][t.pct] - rs.overhead_ms
                 - rs.transfer_ms - first_step_ms) / s - 1.0
        # s (1 + rho / (2 (1 - rho))) <= budget  <=>  rho <= 2x / (1 + 2x)
        rho = np.minimum(rho, np.where(slack > 0, 2 * slack / (1 + 2 * slack), 0.0))
    return rho


def tokens_per_step(rows: Rows, output_predictability: float) -> float:
    spec = rows.group.spec
    if spec.method is SpecMethod.NONE:
        return 1.0
    a = speculation.acceptance_rate(spec.method, output_predictability)
    return float(speculation.expected_tokens_per_step(a, spec.k))


def subset(rows: Rows, keep: np.ndarray) -> Rows:
    return Rows(group=rows.group, tp=rows.tp[keep], pp=rows.pp[keep], dp=rows.dp[keep],
                ep=rows.ep[keep], max_num_seqs=rows.max_num_seqs[keep],
                max_num_batched_tokens=rows.max_num_batched_tokens[keep],
                prefix_caching=rows.prefix_caching[keep], cp=rows.cp[keep])


# Coarse pass: one engine-limit setting per layout, a 4-point ladder. Layouts whose $ per
# request/s or $/hour at the design rate is within this factor of the best, or among the
# fastest at light load, go on to the full screen with every engine limit and serving mode.
COARSE_KEEP_FACTOR = 2.0
# Tighter on $/hour at the design rate: it is what min_cost ranks on, less the engine limits'
# effect; at high rates it tracks $ per request/s, at low rates many layouts need one replica.
COARSE_KEEP_DEPLOY_FACTOR = 1.25
COARSE_KEEP_FASTEST = 48
COARSE_KEEP_MAX = 400
_REPRESENTATIVE = (256, 8192)


def _layout_keys(rows: Rows) -> np.ndarray:
    keys = (rows.cp * 100_000_000 + rows.tp * 1_000_000 + rows.pp * 10_000 + rows.dp * 100
            + rows.ep)
    return np.asarray(keys).astype(np.int64)


Mapper = Callable[[Callable[[int], Any], list[int]], list[Any]]


def _serial(fn: Callable[[int], Any], items: list[int]) -> list[Any]:
    return [fn(i) for i in items]


def coarse_scores(rows: Rows, request: PlanRequest, wl: WorkloadMeans,
                  terms: list[Term]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One representative row per layout, 4-point ladder: (layout keys, $ per request/s,
    light-load e2e ms, $/hour of the fewest replicas that carry the design rate). Infinite
    where the layout meets no SLO."""
    keys = _layout_keys(rows)
    # The row closest to vLLM's defaults stands for its layout.
    dist = (np.abs(np.log2(rows.max_num_seqs / _REPRESENTATIVE[0]))
            + np.abs(np.log2(rows.max_num_batched_tokens / _REPRESENTATIVE[1])))
    order = np.lexsort((dist, keys))
    first = order[np.r_[True, keys[order][1:] != keys[order][:-1]]]
    rep = subset(rows, first)
    rs = screen_rows(rep, request, wl, terms, False, coarse=True)
    gpus = rep.tp * rep.pp * rep.dp * rows.group.price_per_gpu_hour
    eff = np.where(rs.agg.capacity > 0, gpus / np.maximum(rs.agg.capacity, 1e-12), np.inf)
    light = rs.agg.ttft[:, 0] + wl.output_tokens * rs.agg.tpot[:, 0]
    # Replicas are whole: at a low design rate one small replica can cost less than one of a
    # layout far cheaper per request/s, which the rate leaves mostly idle.
    deploy = np.where(rs.agg.capacity > 0,
                      np.ceil(wl.design_rate / np.maximum(rs.agg.capacity, 1e-12)) * gpus, np.inf)
    return keys[first], eff, np.where(rs.agg.capacity > 0, light, np.inf), deploy


# Each GPU type and engine keeps its own cheapest and fastest layouts, however far another
# undercuts it: the plan's alternatives show the best on each, and when one GPU type is much
# cheaper at the pool's prices the global cut would leave nothing of the others to show.
COARSE_KEEP_PER_KIND = 2


def _keep_each_kind(space: Space, sizes: list[int], scores: tuple[np.ndarray, ...],
                    chosen: np.ndarray) -> None:
    owner = np.repeat(np.arange(len(sizes)), sizes)
    for kind in ("gpu", "engine"):
        names = np.array([g.gpu.key if kind == "gpu" else g.engine.value
                          for g in (space.rows[i].group for i in range(len(sizes)))])[owner]
        for name in np.unique(names):
            for score in scores:
                idx = np.flatnonzero((names == name) & np.isfinite(score))
                chosen[idx[np.argsort(score[idx], kind="stable")[:COARSE_KEEP_PER_KIND]]] = True


def screen_space(space: Space, request: PlanRequest, settings: SearchSettings,
                 mapper: Mapper = _serial) -> tuple[list[RowScreen], int, int]:
    """Coarse-screen every layout, fully screen the promising ones.

    Returns the full screens, the candidates dropped by the coarse pass and the layouts
    priced by it. `mapper(fn, group indices)` runs fn over groups (in order, results in
    order): serial here, across processes in `parallel`.
    """
    terms = slo_terms(request)
    wl = WorkloadMeans.of(request)
    disagg = request.bounds.allow_disaggregation
    if not space.rows:
        return [], 0, 0
    scored = mapper(lambda i: coarse_scores(space.rows[i], request, wl, terms),
                    list(range(len(space.rows))))
    effs = [e for _, e, _, _ in scored]
    all_eff = np.concatenate(effs)
    all_fast = np.concatenate([f for _, _, f, _ in scored])
    all_deploy = np.concatenate([d for *_, d in scored])
    best = all_eff.min()
    chosen = all_eff <= best * COARSE_KEEP_FACTOR
    if chosen.sum() > COARSE_KEEP_MAX:
        chosen = np.zeros_like(chosen)
        chosen[np.argsort(all_eff, kind="stable")[:COARSE_KEEP_MAX]] = True
    finite = np.isfinite(all_fast)
    chosen[np.argsort(all_fast, kind="stable")[:min(COARSE_KEEP_FASTEST, int(finite.sum()))]] \
        = True
    chosen |= all_deploy <= all_deploy.min() * COARSE_KEEP_DEPLOY_FACTOR
    _keep_each_kind(space, [len(e) for e in effs], (all_eff, all_fast, all_deploy), chosen)
    # Keep something to explain an infeasible SLO: the layouts nearest to meeting it. And
    # everything when the coarse cut is off (the exhaustive reference that regret measures).
    if not chosen.any() or not settings.coarse_screen:
        chosen[:] = True
    keeps: dict[int, np.ndarray] = {}
    dropped = 0
    per_row = space.modes * space.replica_options
    start = 0
    for i, (keys, eff, *_) in enumerate(scored):
        mask = chosen[start:start + len(eff)]
        start += len(eff)
        keep = np.isin(_layout_keys(space.rows[i]), keys[mask])
        dropped += int((~keep).sum()) * per_row
        if keep.any():
            keeps[i] = keep
    def full(i: int) -> dict[str, Any]:
        # Everything but the rows, which hold catalog objects that do not pickle; the
        # caller has them already.
        rs = screen_rows(subset(space.rows[i], keeps[i]), request, wl, terms, disagg)
        return {f.name: getattr(rs, f.name) for f in fields(rs) if f.name != "rows"}

    idx = sorted(keeps)
    out = [RowScreen(rows=subset(space.rows[i], keeps[i]), **d)
           for i, d in zip(idx, mapper(full, idx), strict=True)]
    return out, dropped, len(all_eff)
