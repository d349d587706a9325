"""The workload an endpoint actually serves, estimated from its engine's Prometheus metrics.

The closed loop's eyes: `estimate_workload` runs the PromQL of promql.py concurrently through
the client of prometheus.py and assembles an `ObservedWorkload` (rates, lengths, prefix reuse,
burstiness, latencies, how many requests and how fresh). The reconciler writes `to_status()` to
the custom resource's `status.observedWorkload`, sets its MetricsAvailable condition from
`availability`, compares the observation with the planned workload, and on drift re-plans with
`to_workload_spec(...)`, the optimizer's own Workload model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import enum
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from trilemma.operator import promql
from trilemma.operator.prometheus import PrometheusError, QueryResult
from trilemma.operator.status_models import LatencyFigures, LengthFigures, ObservedWorkloadStatus
from trilemma.optimizer.catalog import Engine
from trilemma.optimizer.spec import (
    MAX_P90_OVER_MEAN,
    FixedLengths,
    GammaArrivals,
    LengthDistribution,
    LognormalLengths,
    PoissonArrivals,
    PrefixReuse,
    Workload,
)

QUANTILES = (0.5, 0.9, 0.99)
# Burstiness within this distance of 1 is read as Poisson: with ~15 intervals per window the
# estimate's own standard error is about 0.2.
POISSON_BAND = 0.2
# Below this share of prompt tokens from the cache, prefix reuse is left out of the spec.
MIN_PREFIX_SHARE = 0.01


class Querier(Protocol):
    """What the estimator needs of a Prometheus client (PrometheusClient is one)."""

    async def query(self, promql: str, *, at: float | None = None) -> QueryResult: ...


class MetricsReason(enum.Enum):
    """The MetricsAvailable condition's reason: exactly these four."""

    AVAILABLE = "Available"
    MISSING = "MetricsMissing"
    STALE = "MetricsStale"
    PROMETHEUS_ERROR = "PrometheusError"


@dataclass(frozen=True, kw_only=True)
class Availability:
    reason: MetricsReason
    message: str

    @property
    def ok(self) -> bool:
        return self.reason is MetricsReason.AVAILABLE


@dataclass(frozen=True, kw_only=True)
class LengthStats:
    """Tokens per request: the mean is exact, quantiles are read from histogram buckets."""

    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None


@dataclass(frozen=True, kw_only=True)
class LatencyStats:
    """Milliseconds, read from histogram buckets."""

    p50: float | None = None
    p90: float | None = None
    p99: float | None = None


@dataclass(frozen=True, kw_only=True)
class ObservedWorkload:
    """What the endpoint served over `window_s` seconds up to `observed_at`; None = unknown."""

    engine: Engine
    window_s: int
    observed_at: float  # unix seconds, the queries' evaluation time
    availability: Availability
    rate_rps: float | None = None
    prompt_tokens: LengthStats = field(default_factory=LengthStats)
    output_tokens: LengthStats = field(default_factory=LengthStats)
    prefix_hit_share: float | None = None  # prompt tokens served from the prefix cache, 0-1
    burstiness_cv: float | None = None  # implied inter-arrival CV; 1 = Poisson
    spec_acceptance: float | None = None  # speculative decoding; None when off
    ttft_ms: LatencyStats = field(default_factory=LatencyStats)
    itl_ms: LatencyStats = field(default_factory=LatencyStats)
    queue_wait_ms: float | None = None  # mean
    kv_cache_usage: float | None = None  # mean, 0-1
    samples: float = 0.0  # requests finished in the window (extrapolated, so fractional)
    staleness_s: float | None = None  # age of the newest sample
    refused_rps: float | None = None  # generation requests answered 4xx; None: not counted

    @property
    def refused_share(self) -> float | None:
        """Refused requests over all generation requests answered (served or refused)."""
        if self.refused_rps is None or self.rate_rps is None:
            return None
        total = self.refused_rps + self.rate_rps
        return self.refused_rps / total if total > 0 else 0.0

    def to_status(self) -> ObservedWorkloadStatus:
        """`status.observedWorkload`: 4 significant digits, unknowns left out."""
        return ObservedWorkloadStatus(
            window_seconds=self.window_s, observed_at=_rfc3339(self.observed_at),
            samples=round(self.samples), rate_rps=_sig_or_none(self.rate_rps),
            prefix_hit_share=_sig_or_none(self.prefix_hit_share),
            burstiness_cv=_sig_or_none(self.burstiness_cv),
            spec_acceptance=_sig_or_none(self.spec_acceptance),
            queue_wait_ms=_sig_or_none(self.queue_wait_ms),
            kv_cache_usage=_sig_or_none(self.kv_cache_usage),
            staleness_seconds=_sig_or_none(self.staleness_s),
            prompt_tokens=_figures(LengthFigures, self.prompt_tokens),
            output_tokens=_figures(LengthFigures, self.output_tokens),
            ttft_ms=_figures(LatencyFigures, self.ttft_ms),
            itl_ms=_figures(LatencyFigures, self.itl_ms),
            refused_rps=_sig_or_none(self.refused_rps))


_Figures = TypeVar("_Figures", LengthFigures, LatencyFigures)


def _figures(model: type[_Figures], stats: LengthStats | LatencyStats) -> _Figures | None:
    """The stats as their status model, to 4 significant digits; None when all are unknown."""
    known = {k: _sig(v) for k, v in vars(stats).items() if v is not None}
    return model.model_validate(known) if known else None


def _sig_or_none(value: float | None) -> float | None:
    return None if value is None else _sig(value)


def workload_queries(engine: Engine | str, selector: Mapping[str, str], window_s: int, *,
                     burst_step_s: int | None = None,
                     resolution_s: int | None = None) -> dict[str, str]:
    """The PromQL the estimator runs, by the name of the figure each one gives.

    Defaults: burstiness counts per window/15 seconds (15 intervals: standard error ~0.2),
    staleness to window/60 seconds (15 s for the default 15-minute window).
    """
    s = promql.scope(engine, selector, window_s)
    step = burst_step_s if burst_step_s is not None else max(1, window_s // 15)
    resolution = resolution_s if resolution_s is not None else max(1, window_s // 60)
    queries = {
        "rate": promql.request_rate(s),
        "samples": promql.finished_requests(s),
        "staleness": promql.staleness_seconds(s, resolution),
        "prompt_mean": promql.mean_prompt_tokens(s),
        "output_mean": promql.mean_output_tokens(s),
        "prefix": promql.prefix_hit_share(s),
        "burstiness": promql.burstiness_cv(s, step),
        "spec": promql.spec_acceptance(s),
        "queue": promql.mean_queue_wait_seconds(s),
        "kv": promql.mean_kv_cache_usage(s),
    }
    refused = promql.refused_rate(s)
    if refused is not None:
        queries["refused"] = refused
    for q in QUANTILES:
        tag = _tag(q)
        queries[f"prompt_{tag}"] = promql.prompt_tokens_quantile(s, q)
        queries[f"output_{tag}"] = promql.output_tokens_quantile(s, q)
        queries[f"ttft_{tag}"] = promql.ttft_quantile(s, q)
        queries[f"itl_{tag}"] = promql.itl_quantile(s, q)
    return queries


async def estimate_workload(client: Querier, *, engine: Engine | str,
                            selector: Mapping[str, str], window_s: int,
                            now: float | None = None, stale_after_s: float = 120.0,
                            min_samples: int = 1, burst_step_s: int | None = None,
                            resolution_s: int | None = None) -> ObservedWorkload:
    """Query Prometheus for the endpoint's traffic over the last `window_s` seconds.

    Every query is evaluated at the same instant (`now`, default the local clock) so the
    figures describe one window. Never raises for an outage: a PrometheusError becomes the
    PrometheusError availability (the reconciler retries later); `stale_after_s` (default 4+
    missed scrapes at the usual 15-30 s interval) and `min_samples` decide the other reasons.
    """
    engine = Engine(engine)
    at = time.time() if now is None else now
    queries = workload_queries(engine, selector, window_s, burst_step_s=burst_step_s,
                               resolution_s=resolution_s)
    try:
        values = await _run_all(client, queries, at)
    except PrometheusError as err:
        return ObservedWorkload(engine=engine, window_s=window_s, observed_at=at,
                                availability=Availability(reason=MetricsReason.PROMETHEUS_ERROR,
                                                          message=str(err)))
    observed = _assemble(engine, window_s, at, values)
    availability = _availability(observed, values, selector, stale_after_s, min_samples)
    return dataclasses.replace(observed, availability=availability)


async def _run_all(client: Querier, queries: Mapping[str, str],
                   at: float) -> dict[str, float | None]:
    try:
        async with asyncio.TaskGroup() as group:
            tasks = {name: group.create_task(client.query(q, at=at))
                     for name, q in queries.items()}
    except* PrometheusError as errors:
        # The first failure speaks for all: the others are the same outage.
        raise errors.exceptions[0] from None
    return {name: task.result().value() for name, task in tasks.items()}


def _assemble(engine: Engine, window_s: int, at: float,
              v: Mapping[str, float | None]) -> ObservedWorkload:
    def lengths(prefix: str) -> LengthStats:
        return LengthStats(mean=v[f"{prefix}_mean"],
                           **{_tag(q): v[f"{prefix}_{_tag(q)}"] for q in QUANTILES})

    def millis(prefix: str) -> LatencyStats:
        return LatencyStats(**{_tag(q): _scaled(v[f"{prefix}_{_tag(q)}"], 1000.0)
                               for q in QUANTILES})

    staleness = v["staleness"]
    return ObservedWorkload(
        engine=engine, window_s=window_s, observed_at=at,
        availability=Availability(reason=MetricsReason.AVAILABLE, message=""),
        rate_rps=v["rate"], prompt_tokens=lengths("prompt"), output_tokens=lengths("output"),
        prefix_hit_share=v["prefix"], burstiness_cv=v["burstiness"], spec_acceptance=v["spec"],
        ttft_ms=millis("ttft"), itl_ms=millis("itl"), queue_wait_ms=_scaled(v["queue"], 1000.0),
        kv_cache_usage=v["kv"], samples=max(v["samples"] or 0.0, 0.0),
        refused_rps=v.get("refused"),
        # The subquery's resolution can put the newest sample a little after `at`.
        staleness_s=None if staleness is None else max(staleness, 0.0))


def _availability(o: ObservedWorkload, v: Mapping[str, float | None],
                  selector: Mapping[str, str], stale_after_s: float,
                  min_samples: int) -> Availability:
    names = promql.METRIC_NAMES[o.engine]
    where = promql.label_matchers(selector) or "(no selector)"
    window = promql.duration(o.window_s)

    def reason(kind: MetricsReason, message: str) -> Availability:
        return Availability(reason=kind, message=message)

    if o.staleness_s is None and v["samples"] is None:
        return reason(MetricsReason.MISSING,
                      f"no {names.requests} series match {where} in the last {window}")
    if o.staleness_s is not None and o.staleness_s > stale_after_s:
        return reason(MetricsReason.STALE,
                      f"the newest {names.requests} sample for {where} is "
                      f"{o.staleness_s:.0f}s old (limit {stale_after_s:g}s): is it scraped?")
    if o.samples < min_samples:
        return reason(MetricsReason.MISSING,
                      f"{o.samples:.0f} requests finished in the last {window} for {where}; "
                      f"need at least {min_samples}")
    for what, value, metric in (("request rate", o.rate_rps, names.requests),
                                ("prompt length", o.prompt_tokens.mean, names.prompt_sum),
                                ("output length", o.output_tokens.mean, names.output_sum)):
        if value is None:
            return reason(MetricsReason.MISSING, f"no {what} for {where}: {metric} has no "
                                                 f"usable samples in the last {window}")
    return reason(MetricsReason.AVAILABLE,
                  f"{o.samples:.0f} requests in the last {window} at {o.rate_rps:.3g}/s")


# --- into the optimizer's workload model -------------------------------------------------------


def to_workload_spec(observed: ObservedWorkload, *, base: Workload) -> Workload:
    """The observation as the optimizer's Workload; `base` keeps what metrics cannot show.

    - lengths: lognormal from the mean and p90 when the buckets show a right-skewed spread
      (p50 < mean < p90, as every lognormal has); otherwise fixed at the mean, since a p90
      interpolated inside the mean's own bucket says nothing about the spread.
    - arrivals: Poisson when burstiness is within POISSON_BAND of 1 or unknown, else gamma with
      that CV (clamped to the spec's 0.05-10).
    - prefix: hitRate 1 and the sharedTokens whose expected cover E[min(prompt, shared)]
      equals the observed share x mean prompt, so the perf model prices the same cached tokens
      per request (the share the cache actually achieved, not an upper bound).
    - rate: served plus refused requests (a prompt past the context limit was demand too).
    - peakFactor and outputPredictability come from `base`: no metric shows peaks to plan for
      or how predictable outputs are.
    """
    if not observed.rate_rps or observed.rate_rps <= 0:
        raise ValueError(f"no request rate observed ({observed.availability.message})")
    prompt = _length_distribution(observed.prompt_tokens, "prompt")
    return Workload(
        prompt_tokens=prompt,
        output_tokens=_length_distribution(observed.output_tokens, "output"),
        prefix=_prefix(observed.prefix_hit_share, prompt),
        # Refused requests were demand too: the re-plan serves them.
        arrivals=_arrivals(observed.rate_rps + (observed.refused_rps or 0.0),
                           observed.burstiness_cv),
        peak_factor=base.peak_factor,
        output_predictability=base.output_predictability)


def _length_distribution(stats: LengthStats, what: str) -> LengthDistribution:
    if stats.mean is None:
        raise ValueError(f"no mean {what} length observed")
    mean = max(round(stats.mean, 1), 1.0)
    p50, p90 = stats.p50, stats.p90
    if p90 is not None and p90 > mean and (p50 is None or p50 < mean):
        # Below the largest p90/mean a lognormal can have, rounded down so it stays below.
        p90 = min(round(p90, 1), math.floor(mean * MAX_P90_OVER_MEAN * 10) / 10)
        if p90 > mean:
            return LognormalLengths(kind="lognormal", mean=mean, p90=p90)
    return FixedLengths(kind="fixed", value=max(round(mean), 1))


def _arrivals(rate: float, cv: float | None) -> PoissonArrivals | GammaArrivals:
    rps = _sig(rate)
    if cv is None or abs(cv - 1.0) <= POISSON_BAND:
        return PoissonArrivals(kind="poisson", requests_per_second=rps)
    return GammaArrivals(kind="gamma", requests_per_second=rps,
                         cv=round(min(max(cv, 0.05), 10.0), 2))


def _prefix(share: float | None, prompt: LengthDistribution) -> PrefixReuse | None:
    if share is None or share < MIN_PREFIX_SHARE:
        return None
    mean = prompt.mean_tokens()
    target = min(share, 1.0) * mean
    # E[min(prompt, s)] grows with s: the least whole s reaching the target, at most the mean
    # (the spec's own bound for a prefix most requests share).
    low, high = 0, math.floor(mean)
    while low < high:
        mid = (low + high) // 2
        if prompt.expected_min(mid) >= target:
            high = mid
        else:
            low = mid + 1
    return PrefixReuse(shared_tokens=low, hit_rate=1.0) if low > 0 else None


# --- small helpers ---------------------------------------------------------------------------


def _tag(q: float) -> str:
    return f"p{round(q * 100)}"


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def _sig(value: float) -> float:
    """Four significant digits, so that status patches do not churn on noise."""
    return float(f"{value:.4g}")


def _rfc3339(unix_s: float) -> str:
    stamp = datetime.datetime.fromtimestamp(round(unix_s), datetime.UTC)
    return stamp.isoformat().replace("+00:00", "Z")
