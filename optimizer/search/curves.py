"""Rate-vs-latency curves of whole deployments: what `trilemma optimize --plot` draws.

A closed-loop sweep over concurrency traces each replica's (request rate, TTFT, TPOT) curve;
replicas multiply the rate. Percentiles come from the screen's mean-to-percentile factors, so
the curves and the search rank configurations the same way.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trilemma.optimizer.catalog.speculation import SpecMethod, parse_spec
from trilemma.optimizer.perf import estimate, latency
from trilemma.optimizer.search import screening
from trilemma.optimizer.search.configs import ServingConfig
from trilemma.optimizer.search.screening import SloMetric
from trilemma.optimizer.spec.plan_request import PlanRequest

_CONCURRENCY = np.unique(np.round(np.geomspace(1, 1024, 24)))


@dataclass(frozen=True, kw_only=True)
class LatencyCurve:
    """Points of one deployment, ascending in rate (requests/s over all replicas)."""

    rates_rps: np.ndarray
    ttft_p90_ms: np.ndarray
    tpot_p90_ms: np.ndarray


def latency_curve(request: PlanRequest, config: ServingConfig) -> LatencyCurve:
    """Predicted p90 TTFT and TPOT against request rate for an aggregated deployment.

    Disaggregated deployments are drawn through their decode pool (TTFT then excludes the
    prefill pool's queueing): a simplification the plot's legend does not hide.
    """
    w = config.worker
    spec_text = ("none" if w.spec_method is SpecMethod.NONE
                 else f"{w.spec_method.value}:{w.spec_k}")
    if w.spec_method is SpecMethod.DRAFT and w.draft_model:
        spec_text = f"draft:{w.draft_model}:{w.spec_k}"
    cfg = estimate.resolve(model=config.model, gpu=w.gpu, tp=w.tp, pp=w.pp, dp=w.dp, ep=w.ep,
                           quant=w.quant, kv_dtype=w.kv_dtype, spec=spec_text,
                           engine=config.engine, max_num_batched_tokens=w.max_num_batched_tokens,
                           max_num_seqs=w.max_num_seqs)
    wl = screening.WorkloadMeans.of(request)
    cached = min(wl.cached_tokens, wl.prompt_tokens - 1.0) if w.prefix_caching else 0.0
    r = latency.closed_loop(estimate.step_model(cfg), tp=w.tp, pp=w.pp, dp=w.dp, ep=w.ep,
                            concurrency=_CONCURRENCY, prompt_tokens=wl.prompt_tokens,
                            output_tokens=wl.output_tokens, cached_tokens=cached,
                            max_batched_tokens=w.max_num_batched_tokens,
                            max_num_seqs=w.max_num_seqs, spec=parse_spec(spec_text),
                            output_predictability=wl.output_predictability,
                            draft=estimate.draft_step_model(cfg), first_wave_weight=0.0,
                            cp=w.cp)
    ttft = screening.percentile(SloMetric.TTFT, "p90", r.ttft_ms, r.tpot_ms, wl)
    tpot = screening.percentile(SloMetric.TPOT, "p90", r.ttft_ms, r.tpot_ms, wl)
    rates = r.requests_per_s * config.replicas
    # Past saturation more clients add latency but no rate: keep the rising branch.
    keep = np.concatenate(([True], np.diff(rates) > 1e-9 * rates[1:]))
    return LatencyCurve(rates_rps=rates[keep], ttft_p90_ms=ttft[keep], tpot_p90_ms=tpot[keep])


def capacity_at_slo(curve: LatencyCurve, *, ttft_p90_ms: float | None,
                    tpot_p90_ms: float | None) -> float:
    """The highest rate on the curve whose p90 latencies stay within the targets (0 if none)."""
    ok = np.ones(curve.rates_rps.shape, dtype=bool)
    if ttft_p90_ms is not None:
        ok &= curve.ttft_p90_ms <= ttft_p90_ms
    if tpot_p90_ms is not None:
        ok &= curve.tpot_p90_ms <= tpot_p90_ms
    if not ok.any():
        return 0.0
    # Latency rises with rate on the kept branch: the last passing point bounds capacity.
    return float(curve.rates_rps[np.flatnonzero(ok)[-1]])
