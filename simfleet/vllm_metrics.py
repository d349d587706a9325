"""Prometheus metric families with vLLM's (or SGLang's) exact names, labels and buckets.

The simulated server (server.py) records every finished request here and serves
`exposition()` on GET /metrics, so Prometheus, the operator's PromQL (operator/promql.py) and
any Grafana dashboard written for the real engines read the simulated fleet unchanged.

Transcribed from the engines' sources:

- vLLM V1: vllm/v1/metrics/loggers.py (`PrometheusStatLogger`, the 0.11/0.12 line that added
  `vllm:inter_token_latency_seconds` and deprecated `vllm:time_per_output_token_seconds`),
  vllm/v1/spec_decode/metrics.py (`SpecDecodingProm`) and `FINISH_REASON_STRINGS` in
  vllm/v1/engine/__init__.py, github.com/vllm-project/vllm.
- SGLang: python/sglang/srt/metrics/collector.py at 00ae9c15 (`TokenizerMetricsCollector`,
  `SchedulerMetricsCollector`) and python/sglang/srt/managers/scheduler_metrics_mixin.py at
  01bb3c80 (scheduler labels, how cache_hit_rate and spec_accept_* are computed),
  github.com/sgl-project/sglang.

Where the engines differ from each other the simulation follows each one, for example vLLM
counts prefix-cache hits in tokens on two counters while SGLang exposes cached and prompt token
counters; SGLang's token-length histograms exist only under --collect-tokens-histogram, which
the simulation assumes is on. Like vLLM, each metric is created for its label values up front
(counters read 0 before the first request); like SGLang, its series appear on first use.

Call the recording methods from one thread (the server's event loop): prometheus_client's
values are thread-safe but the SGLang per-interval ratios kept here are not.
"""

from __future__ import annotations

from collections.abc import Sequence

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from trilemma.optimizer.catalog.engines import Engine

# vllm/v1/engine/__init__.py: every reason gets its own request_success series at start-up.
VLLM_FINISH_REASONS = ("stop", "length", "abort", "error", "repetition")

VLLM_TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
# Shared by inter_token_latency_seconds and the deprecated time_per_output_token_seconds.
VLLM_ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0)
# e2e_request_latency_seconds and request_queue_time_seconds.
VLLM_REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0)

SGLANG_TTFT_BUCKETS = (
    0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400)
SGLANG_ITL_BUCKETS = (
    0.002, 0.004, 0.006, 0.008, 0.010, 0.015, 0.020, 0.025, 0.030, 0.035, 0.040, 0.060,
    0.080, 0.100, 0.200, 0.400, 0.600, 0.800, 1.000, 2.000, 4.000, 6.000, 8.000)
SGLANG_E2E_BUCKETS = (
    0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400, 600, 1200,
    1800, 2400)
SGLANG_QUEUE_BUCKETS = (
    0.0, 0.1, 0.2, 0.5, 1, 2, 3, 4, 5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 100, 200, 300,
    400, 500, 600, 700, 800, 900, 1000, 1200, 1400, 1600, 1800, 2000, 2500, 3000)
# Prompt and generation histograms share SGLang's default (--prompt-tokens-buckets unset).
SGLANG_TOKEN_BUCKETS = (
    100, 300, 500, 700, 1000, 1500, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 9000, 10000,
    12000, 15000, 20000, 22000, 25000, 30000, 35000, 40000, 66000, 99000, 132000, 300000,
    600000, 900000, 1100000)

# Text format 0.0.4 is what every Prometheus 2.x parses; newer clients call it by name.
_CONTENT_TYPE = getattr(prometheus_client.exposition, "CONTENT_TYPE_PLAIN_0_0_4",
                        prometheus_client.CONTENT_TYPE_LATEST)


def build_1_2_5_buckets(max_value: int) -> tuple[int, ...]:
    """vLLM's token-count buckets: 1, 2, 5, 10, 20, 50, ... up to and including max_value."""
    if max_value < 1:
        raise ValueError(f"max_value must be >= 1, got {max_value}")
    buckets: list[int] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return tuple(buckets)
            buckets.append(value)
        exponent += 1


class EngineMetrics:
    """Metric families with vLLM's (or SGLang's) exact names, labels and buckets."""

    def __init__(self, *, model_name: str, engine: str | Engine = "vllm",
                 registry: CollectorRegistry | None = None,
                 max_model_len: int = 131072) -> None:
        # max_model_len only shapes vLLM's 1-2-5 token buckets, as --max-model-len does there.
        self.engine = Engine(engine)
        self.model_name = model_name
        self.registry = registry if registry is not None else CollectorRegistry()
        if self.engine is Engine.VLLM:
            self._families: _VllmFamilies | _SglangFamilies = _VllmFamilies(
                model_name, self.registry, max_model_len)
        else:
            self._families = _SglangFamilies(model_name, self.registry)

    def request_finished(self, *, prompt_tokens: int, output_tokens: int, cached_tokens: int,
                         ttft_s: float, inter_token_s: Sequence[float], e2e_s: float,
                         queue_s: float, finished_reason: str = "stop") -> None:
        """Record one finished request: token counts, prefix-cache hits and its timings.

        `inter_token_s` holds one gap per output token after the first; both engines observe
        inter-token latency per token, so its quantiles are token-weighted.
        """
        _check_request(prompt_tokens, output_tokens, cached_tokens,
                       (ttft_s, e2e_s, queue_s, *inter_token_s))
        self._families.request_finished(
            prompt_tokens=prompt_tokens, output_tokens=output_tokens,
            cached_tokens=cached_tokens, ttft_s=ttft_s, inter_token_s=inter_token_s,
            e2e_s=e2e_s, queue_s=queue_s, finished_reason=finished_reason)

    def spec_decode(self, *, drafts: int, draft_tokens: int, accepted_tokens: int) -> None:
        """Record speculative-decoding steps: drafts proposed, tokens drafted and accepted."""
        if min(drafts, draft_tokens, accepted_tokens) < 0:
            raise ValueError("draft and accepted counts must be >= 0")
        if accepted_tokens > draft_tokens:
            raise ValueError(f"accepted_tokens ({accepted_tokens}) exceeds draft_tokens "
                             f"({draft_tokens})")
        self._families.spec_decode(drafts=drafts, draft_tokens=draft_tokens,
                                   accepted_tokens=accepted_tokens)

    def http_request(self, handler: str, method: str, status: int) -> None:
        """Count one HTTP request the API server answered. vLLM's server counts them with
        prometheus-fastapi-instrumentator (http_requests_total, status grouped as "2xx",
        "4xx": vLLM PR #15894); a prompt past --max-model-len is a 400 there and nowhere else.
        SGLang's server exports no such counter, so its refusals stay unseen."""
        self._families.http_request(handler, method, status)

    def set_load(self, *, running: int, waiting: int, kv_cache_usage: float) -> None:
        """Set the scheduler gauges; call it once per scheduler logging interval."""
        if running < 0 or waiting < 0:
            raise ValueError("running and waiting must be >= 0")
        if not 0.0 <= kv_cache_usage <= 1.0:
            raise ValueError(f"kv_cache_usage is a share 0-1, got {kv_cache_usage}")
        self._families.set_load(running=running, waiting=waiting,
                                kv_cache_usage=kv_cache_usage)

    def exposition(self) -> tuple[bytes, str]:
        """The text exposition and its content type, the body and header of GET /metrics."""
        return prometheus_client.generate_latest(self.registry), _CONTENT_TYPE


def _check_request(prompt: int, output: int, cached: int, seconds: Sequence[float]) -> None:
    if prompt < 0 or output < 0 or cached < 0:
        raise ValueError("token counts must be >= 0")
    if cached > prompt:
        raise ValueError(f"cached_tokens ({cached}) exceeds prompt_tokens ({prompt})")
    if any(not s >= 0 for s in seconds):  # `not >=` also rejects NaN
        raise ValueError("durations must be >= 0 seconds")


class _VllmFamilies:
    """PrometheusStatLogger's families for one engine (engine index 0), per request."""

    def __init__(self, model_name: str, registry: CollectorRegistry, max_model_len: int) -> None:
        labels = ("model_name", "engine")
        values = (model_name, "0")
        self._labels, self._values, self._registry = labels, values, registry

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=registry).labels(*values)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=registry).labels(*values)

        def histogram(name: str, doc: str, buckets: Sequence[float]) -> Histogram:
            return Histogram(name, doc, labels, registry=registry,
                             buckets=buckets).labels(*values)

        self.http_requests = Counter("http_requests_total",
                                     "Total number of requests by method, status and handler.",
                                     ("handler", "method", "status"), registry=registry)
        self.running = gauge("vllm:num_requests_running",
                             "Number of requests in model execution batches.")
        self.waiting = gauge("vllm:num_requests_waiting",
                             "Number of requests waiting to be processed.")
        self.kv_usage = gauge("vllm:kv_cache_usage_perc",
                              "KV-cache usage. 1 means 100 percent usage.")
        self.prefix_queries = counter(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens.")
        self.prefix_hits = counter("vllm:prefix_cache_hits",
                                   "Prefix cache hits, in terms of number of cached tokens.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Number of prefill tokens processed.")
        self.generation_tokens = counter("vllm:generation_tokens",
                                         "Number of generation tokens processed.")
        success = Counter("vllm:request_success", "Count of successfully processed requests.",
                          (*labels, "finished_reason"), registry=registry)
        self.success = {r: success.labels(*values, r) for r in VLLM_FINISH_REASONS}
        token_buckets = build_1_2_5_buckets(max_model_len)
        self.prompt_hist = histogram("vllm:request_prompt_tokens",
                                     "Number of prefill tokens processed.", token_buckets)
        self.generation_hist = histogram("vllm:request_generation_tokens",
                                         "Number of generation tokens processed.", token_buckets)
        self.ttft = histogram("vllm:time_to_first_token_seconds",
                              "Histogram of time to first token in seconds.", VLLM_TTFT_BUCKETS)
        # vLLM 0.11 emits both with the same observations; 0.12 hides the old name.
        self.tpot = histogram(
            "vllm:time_per_output_token_seconds",
            "Histogram of time per output token in seconds."
            "DEPRECATED: Use vllm:inter_token_latency_seconds instead.", VLLM_ITL_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds",
                             "Histogram of inter-token latency in seconds.", VLLM_ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds",
                             "Histogram of e2e request latency in seconds.",
                             VLLM_REQUEST_LATENCY_BUCKETS)
        self.queue = histogram("vllm:request_queue_time_seconds",
                               "Histogram of time spent in WAITING phase for request.",
                               VLLM_REQUEST_LATENCY_BUCKETS)
        self._spec: list[Counter] | None = None

    def request_finished(self, *, prompt_tokens: int, output_tokens: int, cached_tokens: int,
                         ttft_s: float, inter_token_s: Sequence[float], e2e_s: float,
                         queue_s: float, finished_reason: str) -> None:
        if finished_reason not in self.success:
            raise ValueError(f"finished_reason must be one of {VLLM_FINISH_REASONS}, "
                             f"got {finished_reason!r}")
        # vLLM counts prefix-cache lookups when a request is scheduled; recording them when it
        # finishes shifts them by one request's latency, which a rate over minutes absorbs.
        self.prefix_queries.inc(prompt_tokens)
        self.prefix_hits.inc(cached_tokens)
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(output_tokens)
        self.ttft.observe(ttft_s)
        for gap in inter_token_s:
            self.itl.observe(gap)
            self.tpot.observe(gap)
        self.success[finished_reason].inc()
        self.e2e.observe(e2e_s)
        self.queue.observe(queue_s)
        self.prompt_hist.observe(prompt_tokens)
        self.generation_hist.observe(output_tokens)

    def spec_decode(self, *, drafts: int, draft_tokens: int, accepted_tokens: int) -> None:
        if self._spec is None:
            # SpecDecodingProm registers its counters only when speculation is configured.
            self._spec = [
                Counter(name, doc, self._labels, registry=self._registry).labels(*self._values)
                for name, doc in (
                    ("vllm:spec_decode_num_drafts", "Number of spec decoding drafts."),
                    ("vllm:spec_decode_num_draft_tokens", "Number of draft tokens."),
                    ("vllm:spec_decode_num_accepted_tokens", "Number of accepted tokens."))]
        for counter, value in zip(self._spec, (drafts, draft_tokens, accepted_tokens),
                                  strict=True):
            counter.inc(value)

    def http_request(self, handler: str, method: str, status: int) -> None:
        self.http_requests.labels(handler, method, f"{status // 100}xx").inc()

    def set_load(self, *, running: int, waiting: int, kv_cache_usage: float) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_usage.set(kv_cache_usage)


class _SglangFamilies:
    """TokenizerMetricsCollector's per-request families and SchedulerMetricsCollector's gauges."""

    def __init__(self, model_name: str, registry: CollectorRegistry) -> None:
        # The tokenizer manager labels by model only; scheduler metrics carry the ranks too.
        self.tok = {"model_name": model_name}
        self.sched = {"model_name": model_name, "engine_type": "unified", "tp_rank": "0",
                      "pp_rank": "0", "moe_ep_rank": "0"}
        tok, sched = tuple(self.tok), tuple(self.sched)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, tok, registry=registry)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, sched, registry=registry)

        self.prompt_tokens = counter("sglang:prompt_tokens_total",
                                     "Number of prefill tokens processed.")
        self.generation_tokens = counter("sglang:generation_tokens_total",
                                         "Number of generation tokens processed.")
        self.cached_tokens = counter("sglang:cached_tokens_total",
                                     "Number of cached prompt tokens.")
        self.requests = counter("sglang:num_requests_total", "Number of requests processed.")
        self.aborted = counter("sglang:num_aborted_requests_total", "Number of requests aborted.")
        self.prompt_hist = Histogram("sglang:prompt_tokens_histogram",
                                     "Histogram of prompt token length.", tok,
                                     registry=registry, buckets=SGLANG_TOKEN_BUCKETS)
        self.generation_hist = Histogram("sglang:generation_tokens_histogram",
                                         "Histogram of generation token length.", tok,
                                         registry=registry, buckets=SGLANG_TOKEN_BUCKETS)
        self.ttft = Histogram("sglang:time_to_first_token_seconds",
                              "Histogram of time to first token in seconds.", tok,
                              registry=registry, buckets=SGLANG_TTFT_BUCKETS)
        self.itl = Histogram("sglang:inter_token_latency_seconds",
                             "Histogram of inter-token latency in seconds.", tok,
                             registry=registry, buckets=SGLANG_ITL_BUCKETS)
        self.e2e = Histogram("sglang:e2e_request_latency_seconds",
                             "Histogram of End-to-end request latency in seconds", tok,
                             registry=registry, buckets=SGLANG_E2E_BUCKETS)
        self.queue = Histogram("sglang:queue_time_seconds",
                               "Histogram of queueing time in seconds.", sched,
                               registry=registry, buckets=SGLANG_QUEUE_BUCKETS)
        self.running = gauge("sglang:num_running_reqs", "The number of running requests.")
        self.waiting = gauge("sglang:num_queue_reqs",
                             "The number of requests in the waiting queue.")
        self.token_usage = gauge("sglang:token_usage", "The token usage.")
        self.cache_hit_rate = gauge("sglang:cache_hit_rate", "The prefix cache hit rate.")
        self.accept_length = gauge("sglang:spec_accept_length",
                                   "The average acceptance length of speculative decoding.")
        self.accept_rate = gauge(
            "sglang:spec_accept_rate",
            "The average acceptance rate of speculative decoding (`accepted tokens / total "
            "draft tokens` in batch).")
        # Prefill tokens looked up and found since the last scheduler log (cache_hit_rate).
        self._interval_hits = 0
        self._interval_lookups = 0

    def request_finished(self, *, prompt_tokens: int, output_tokens: int, cached_tokens: int,
                         ttft_s: float, inter_token_s: Sequence[float], e2e_s: float,
                         queue_s: float, finished_reason: str) -> None:
        if finished_reason == "abort":
            # SGLang counts an abort on its own counter and records nothing else for it.
            self.aborted.labels(**self.tok).inc()
            return
        self.prompt_tokens.labels(**self.tok).inc(prompt_tokens)
        self.generation_tokens.labels(**self.tok).inc(output_tokens)
        if cached_tokens > 0:  # as SGLang does: the series appears with the first hit
            self.cached_tokens.labels(**self.tok).inc(cached_tokens)
        self.requests.labels(**self.tok).inc()
        self.e2e.labels(**self.tok).observe(e2e_s)
        self.prompt_hist.labels(**self.tok).observe(prompt_tokens)
        self.generation_hist.labels(**self.tok).observe(output_tokens)
        self.ttft.labels(**self.tok).observe(ttft_s)
        itl = self.itl.labels(**self.tok)
        for gap in inter_token_s:
            itl.observe(gap)
        self.queue.labels(**self.sched).observe(queue_s)
        self._interval_hits += cached_tokens
        self._interval_lookups += prompt_tokens

    def spec_decode(self, *, drafts: int, draft_tokens: int, accepted_tokens: int) -> None:
        if drafts == 0:
            return
        # scheduler_metrics_mixin: each verify step accepts its bonus token too, so the length
        # is 1 + accepted/drafts and the rate divides by drafts x (tokens per draft + 1).
        self.accept_length.labels(**self.sched).set((accepted_tokens + drafts) / drafts)
        self.accept_rate.labels(**self.sched).set(
            (accepted_tokens + drafts) / (draft_tokens + drafts))

    def http_request(self, handler: str, method: str, status: int) -> None:
        pass  # SGLang's HTTP server counts no requests by status (EngineMetrics.http_request)

    def set_load(self, *, running: int, waiting: int, kv_cache_usage: float) -> None:
        self.running.labels(**self.sched).set(running)
        self.waiting.labels(**self.sched).set(waiting)
        self.token_usage.labels(**self.sched).set(kv_cache_usage)
        lookups = self._interval_lookups
        self.cache_hit_rate.labels(**self.sched).set(
            self._interval_hits / lookups if lookups else 0.0)
        self._interval_hits = self._interval_lookups = 0
