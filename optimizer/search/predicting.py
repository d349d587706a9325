"""One given configuration, predicted the way the search predicts its candidates.

For a configuration chosen elsewhere (the one an operator is running, a user's baseline):
the analytic screen gives its capacity and first latencies for exactly its layout and replica
count, and the simulator then replaces the latencies as the search's confirming stage does
(the same sample for a given seed), so it and a fresh plan's choices are judged by the same
method at the same workload. One predictor: this reuses the search's own stages.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from trilemma.optimizer.catalog import gpus, models
from trilemma.optimizer.catalog.speculation import SpecConfig
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.search import confirming, mixing, screening, space
from trilemma.optimizer.search.configs import Choice, Mode, Prediction, ServingConfig
from trilemma.optimizer.spec.plan_request import PlanRequest


@dataclass(frozen=True, kw_only=True)
class Predicted:
    """A configuration's predicted figures, and the SLO term it misses (None: it meets it)."""

    choice: Choice
    slo_miss: str | None

    def to_dict(self) -> dict[str, Any]:
        """The choice as a plan's JSON holds it, plus `slo_miss`."""
        return {**self.choice.to_dict(), "slo_miss": self.slo_miss}


def predict(config: ServingConfig, request: PlanRequest, *, requests: int = 1000,
            seed: int = 0) -> Predicted:
    """`config` predicted under `request`'s workload, as a plan would have predicted it: its
    Choice (config, prediction, summary, hash) and whether it misses request.slo.

    The analytic screen gives capacity and the first latencies for exactly this layout and
    replica count; the simulator then replaces the latencies the way a plan's confirming
    stage does (same sample for a given seed), so the current and the candidate configuration
    are judged by the same method at the same workload.
    """
    wl = screening.WorkloadMeans.of(request)
    terms = screening.slo_terms(request)
    f = _figures(config, request, wl, terms)
    capacity, cost = f.capacity, f.cost
    pcts = {name: max(float(screening.percentile(metric, q, t, p, wl).ravel()[0])
                      for t, p in f.latencies) for name, metric, q in mixing.PERCENTILES}
    prediction = Prediction(
        ttft_p50_ms=pcts["ttft_p50_ms"], ttft_p90_ms=pcts["ttft_p90_ms"],
        tpot_p50_ms=pcts["tpot_p50_ms"], tpot_p90_ms=pcts["tpot_p90_ms"],
        e2e_p99_ms=pcts["e2e_p99_ms"], capacity_rps=capacity, cost_per_hour=cost,
        cost_per_mtok=cost / max(wl.design_rate * wl.output_tokens * 3600.0, 1e-12) * 1e6,
        quality=f.quality,
        provenance={"latency": "analytic: closed-loop step model (re-predicted)",
                    "capacity": "analytic: largest load meeting the SLO"})
    analytic = Choice(config=config, prediction=prediction)
    settings = space.SearchSettings(simulate_requests=requests)
    confirmed = confirming.confirm(request, [analytic], settings, seed=seed)
    if confirmed.failed:
        failed, why = confirmed.failed[0]
        return Predicted(choice=failed, slo_miss=why)
    choice = confirmed.choices[0]
    miss = None
    if not choice.prediction.simulated and terms:
        # The worst part's worst term (a mixed configuration's types each checked).
        ratio, term = max((float(r.ravel()[0]), int(k.ravel()[0])) for r, k in (
            screening.worst(terms, t, p, wl) for t, p in f.latencies))
        if ratio > 1.0:
            miss = f"{terms[term].name}: predicted {ratio - 1:.0%} over"
    if miss is None and capacity < wl.design_rate:
        miss = (f"capacity {capacity:.3g} req/s within the SLO is below the design rate "
                f"{wl.design_rate:.3g} req/s")
    return Predicted(choice=choice, slo_miss=miss)


@dataclass(frozen=True, kw_only=True)
class _Figures:
    """A configuration's analytic figures; `latencies` holds (mean TTFT, mean TPOT) arrays,
    one pair per GPU type of a mixed configuration (its percentiles are the worst's)."""

    latencies: list[tuple[np.ndarray, np.ndarray]]
    capacity: float
    cost: float
    quality: float | None


def _figures(config: ServingConfig, request: PlanRequest, wl: screening.WorkloadMeans,
             terms: list[screening.Term]) -> _Figures:
    if config.mixed:
        return _mixed_figures(config, request, wl, terms)
    rows = _rows_of(config, request)
    disaggregated = config.mode is Mode.DISAGGREGATED and config.prefill is not None
    rs = screening.screen_rows(rows, request, wl, terms, disaggregated)
    if not disaggregated:
        ttft, tpot = rs.agg.at(np.array([[wl.design_rate / config.replicas]]))
        return _Figures(latencies=[(ttft, tpot)], capacity=float(rs.agg.capacity[0])
                        * config.replicas, cost=config.gpus * rows.group.price_per_gpu_hour,
                        quality=rows.group.quality)
    assert rs.decode is not None and config.prefill is not None
    prefill, decode = config.prefill_replicas, config.replicas
    rp, price_p = rs, rows.group.price_per_gpu_hour
    if config.prefill.gpu != config.worker.gpu:
        # Prefill on its own GPU type (crossing.py): its rows, its price, and the KV over the
        # slower of the two node types' NICs.
        rows_p = _rows_of(dataclasses.replace(config, worker=config.prefill), request)
        rp = screening.screen_rows(rows_p, request, wl, terms, True)
        assert rp.transfer_ms is not None
        lat = screening.KV_TRANSFER_LATENCY_MS
        bw_p, bw_d = rows_p.group.gpu.inter_node_bw, rows.group.gpu.inter_node_bw
        rp = dataclasses.replace(rp, transfer_ms=lat + (rp.transfer_ms - lat) * bw_p / min(
            bw_p, bw_d))
        price_p = rows_p.group.price_per_gpu_hour
    assert rp.prefill_rate is not None
    rho_max = screening.prefill_rho_max(rp, terms, rs.decode.tpot[:, 0])
    _, tpot = rs.decode.at(np.array([[wl.design_rate / decode]]))
    rho = np.array([[wl.design_rate / (prefill * float(rp.prefill_rate[0]))]])
    ttft = screening.prefill_ttft(rp, rho) + tpot
    capacity = min(prefill * float(rho_max[0] * rp.prefill_rate[0]),
                   decode * float(rs.decode.capacity[0]))
    cost = config.gpus * rows.group.price_per_gpu_hour if rp is rs else (
        config.prefill.gpus * prefill * price_p
        + config.worker.gpus * decode * rows.group.price_per_gpu_hour)
    return _Figures(latencies=[(ttft, tpot)], capacity=capacity, cost=cost,
                    quality=rows.group.quality)


def _mixed_figures(config: ServingConfig, request: PlanRequest, wl: screening.WorkloadMeans,
                   terms: list[screening.Term]) -> _Figures:
    """Each GPU type screened on its own; the rate split by their capacities at the SLO
    (mixing.py: what the load-aware router converges to)."""
    screens, qualities = [], []
    for part in config.parts():
        rows = _rows_of(mixing.part_config(config, part), request)
        screens.append((screening.screen_rows(rows, request, wl, terms, False), rows.group))
        qualities.append(rows.group.quality)
    caps = [float(rs.agg.capacity[0]) * p.replicas
            for (rs, _), p in zip(screens, config.parts(), strict=True)]
    total = sum(caps)
    shares = [c / total for c in caps] if total > 0 else list(config.shares())
    latencies = [rs.agg.at(np.array([[wl.design_rate * share / max(p.replicas, 1)]]))
                 for (rs, _), p, share in zip(screens, config.parts(), shares, strict=True)]
    cost = sum(p.worker.gpus * p.replicas * g.price_per_gpu_hour
               for (_, g), p in zip(screens, config.parts(), strict=True))
    quality = None if any(q is None for q in qualities) else min(
        q for q in qualities if q is not None)
    return _Figures(latencies=latencies, capacity=total, cost=cost, quality=quality)


def _rows_of(config: ServingConfig, request: PlanRequest) -> space.Rows:
    """The one search-space row that is `config`'s worker, priced from the request's pool."""
    w = config.worker
    choice = next((c for c in request.candidates if c.id == config.model), None)
    if choice is None:
        raise InputError("model", config.model, "not among the request's candidate models")
    quant = w.quant
    try:
        quality: float | None = choice.quality_at(quant)
    except Exception:  # no published score: quality is unknown, as the search treats it
        quality = None
    gpu = gpus.get_gpu(w.gpu)
    pool = request.hardware.group(gpu.key)
    arch = models.load_model(choice.id)
    group = space.Group(
        choice=choice, arch=arch, gpu=gpu, engine=config.engine, quant=quant,
        kv=w.kv_dtype,
        spec=SpecConfig(method=w.spec_method, k=w.spec_k, draft_model=w.draft_model),
        quality=quality, price_per_gpu_hour=pool.effective_price_per_gpu_hour,
        pool_gpus=pool.count, gpus_per_node=pool.effective_gpus_per_node,
        max_model_len=w.max_model_len)

    def one(value: object, dtype: type) -> np.ndarray:
        return np.array([value], dtype=dtype)

    return space.Rows(group=group, tp=one(w.tp, np.int64), pp=one(w.pp, np.int64),
                      dp=one(w.dp, np.int64), ep=one(w.ep, np.bool_),
                      max_num_seqs=one(w.max_num_seqs, np.int64),
                      max_num_batched_tokens=one(w.max_num_batched_tokens, np.int64),
                      prefix_caching=one(w.prefix_caching, np.bool_),
                      cp=one(w.cp, np.int64))
