"""One given configuration, predicted the way the search predicts its candidates.

For a configuration chosen elsewhere (the one an operator is running, a user's baseline):
the analytic screen gives its capacity and first latencies for exactly its layout and replica
count, and the simulator then replaces the latencies as the search's confirming stage does
(the same sample for a given seed), so it and a fresh plan's choices are judged by the same
method at the same workload. One predictor: this reuses the search's own stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from trilemma.optimizer.catalog import gpus, models
from trilemma.optimizer.catalog.speculation import SpecConfig
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.search import confirming, screening, space
from trilemma.optimizer.search.configs import Choice, Mode, Prediction, ServingConfig
from trilemma.optimizer.search.screening import SloMetric
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
    rows = _rows_of(config, request)
    disaggregated = config.mode is Mode.DISAGGREGATED and config.prefill is not None
    rs = screening.screen_rows(rows, request, wl, terms, disaggregated)
    if disaggregated:
        assert rs.decode is not None and rs.prefill_rate is not None
        prefill, decode = config.prefill_replicas, config.replicas
        rho_max = screening.prefill_rho_max(rs, terms, rs.decode.tpot[:, 0])
        _, tpot = rs.decode.at(np.array([[wl.design_rate / decode]]))
        rho = np.array([[wl.design_rate / (prefill * float(rs.prefill_rate[0]))]])
        ttft = screening.prefill_ttft(rs, rho) + tpot
        capacity = min(prefill * float(rho_max[0] * rs.prefill_rate[0]),
                       decode * float(rs.decode.capacity[0]))
    else:
        ttft, tpot = rs.agg.at(np.array([[wl.design_rate / config.replicas]]))
        capacity = float(rs.agg.capacity[0]) * config.replicas

    def pct(metric: SloMetric, q: str) -> float:
        return float(screening.percentile(metric, q, ttft, tpot, wl).ravel()[0])

    cost = config.gpus * rows.group.price_per_gpu_hour
    prediction = Prediction(
        ttft_p50_ms=pct(SloMetric.TTFT, "p50"), ttft_p90_ms=pct(SloMetric.TTFT, "p90"),
        tpot_p50_ms=pct(SloMetric.TPOT, "p50"), tpot_p90_ms=pct(SloMetric.TPOT, "p90"),
        e2e_p99_ms=pct(SloMetric.E2E, "p99"), capacity_rps=capacity, cost_per_hour=cost,
        cost_per_mtok=cost / max(wl.design_rate * wl.output_tokens * 3600.0, 1e-12) * 1e6,
        quality=rows.group.quality,
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
    if not choice.prediction.simulated:
        ratio, term = screening.worst(terms, ttft, tpot, wl)
        if terms and float(ratio.ravel()[0]) > 1.0:
            t = terms[int(term.ravel()[0])]
            miss = f"{t.name}: predicted {float(ratio.ravel()[0]) - 1:.0%} over"
    if miss is None and capacity < wl.design_rate:
        miss = (f"capacity {capacity:.3g} req/s within the SLO is below the design rate "
                f"{wl.design_rate:.3g} req/s")
    return Predicted(choice=choice, slo_miss=miss)


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
