"""The estimator against a real Prometheus scraping simulated vLLM and SGLang metrics.

A known workload (Poisson arrivals, lognormal lengths, prefix hits, speculative decoding) is
fed in real time into EngineMetrics registries while Prometheus scrapes them every second;
then estimate_workload reads it back and is compared with what was fed over the same window.
The printed relative errors are the estimator's acceptance figures.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import pytest

from tests.support.prometheus import (
    MetricsExporter,
    PrometheusServer,
    ScrapeJob,
    free_port,
    prometheus_binary,
)
from trilemma.operator import estimator
from trilemma.operator.estimator import MetricsReason
from trilemma.operator.prometheus import PrometheusClient
from trilemma.simfleet import vllm_metrics
from trilemma.simfleet.vllm_metrics import EngineMetrics

pytestmark = pytest.mark.slow

RATE_RPS = 10.0
FEED_S = 36.0
WINDOW_S = 30
STALE_EXPORTER_STOPS_AT_S = 12.0
STALE_AFTER_S = 5.0
MODELS = {"vllm": "sim-vllm", "sglang": "sim-sglang", "stale": "sim-stale"}
TOKEN_BUCKETS = {"vllm": vllm_metrics.build_1_2_5_buckets(131072),
                 "sglang": vllm_metrics.SGLANG_TOKEN_BUCKETS}
TTFT_BUCKETS = {"vllm": vllm_metrics.VLLM_TTFT_BUCKETS,
                "sglang": vllm_metrics.SGLANG_TTFT_BUCKETS}
ITL_BUCKETS = {"vllm": vllm_metrics.VLLM_ITL_BUCKETS, "sglang": vllm_metrics.SGLANG_ITL_BUCKETS}


@dataclass(frozen=True)
class Fed:
    """One request as recorded: when (unix s) and what."""

    at: float
    prompt: int
    output: int
    cached: int
    ttft_s: float
    itl_s: tuple[float, ...]
    queue_s: float
    drafts: int
    draft_tokens: int
    accepted: int


@dataclass
class Feed:
    prometheus: PrometheusServer
    requests: dict[str, list[Fed]] = field(default_factory=dict)

    def window(self, engine: str, end: float, window_s: float) -> list[Fed]:
        return [r for r in self.requests[engine] if end - window_s < r.at <= end]


def _draw(rng: np.random.Generator, at: float) -> Fed:
    prompt = max(1, round(rng.lognormal(math.log(1500) - 0.125, 0.5)))  # mean ~1500
    output = max(2, round(rng.lognormal(math.log(200) - 0.18, 0.6)))  # mean ~200
    base_itl = rng.uniform(0.015, 0.05)
    drafts = max(1, output // 4)
    return Fed(at=at, prompt=prompt, output=output,
               cached=min(prompt, 512) if rng.random() < 0.6 else 0,
               ttft_s=float(rng.uniform(0.05, 0.4)),
               itl_s=tuple(float(x) for x in base_itl * rng.gamma(20.0, 1 / 20.0, output - 1)),
               queue_s=float(rng.uniform(0, 0.03)), drafts=drafts, draft_tokens=3 * drafts,
               accepted=int(rng.binomial(3 * drafts, 0.6)))


def _feed(metrics: dict[str, EngineMetrics], stale: MetricsExporter,
          rng: np.random.Generator) -> dict[str, list[Fed]]:
    """Poisson arrivals for each registry, recorded in real time as the clock reaches them."""
    events = sorted(
        (float(t), name) for name in metrics
        for t in np.cumsum(rng.exponential(1 / RATE_RPS, int(RATE_RPS * FEED_S * 2)))
        if t < FEED_S and (name != "stale" or t < STALE_EXPORTER_STOPS_AT_S))
    fed: dict[str, list[Fed]] = {name: [] for name in metrics}
    start = time.time()
    for offset, name in events:
        if offset >= STALE_EXPORTER_STOPS_AT_S:
            stale.stop()
        time.sleep(max(0.0, start + offset - time.time()))
        r = _draw(rng, time.time())
        m = metrics[name]
        m.request_finished(prompt_tokens=r.prompt, output_tokens=r.output,
                           cached_tokens=r.cached, ttft_s=r.ttft_s, inter_token_s=r.itl_s,
                           e2e_s=r.ttft_s + sum(r.itl_s), queue_s=r.queue_s)
        m.spec_decode(drafts=r.drafts, draft_tokens=r.draft_tokens, accepted_tokens=r.accepted)
        m.set_load(running=int(rng.integers(1, 32)), waiting=int(rng.integers(0, 4)),
                   kv_cache_usage=float(rng.uniform(0.2, 0.6)))
        fed[name].append(r)
    stale.stop()
    return fed


@pytest.fixture(scope="module")
def feed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Feed]:
    prometheus_binary()  # skip (or fail in CI) before spending the feeding time
    metrics = {name: EngineMetrics(model_name=model, engine="sglang" if name == "sglang"
                                   else "vllm") for name, model in MODELS.items()}
    live = MetricsExporter({"/vllm": metrics["vllm"], "/sglang": metrics["sglang"]})
    stale = MetricsExporter({"/metrics": metrics["stale"]})
    with live, stale:
        jobs = [ScrapeJob("vllm", live.address, "/vllm"),
                ScrapeJob("sglang", live.address, "/sglang"),
                ScrapeJob("stale", stale.address)]
        with PrometheusServer(tmp_path_factory.mktemp("prometheus"), jobs) as prometheus:
            prometheus.wait_for_targets()
            requests = _feed(metrics, stale, np.random.default_rng(20240611))
            yield Feed(prometheus=prometheus, requests=requests)


def _relative_error(estimate: float | None, truth: float) -> float:
    assert estimate is not None
    return (estimate - truth) / truth


def _bucket_bounds(truth: float, buckets: Sequence[float]) -> tuple[float, float]:
    """Where histogram_quantile may put a quantile whose true value is `truth`: the bucket
    edges around it, widened by 5% so a truth on an edge may read on either side."""
    low = max((b for b in (0.0, *buckets) if b <= truth * 0.95), default=0.0)
    high = min((b for b in buckets if b >= truth * 1.05), default=math.inf)
    return low, high


@pytest.mark.parametrize("engine", ["vllm", "sglang"])
async def test_estimates_match_the_fed_workload_within_ten_percent(feed: Feed, engine: str):
    async with PrometheusClient(feed.prometheus.url, timeout_s=5) as client:
        observed = await estimator.estimate_workload(
            client, engine=engine, selector={"model_name": MODELS[engine]}, window_s=WINDOW_S,
            burst_step_s=3, resolution_s=1, stale_after_s=STALE_AFTER_S)
    fed = feed.window(engine, observed.observed_at, WINDOW_S)
    prompts = np.array([r.prompt for r in fed])
    outputs = np.array([r.output for r in fed])
    truth = {"rate": len(fed) / WINDOW_S, "prompt": prompts.mean(), "output": outputs.mean(),
             "prefix": sum(r.cached for r in fed) / prompts.sum()}
    errors = {"rate": _relative_error(observed.rate_rps, truth["rate"]),
              "prompt": _relative_error(observed.prompt_tokens.mean, truth["prompt"]),
              "output": _relative_error(observed.output_tokens.mean, truth["output"]),
              "prefix": _relative_error(observed.prefix_hit_share, truth["prefix"])}
    if engine == "vllm":
        truth["spec"] = sum(r.accepted for r in fed) / sum(r.draft_tokens for r in fed)
        errors["spec"] = _relative_error(observed.spec_acceptance, truth["spec"])
    print(f"\n{engine}: {len(fed)} requests fed in the {WINDOW_S}s window, "
          f"estimator saw {observed.samples:.1f}; burstiness {observed.burstiness_cv} "
          "(Poisson: 1); staleness", observed.staleness_s)
    for key, error in errors.items():
        print(f"  {key:7s} truth {truth[key]:10.4g}  relative error {error:+.2%}")

    assert observed.availability.reason is MetricsReason.AVAILABLE, observed.availability
    assert all(abs(e) <= 0.10 for e in errors.values()), errors
    assert observed.staleness_s is not None and observed.staleness_s <= 3
    assert observed.burstiness_cv is not None and 0.3 < observed.burstiness_cv < 2.5
    assert observed.spec_acceptance is not None and 0 < observed.spec_acceptance <= 1

    itl = np.concatenate([r.itl_s for r in fed])
    checks = [("prompt", observed.prompt_tokens, prompts, TOKEN_BUCKETS[engine], 1.0),
              ("output", observed.output_tokens, outputs, TOKEN_BUCKETS[engine], 1.0),
              ("ttft", observed.ttft_ms, np.array([r.ttft_s for r in fed]), TTFT_BUCKETS[engine],
               1000.0),
              ("itl", observed.itl_ms, itl, ITL_BUCKETS[engine], 1000.0)]
    for what, stats, values, buckets, scale in checks:
        for q in estimator.QUANTILES:
            tag = f"p{round(q * 100)}"
            estimate = getattr(stats, tag)
            low, high = _bucket_bounds(float(np.quantile(values, q)), buckets)
            assert estimate is not None and low * scale <= estimate <= high * scale, (
                what, tag, estimate, (low * scale, high * scale))


async def test_reports_metrics_missing_when_the_selector_matches_nothing(feed: Feed):
    async with PrometheusClient(feed.prometheus.url, timeout_s=5) as client:
        observed = await estimator.estimate_workload(
            client, engine="vllm", selector={"model_name": "no-such-model"}, window_s=WINDOW_S)
    assert observed.availability.reason is MetricsReason.MISSING
    assert 'model_name="no-such-model"' in observed.availability.message
    assert observed.rate_rps is None and observed.samples == 0


async def test_reports_metrics_stale_once_the_exporter_has_stopped(feed: Feed):
    # A window reaching back before the exporter stopped, so its last samples are in it.
    async with PrometheusClient(feed.prometheus.url, timeout_s=5) as client:
        observed = await estimator.estimate_workload(
            client, engine="vllm", selector={"model_name": MODELS["stale"]}, window_s=60,
            resolution_s=1, stale_after_s=STALE_AFTER_S)
    since_stop = time.time() - feed.requests["stale"][-1].at
    print(f"\nstale exporter: last request {since_stop:.1f}s ago, estimator staleness "
          f"{observed.staleness_s}")
    assert observed.availability.reason is MetricsReason.STALE, observed.availability
    assert observed.staleness_s is not None
    # Its last scrape came at most one interval (plus the resolution) after its last request.
    assert since_stop - 3 <= observed.staleness_s <= since_stop + 1


async def test_reports_prometheus_error_when_nothing_listens():
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    async with PrometheusClient(url, timeout_s=1, retries=1, backoff_s=0.05) as client:
        observed = await estimator.estimate_workload(
            client, engine="vllm", selector={"model_name": "m"}, window_s=WINDOW_S)
    assert observed.availability.reason is MetricsReason.PROMETHEUS_ERROR
    assert observed.availability.message.startswith("unreachable")
    assert time.monotonic() - started < 5
