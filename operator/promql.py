"""PromQL over vLLM's and SGLang's metrics: the queries behind the observed workload.

Pure string builders; the estimator (estimator.py) runs them through the Prometheus client
(prometheus.py). Each builder takes a `Scope` (one engine's metric names, the label matchers
that pick the endpoint's series, the window) and returns one expression that aggregates every
matching series (all replicas of the endpoint) into a single sample without labels, or into
nothing when no series match. Ratios divide sums of rates, so means are request-weighted across
replicas and quantiles come from the replicas' buckets summed per `le`.

`MetricNames` says where each quantity lives for each engine, so the same builders serve both.
The names match what the engines expose (and what simfleet/vllm_metrics.py simulates).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from trilemma.optimizer.catalog import Engine

_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")


@dataclass(frozen=True, kw_only=True)
class MetricNames:
    """One engine's metric names, as exposed (counters with their `_total`)."""

    engine: Engine
    requests: str  # counter: finished requests
    prompt_sum: str  # counter-like: prompt tokens of finished requests
    prompt_count: str  # counter-like: the requests those prompt tokens belong to
    prompt_histogram: str  # histogram base name of per-request prompt lengths
    output_sum: str
    output_count: str
    output_histogram: str
    prefix_hits: str  # counter: prompt tokens served from the prefix cache
    prefix_queries: str  # counter: prompt tokens looked up in it
    ttft: str  # histogram, seconds
    itl: tuple[str, ...]  # histograms, seconds, newest name first
    queue_time: str  # histogram, seconds
    running: str  # gauge
    waiting: str  # gauge
    kv_usage: str  # gauge, 0-1
    spec_accepted: str | None = None  # counter: draft tokens accepted
    spec_drafted: str | None = None  # counter: draft tokens proposed
    spec_accept_rate: str | None = None  # gauge, for an engine without the two counters
    # counter: the API server's answers by handler and status class ("4xx"); None for an
    # engine whose server does not count them (its refusals stay unseen)
    http_requests: str | None = None


VLLM_NAMES = MetricNames(
    engine=Engine.VLLM,
    requests="vllm:request_success_total",
    # The per-request histograms, not vllm:prompt_tokens_total, which also counts prompt
    # tokens recomputed after a preemption.
    prompt_sum="vllm:request_prompt_tokens_sum",
    prompt_count="vllm:request_prompt_tokens_count",
    prompt_histogram="vllm:request_prompt_tokens",
    output_sum="vllm:request_generation_tokens_sum",
    output_count="vllm:request_generation_tokens_count",
    output_histogram="vllm:request_generation_tokens",
    prefix_hits="vllm:prefix_cache_hits_total",
    prefix_queries="vllm:prefix_cache_queries_total",
    ttft="vllm:time_to_first_token_seconds",
    # Renamed in vLLM 0.11; before it, time_per_output_token already meant the same gaps.
    itl=("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"),
    queue_time="vllm:request_queue_time_seconds",
    running="vllm:num_requests_running",
    waiting="vllm:num_requests_waiting",
    kv_usage="vllm:kv_cache_usage_perc",
    spec_accepted="vllm:spec_decode_num_accepted_tokens_total",
    spec_drafted="vllm:spec_decode_num_draft_tokens_total",
    # prometheus-fastapi-instrumentator on vLLM's OpenAI server (vLLM PR #15894, 0.8.3 on).
    http_requests="http_requests_total",
)

SGLANG_NAMES = MetricNames(
    engine=Engine.SGLANG,
    requests="sglang:num_requests_total",
    prompt_sum="sglang:prompt_tokens_total",
    prompt_count="sglang:num_requests_total",
    # Only with --collect-tokens-histogram; without it the length quantiles are absent.
    prompt_histogram="sglang:prompt_tokens_histogram",
    output_sum="sglang:generation_tokens_total",
    output_count="sglang:num_requests_total",
    output_histogram="sglang:generation_tokens_histogram",
    prefix_hits="sglang:cached_tokens_total",
    prefix_queries="sglang:prompt_tokens_total",
    ttft="sglang:time_to_first_token_seconds",
    itl=("sglang:inter_token_latency_seconds", "sglang:time_per_output_token_seconds"),
    queue_time="sglang:queue_time_seconds",
    running="sglang:num_running_reqs",
    waiting="sglang:num_queue_reqs",
    kv_usage="sglang:token_usage",
    spec_accept_rate="sglang:spec_accept_rate",
)

METRIC_NAMES: Mapping[Engine, MetricNames] = {Engine.VLLM: VLLM_NAMES,
                                              Engine.SGLANG: SGLANG_NAMES}


def escape_label_value(value: str) -> str:
    """`value` as the inside of a PromQL double-quoted string (backslash, quote, newline)."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def label_matchers(selector: Mapping[str, str]) -> str:
    """`{a="x",b="y"}` (sorted, so the same selector gives the same text), or "" if empty."""
    for name in selector:
        if not _LABEL_NAME.match(name):
            raise ValueError(f"not a Prometheus label name: {name!r}")
    if not selector:
        return ""
    inner = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in sorted(selector.items()))
    return "{" + inner + "}"


def endpoint_selector(namespace: str, name: str,
                      label_selector: Mapping[str, str]) -> dict[str, str]:
    """An endpoint's engine series: the PodMonitor copies the pods' endpoint label onto them
    (podTargetLabels), and Prometheus adds the namespace. The spec's matchers narrow them
    (ANDed), never replace them: the operator's own keys are written last, and the spec's
    schema refuses those keys anyway."""
    return {**label_selector, "namespace": namespace, "trilemma_dev_endpoint": name}


def duration(seconds: float) -> str:
    """A PromQL duration in whole seconds: 900 -> "900s"."""
    whole = round(seconds)
    if whole < 1 or abs(whole - seconds) > 1e-9:
        raise ValueError(f"durations are whole seconds >= 1, got {seconds!r}")
    return f"{whole}s"


@dataclass(frozen=True, kw_only=True)
class Scope:
    """Which series (engine names + label matchers) over which window (seconds)."""

    names: MetricNames
    selector: Mapping[str, str] = field(default_factory=dict)
    window_s: int

    def __post_init__(self) -> None:
        duration(self.window_s)
        label_matchers(self.selector)
        object.__setattr__(self, "selector", dict(self.selector))

    @property
    def window(self) -> str:
        return duration(self.window_s)

    def series(self, metric: str) -> str:
        return metric + label_matchers(self.selector)

    def over_window(self, metric: str) -> str:
        return f"{self.series(metric)}[{self.window}]"


def scope(engine: Engine | str, selector: Mapping[str, str], window_s: int) -> Scope:
    return Scope(names=METRIC_NAMES[Engine(engine)], selector=selector, window_s=window_s)


def _sum_rate(s: Scope, metric: str) -> str:
    return f"sum(rate({s.over_window(metric)}))"


def _ratio(s: Scope, numerator: str, denominator: str) -> str:
    return f"{_sum_rate(s, numerator)} / {_sum_rate(s, denominator)}"


def _histogram_quantile(s: Scope, q: float, histogram: str) -> str:
    if not 0 < q < 1:
        raise ValueError(f"a quantile is between 0 and 1, got {q}")
    buckets = s.over_window(f"{histogram}_bucket")
    return f"histogram_quantile({q:g}, sum by (le) (rate({buckets})))"


def request_rate(s: Scope) -> str:
    """Finished requests per second over the window, all replicas (vLLM: every finish reason).

    Completions, not arrivals: equal over a window much longer than a request's latency.
    """
    return _sum_rate(s, s.names.requests)


GENERATION_HANDLERS = "/v1/completions|/v1/chat/completions"


def refused_rate(s: Scope) -> str | None:
    """Generation requests/s the API server answered with a 4xx: a prompt past the deployed
    context limit is one (so are malformed requests: the status class cannot tell them
    apart). 0 when none were refused; None for an engine that does not count them."""
    if s.names.http_requests is None:
        return None
    matchers = [label_matchers(s.selector)[1:-1], f'handler=~"{GENERATION_HANDLERS}"',
                'status="4xx"']
    series = s.names.http_requests + "{" + ",".join(m for m in matchers if m) + "}"
    return f"sum(rate({series}[{s.window}])) or vector(0)"


def finished_requests(s: Scope) -> str:
    """Requests finished in the window: the sample size behind every other estimate.

    increase() extrapolates to the window's edges, so it is fractional and can be off by
    about one scrape interval's worth of requests.
    """
    return f"sum(increase({s.over_window(s.names.requests)}))"


def mean_prompt_tokens(s: Scope) -> str:
    """Mean prompt length of the requests finished in the window (exact: sum / count)."""
    return _ratio(s, s.names.prompt_sum, s.names.prompt_count)


def mean_output_tokens(s: Scope) -> str:
    """Mean output length of the requests finished in the window (exact: sum / count)."""
    return _ratio(s, s.names.output_sum, s.names.output_count)


def prompt_tokens_quantile(s: Scope, q: float) -> str:
    """A prompt-length quantile, interpolated linearly inside a histogram bucket.

    vLLM's 1-2-5 buckets make it good to a factor of about 2.5 (a value in (1000, 2000] can
    read anywhere in between); use the mean, which is exact, where that matters.
    """
    return _histogram_quantile(s, q, s.names.prompt_histogram)


def output_tokens_quantile(s: Scope, q: float) -> str:
    """An output-length quantile; same bucket resolution as prompt_tokens_quantile."""
    return _histogram_quantile(s, q, s.names.output_histogram)


def prefix_hit_share(s: Scope) -> str:
    """Share of prompt tokens served from the prefix cache, 0-1 (token-weighted).

    `or 0 * ...` makes it 0, not absent, when the endpoint has prompts but its hit counter
    has no series yet (SGLang creates it at the first hit).
    """
    names = s.names
    return (f"({_ratio(s, names.prefix_hits, names.prefix_queries)}) "
            f"or (0 * {_sum_rate(s, names.prefix_queries)})")


def ttft_quantile(s: Scope, q: float) -> str:
    """A time-to-first-token quantile in seconds (per request)."""
    return _histogram_quantile(s, q, s.names.ttft)


def itl_quantile(s: Scope, q: float) -> str:
    """An inter-token-latency quantile in seconds, per token (long outputs weigh more).

    Falls back to the older metric name with `or` where the newer has no series. Both
    engines observe each gap, so a step that emits several tokens (speculative decoding)
    spreads its time over them.
    """
    return " or ".join(_histogram_quantile(s, q, name) for name in s.names.itl)


def spec_acceptance(s: Scope) -> str:
    """Speculative-decoding acceptance, 0-1; absent where speculation is off.

    vLLM: accepted / proposed draft tokens. SGLang exposes only a gauge, set per logging
    interval as (accepted + bonus) / (drafted + bonus) tokens, averaged here over time; the
    bonus token makes it read higher than vLLM's ratio, and 0 (speculation off) is dropped.
    """
    names = s.names
    if names.spec_accepted is not None and names.spec_drafted is not None:
        return _ratio(s, names.spec_accepted, names.spec_drafted)
    if names.spec_accept_rate is not None:
        return f"avg(avg_over_time({s.over_window(names.spec_accept_rate)}) > 0)"
    raise ValueError(f"{names.engine.value} exposes no speculative-decoding metric")


def mean_queue_wait_seconds(s: Scope) -> str:
    """Mean time a finished request spent waiting to be scheduled, seconds."""
    h = s.names.queue_time
    return _ratio(s, f"{h}_sum", f"{h}_count")


def mean_kv_cache_usage(s: Scope) -> str:
    """KV-cache usage 0-1, averaged over the window and over replicas.

    A gauge sampled at scrapes: spikes between scrapes go unseen.
    """
    return f"avg(avg_over_time({s.over_window(s.names.kv_usage)}))"


def mean_running(s: Scope) -> str:
    """Requests in the running batch, time-averaged, summed over replicas (a gauge)."""
    return f"sum(avg_over_time({s.over_window(s.names.running)}))"


def mean_waiting(s: Scope) -> str:
    """Requests waiting in the queue, time-averaged, summed over replicas (a gauge)."""
    return f"sum(avg_over_time({s.over_window(s.names.waiting)}))"


def burstiness_cv(s: Scope, step_s: int) -> str:
    """Burstiness: the inter-arrival CV that the per-step request counts imply.

    Counts N of finished requests per `step_s` interval give sqrt(Var N / E N), the square
    root of the index of dispersion. For a renewal process with gap CV c that ratio tends to c
    as the step grows, and it is exactly 1 for Poisson at any step, so the figure reads like
    GammaArrivals.cv: 1 Poisson, > 1 bursty, < 1 smooth.

    Each count is the counter's difference between consecutive subquery steps (the last
    sample at or before each), so the counts partition the window exactly; increase() would
    extrapolate each step from the samples inside it and add noise that reads as burstiness
    when a step spans few scrapes. A counter reset (an engine restart) zeroes one interval.

    Limits: it sees completions, which batching and queueing reshape; a rate that trends
    within the window (a daily ramp) counts as burstiness, which is what sizing for peaks
    wants; with n = window / step intervals its relative standard error is about
    1 / sqrt(2 (n - 1)), so keep n >= 10; and the step must span at least one scrape.
    """
    step = duration(step_s)
    if step_s >= s.window_s:
        raise ValueError(f"step {step_s}s must be shorter than the window {s.window_s}s")
    counter = s.series(s.names.requests)
    counts = f"sum(clamp_min({counter} - {counter} offset {step}, 0))"
    over = f"[{s.window}:{step}]"
    return f"stddev_over_time(({counts}){over}) / sqrt(avg_over_time(({counts}){over}))"


def staleness_seconds(s: Scope, resolution_s: int) -> str:
    """Seconds since the newest sample of the endpoint's request counter, to `resolution_s`.

    Not `time() - timestamp(x)`: once a scrape fails Prometheus writes stale markers and the
    instant selector returns nothing, so a dead exporter would look like missing metrics.
    Taking timestamp() at every subquery step and the max over the window finds the last
    sample that was still fresh; absent when there was none in the window.
    """
    res = duration(resolution_s)
    seen = f"timestamp({s.series(s.names.requests)})"
    return f"time() - max(max_over_time({seen}[{s.window}:{res}]))"
