"""Crossed plans: disaggregated, prefill workers on one GPU type and decode workers on another.

Prefill is compute-bound and decode memory-bound, so the GPU cheapest per prefilled request
need not be the one cheapest per decoded token. Composed after sizing from the screen's
per-replica figures, like mixing.py: per (model, engine, quantization, KV dtype, speculation)
and GPU type, the one-node row with the lowest $/hour per request it prefills at full load and
the one with the lowest $/hour per req/s it decodes within the TPOT terms; then every ordered
pair of two types at every prefill:decode ratio of the settings, with the fewest units that
carry the design rate in both pools' GPU counts. Bounded by groups x types^2 x ratios.

The KV crosses between the two node types over the scale-out network with the engines' own
connectors (vLLM's NixlConnector, SGLang's nixl/mooncake transfer backend: what the renderer
already emits for disaggregation): each prefill GPU sends its shard at the slower of the two
types' NIC bandwidths. TTFT is the prefill queue (M/D/1, as screening.prefill_ttft) plus that
transfer plus the decode pool's first step; TPOT the decode pool's at its share of the rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from trilemma.optimizer.search import ranking, screening
from trilemma.optimizer.search.configs import Choice, Mode, Prediction, ServingConfig
from trilemma.optimizer.search.screening import RowScreen, SloMetric, Term, WorkloadMeans
from trilemma.optimizer.spec.plan_request import PlanRequest

_SLO_SLACK = 1.0 + 1e-6
_MAX_RHO = 0.9  # as screening's: a prefill pool hotter than this has no TTFT headroom


@dataclass(frozen=True, kw_only=True)
class Side:
    """One GPU type's best row for one side of a crossed plan."""

    screen: int
    row: int
    unit_gpus: int
    price: float           # $/GPU-hour
    pool_gpus: int
    bandwidth: float       # bytes/s, one GPU's scale-out NIC


def _best(rs: RowScreen, per_rps: np.ndarray, i: int) -> Side | None:
    g = rs.rows.group
    gpus = (rs.rows.tp * rs.rows.pp * rs.rows.dp).astype(np.float64)
    per = np.where(gpus <= g.gpus_per_node, per_rps, np.inf)
    if not np.isfinite(per).any():
        return None
    r = int(np.argmin(per))
    return Side(screen=i, row=r, unit_gpus=int(gpus[r]), price=g.price_per_gpu_hour,
                pool_gpus=g.pool_gpus, bandwidth=g.gpu.inter_node_bw)


def sides(screens: list[RowScreen]) -> dict[tuple[str, ...], dict[str, tuple[Side, Side]]]:
    """Per group key, per GPU type: (best prefill row, best decode row)."""
    out: dict[tuple[str, ...], dict[str, tuple[Side, Side]]] = {}
    for i, rs in enumerate(screens):
        if rs.decode is None or rs.prefill_rate is None:
            continue
        g = rs.rows.group
        gpus = (rs.rows.tp * rs.rows.pp * rs.rows.dp).astype(np.float64)
        cost = gpus * g.price_per_gpu_hour
        pre = _best(rs, np.where(rs.prefill_rate > 0, cost / np.maximum(rs.prefill_rate, 1e-12),
                                 np.inf), i)
        dec = _best(rs, np.where(rs.decode.capacity > 0,
                                 cost / np.maximum(rs.decode.capacity, 1e-12), np.inf), i)
        if pre is None or dec is None:
            continue
        key = (g.choice.id, g.engine.value, g.quant.value, g.kv.value, g.spec.method.value,
               str(g.spec.k))
        out.setdefault(key, {})[g.gpu.key] = (pre, dec)
    return out


def compose(screens: list[RowScreen], request: PlanRequest, wl: WorkloadMeans,
            terms: list[Term], ratios: tuple[tuple[int, int], ...]) -> list[Choice]:
    """Every crossed plan meeting the SLO, both pools, the budget and the replica bound."""
    out: dict[str, Choice] = {}
    for by_gpu in sides(screens).values():
        for x in sorted(by_gpu):
            for y in sorted(by_gpu):
                if x == y:
                    continue
                for p, d in ratios:
                    c = choice(by_gpu[x][0], by_gpu[y][1], p, d, screens, request, wl, terms)
                    if c is not None:
                        out.setdefault(c.config.config_hash(), c)
    return list(out.values())


def choice(pre: Side, dec: Side, p: int, d: int, screens: list[RowScreen],
           request: PlanRequest, wl: WorkloadMeans, terms: list[Term]) -> Choice | None:
    """p:d units of prefill on `pre`'s type and decode on `dec`'s, the fewest carrying the
    design rate; None where that misses the SLO or exceeds a pool, the budget or the bound."""
    rp, rd = screens[pre.screen], screens[dec.screen]
    assert rp.prefill_rate is not None and rp.prefill_service_ms is not None
    assert rp.transfer_ms is not None and rd.decode is not None
    a, b = pre.row, dec.row
    # The screen priced the sender's KV shard over its own NIC; the slower end sets the pace.
    transfer = screening.KV_TRANSFER_LATENCY_MS + (
        float(rp.transfer_ms[a]) - screening.KV_TRANSFER_LATENCY_MS) * (
        pre.bandwidth / min(pre.bandwidth, dec.bandwidth))
    service = float(rp.prefill_service_ms[a])
    first_step = float(rd.decode.tpot[b, 0])
    rho_max = _MAX_RHO
    for t in terms:
        if t.metric is SloMetric.TTFT:
            slack = (t.target_ms / screening.PERCENTILE_FACTORS[SloMetric.TTFT][t.pct]
                     - rp.overhead_ms - transfer - first_step) / service - 1.0
            rho_max = min(rho_max, 2 * slack / (1 + 2 * slack) if slack > 0 else 0.0)
    cap_p = rho_max * float(rp.prefill_rate[a])
    cap_d = float(rd.decode.capacity[b])
    if cap_p <= 0 or cap_d <= 0:
        return None
    units = max(math.ceil(wl.design_rate / (p * cap_p) - 1e-9),
                math.ceil(wl.design_rate / (d * cap_d) - 1e-9), 1)
    n_p, n_d = p * units, d * units
    cost = n_p * pre.unit_gpus * pre.price + n_d * dec.unit_gpus * dec.price
    budget, bound = request.slo.max_cost_per_hour, request.bounds.max_replicas
    if (n_p * pre.unit_gpus > pre.pool_gpus or n_d * dec.unit_gpus > dec.pool_gpus
            or (budget is not None and cost > budget) or (bound is not None
                                                           and n_p + n_d > bound)):
        return None
    rho = min(wl.design_rate / (n_p * float(rp.prefill_rate[a])), 0.999)
    _, tpot = (x[b:b + 1] for x in rd.decode.at(
        np.full((len(rd.decode.capacity), 1), wl.design_rate / n_d)))
    ttft = np.array([[rp.overhead_ms + service * (1.0 + rho / (2.0 * (1.0 - rho))) + transfer
                      ]]) + tpot
    ratio, _ = screening.worst(terms, ttft, tpot, wl)
    if terms and float(ratio.ravel()[0]) > _SLO_SLACK:
        return None
    g = rd.rows.group
    config = ServingConfig(model=g.choice.id, engine=g.engine, mode=Mode.DISAGGREGATED,
                           worker=ranking.worker(rd, b), replicas=n_d,
                           prefill=ranking.worker(rp, a, prefill=True), prefill_replicas=n_p)

    def pct(metric: SloMetric, q: str) -> float:
        return float(screening.percentile(metric, q, ttft, tpot, wl).ravel()[0])

    transfer_note = (f"KV over the network between {rp.rows.group.gpu.key} and "
                     f"{g.gpu.key} nodes: {transfer:.1f} ms at "
                     f"{min(pre.bandwidth, dec.bandwidth) / 1e9:.0f} GB/s per GPU")
    return Choice(config=config, prediction=Prediction(
        ttft_p50_ms=pct(SloMetric.TTFT, "p50"), ttft_p90_ms=pct(SloMetric.TTFT, "p90"),
        tpot_p50_ms=pct(SloMetric.TPOT, "p50"), tpot_p90_ms=pct(SloMetric.TPOT, "p90"),
        e2e_p99_ms=pct(SloMetric.E2E, "p99"),
        capacity_rps=min(n_p * cap_p, n_d * cap_d), cost_per_hour=cost,
        cost_per_mtok=cost / max(wl.design_rate * wl.output_tokens * 3600.0, 1e-12) * 1e6,
        quality=g.quality, provenance={"latency": ranking.ANALYTIC,
                                       "capacity": "analytic: largest load meeting the SLO",
                                       "transfer": transfer_note}))
