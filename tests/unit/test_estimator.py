"""The Prometheus client against a local HTTP server, the estimator from canned results, and
the mapping of an observation into the optimizer's Workload."""

import asyncio
import math

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.support.prometheus import free_port
from trilemma.operator import estimator
from trilemma.operator.estimator import (
    Availability,
    LatencyStats,
    LengthStats,
    MetricsReason,
    ObservedWorkload,
)
from trilemma.operator.prometheus import (
    ErrorKind,
    PrometheusClient,
    PrometheusError,
    QueryResult,
    ResultType,
    Sample,
)
from trilemma.operator.resources import to_wire
from trilemma.optimizer.catalog.engines import Engine
from trilemma.optimizer.spec import (
    FixedLengths,
    GammaArrivals,
    LognormalLengths,
    PoissonArrivals,
    Workload,
)
from trilemma.optimizer.spec.lengths import MAX_P90_OVER_MEAN

# --- the client --------------------------------------------------------------------------------


def vector(value: str, labels: dict[str, str] | None = None) -> dict:
    return {"status": "success", "data": {"resultType": "vector", "result": [
        {"metric": labels or {}, "value": [1700000000.5, value]}]}}


class FakePrometheus:
    """An aiohttp app answering /api/v1/query from a script of (status, body) replies."""

    def __init__(self, *replies: tuple[int, object], delay_s: float = 0.0) -> None:
        self.replies = list(replies)
        self.delay_s = delay_s
        self.requests: list[tuple[dict[str, str], dict[str, str]]] = []
        self.app = web.Application()
        self.app.router.add_post("/api/v1/query", self.handle)
        self.app.router.add_post("/api/v1/query_range", self.handle)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((dict(await request.post()), dict(request.headers)))
        await asyncio.sleep(self.delay_s)
        status, body = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        if isinstance(body, str):
            return web.Response(status=status, text=body)
        return web.json_response(body, status=status)


@pytest.fixture
async def serve():
    servers: list[TestServer] = []

    async def start(fake: FakePrometheus) -> str:
        server = TestServer(fake.app, host="127.0.0.1")
        await server.start_server()
        servers.append(server)
        return str(server.make_url("")).rstrip("/")

    yield start
    for server in servers:
        await server.close()


async def test_parses_a_vector_and_sends_the_query_the_time_and_the_token(serve):
    fake = FakePrometheus((200, vector("12.5", {"job": "vllm"})))
    async with PrometheusClient(await serve(fake), token="s3cret", timeout_s=3) as client:
        result = await client.query("up", at=1700000000.25)
    assert result.type is ResultType.VECTOR
    assert result.samples == (Sample(labels={"job": "vllm"}, timestamp=1700000000.5,
                                     value=12.5),)
    assert result.value() == 12.5
    form, headers = fake.requests[0]
    assert form == {"query": "up", "time": "1700000000.250", "timeout": "3"}
    assert headers["Authorization"] == "Bearer s3cret"
    assert "s3cret" not in repr(client)


async def test_sends_no_authorization_without_a_token(serve):
    fake = FakePrometheus((200, vector("1")))
    async with PrometheusClient(await serve(fake)) as client:
        await client.query("up")
    assert "Authorization" not in fake.requests[0][1]


async def test_retries_a_503_then_succeeds(serve):
    fake = FakePrometheus((503, "overloaded"), (503, "overloaded"), (200, vector("3")))
    async with PrometheusClient(await serve(fake), retries=2, backoff_s=0.01) as client:
        assert (await client.query("up")).value() == 3.0
    assert len(fake.requests) == 3


async def test_gives_up_after_the_bounded_retries(serve):
    fake = FakePrometheus((503, "overloaded"))
    async with PrometheusClient(await serve(fake), retries=2, backoff_s=0.01) as client:
        with pytest.raises(PrometheusError) as caught:
            await client.query("up")
    assert caught.value.kind is ErrorKind.UNREACHABLE and caught.value.status == 503
    assert len(fake.requests) == 3


async def test_does_not_retry_a_bad_query(serve):
    body = {"status": "error", "errorType": "bad_data", "error": "parse error at char 4"}
    fake = FakePrometheus((400, body))
    async with PrometheusClient(await serve(fake), retries=3, backoff_s=0.01) as client:
        with pytest.raises(PrometheusError) as caught:
            await client.query("sum(")
    assert caught.value.kind is ErrorKind.BAD_QUERY
    assert "parse error at char 4" in str(caught.value)
    assert caught.value.query == "sum("
    assert len(fake.requests) == 1


async def test_a_slow_server_times_out_without_retrying(serve):
    fake = FakePrometheus((200, vector("1")), delay_s=1.0)
    async with PrometheusClient(await serve(fake), timeout_s=0.2, retries=2) as client:
        with pytest.raises(PrometheusError) as caught:
            await client.query("up")
    assert caught.value.kind is ErrorKind.TIMEOUT
    assert len(fake.requests) == 1


async def test_prometheus_side_timeouts_are_timeouts(serve):
    body = {"status": "error", "errorType": "timeout", "error": "query timed out"}
    fake = FakePrometheus((503, body), (200, vector("1")))
    async with PrometheusClient(await serve(fake), retries=1, backoff_s=0.01) as client:
        assert (await client.query("up")).value() == 1.0  # a 5xx, so retried


@pytest.mark.parametrize("reply", [
    (200, "<html>login</html>"),
    (200, {"status": "success", "data": {"resultType": "vector"}}),
    (200, {"status": "success", "data": {"resultType": "vector",
                                         "result": [{"metric": {}, "value": [1, "x"]}]}}),
])
async def test_answers_that_are_not_the_api_are_bad_responses(serve, reply):
    async with PrometheusClient(await serve(FakePrometheus(reply))) as client:
        with pytest.raises(PrometheusError) as caught:
            await client.query("up")
    assert caught.value.kind is ErrorKind.BAD_RESPONSE


async def test_an_unreachable_server_is_reported_after_retries():
    url = f"http://127.0.0.1:{free_port()}"
    async with PrometheusClient(url, retries=1, backoff_s=0.01) as client:
        with pytest.raises(PrometheusError) as caught:
            await client.query("up")
    assert caught.value.kind is ErrorKind.UNREACHABLE


async def test_parses_matrix_and_scalar_results(serve):
    matrix = {"status": "success", "warnings": ["sparse"], "data": {
        "resultType": "matrix",
        "result": [{"metric": {"a": "1"}, "values": [[10, "1"], [20, "NaN"]]}]}}
    scalar = {"status": "success", "data": {"resultType": "scalar", "result": [10, "+Inf"]}}
    fake = FakePrometheus((200, matrix), (200, scalar))
    async with PrometheusClient(await serve(fake)) as client:
        ranged = await client.query_range("x", start=10, end=20, step_s=10)
        single = await client.query("1/0")
    assert ranged.warnings == ("sparse",)
    (series,) = ranged.series
    assert series.labels == {"a": "1"} and series.points[0] == (10.0, 1.0)
    assert math.isnan(series.points[1][1])
    assert single.type is ResultType.SCALAR and single.value() is None
    assert fake.requests[0][0]["step"] == "10"


async def test_leaves_a_session_it_was_given_open(serve):
    import aiohttp

    fake = FakePrometheus((200, vector("1")))
    async with aiohttp.ClientSession() as session:
        async with PrometheusClient(await serve(fake), session=session) as client:
            await client.query("up")
        assert not session.closed


def test_a_value_is_none_for_nan_and_empty_and_an_error_for_several_series():
    nan = Sample(labels={}, timestamp=0, value=float("nan"))
    assert QueryResult(type=ResultType.VECTOR, samples=(nan,)).value() is None
    assert QueryResult(type=ResultType.VECTOR).value() is None
    one = Sample(labels={"a": "1"}, timestamp=0, value=1.0)
    two = Sample(labels={"a": "2"}, timestamp=0, value=2.0)
    with pytest.raises(ValueError, match="aggregate"):
        QueryResult(type=ResultType.VECTOR, samples=(one, two)).value()


# --- the estimator from canned results ---------------------------------------------------------


SELECTOR = {"model_name": "m"}
WINDOW = 900
NOW = 1_700_000_000.0


class CannedPrometheus:
    """Answers each query the estimator sends with a canned value (None = no series)."""

    def __init__(self, values: dict[str, float | None], *,
                 error: PrometheusError | None = None) -> None:
        queries = estimator.workload_queries("vllm", SELECTOR, WINDOW)
        self.by_query = {queries[name]: value for name, value in values.items()}
        self.error = error
        self.times: set[float | None] = set()
        self.asked: list[str] = []

    async def query(self, promql: str, *, at: float | None = None) -> QueryResult:
        self.times.add(at)
        self.asked.append(promql)
        if self.error is not None:
            raise self.error
        value = self.by_query.get(promql)
        if value is None:
            return QueryResult(type=ResultType.VECTOR)
        return QueryResult(type=ResultType.VECTOR,
                           samples=(Sample(labels={}, timestamp=at or 0, value=value),))


HEALTHY = {
    "rate": 10.0, "samples": 9000.0, "staleness": 7.5, "prompt_mean": 5000.0,
    "output_mean": 500.0, "prefix": 0.3, "burstiness": 1.6, "spec": 0.62, "queue": 0.012,
    "kv": 0.45, "prompt_p50": 4000.0, "prompt_p90": 9000.0, "prompt_p99": 18000.0,
    "output_p50": 400.0, "output_p90": 900.0, "output_p99": 1900.0, "ttft_p50": 0.2,
    "ttft_p90": 0.5, "ttft_p99": 1.25, "itl_p50": 0.02, "itl_p90": 0.035, "itl_p99": 0.09,
}


async def observe(values: dict[str, float | None], **kwargs) -> ObservedWorkload:
    fake = CannedPrometheus(values)
    observed = await estimator.estimate_workload(fake, engine="vllm", selector=SELECTOR,
                                                 window_s=WINDOW, now=NOW, **kwargs)
    assert fake.times == {NOW}, "every query must describe the same instant"
    return observed


async def test_assembles_every_figure_and_reports_available():
    observed = await observe(HEALTHY)
    assert observed.availability.reason is MetricsReason.AVAILABLE
    assert observed.availability.message == "9000 requests in the last 900s at 10/s"
    assert observed.prompt_tokens == LengthStats(mean=5000.0, p50=4000.0, p90=9000.0,
                                                 p99=18000.0)
    assert observed.ttft_ms == LatencyStats(p50=200.0, p90=500.0, p99=1250.0)
    assert observed.itl_ms.p99 == pytest.approx(90.0)
    assert observed.queue_wait_ms == pytest.approx(12.0)
    assert (observed.rate_rps, observed.prefix_hit_share, observed.burstiness_cv,
            observed.spec_acceptance, observed.kv_cache_usage) == (10.0, 0.3, 1.6, 0.62, 0.45)


async def test_runs_the_queries_concurrently():
    gate = asyncio.Event()
    started = 0

    class Barrier(CannedPrometheus):
        async def query(self, promql: str, *, at: float | None = None) -> QueryResult:
            nonlocal started
            started += 1
            if started == len(estimator.workload_queries("vllm", SELECTOR, WINDOW)):
                gate.set()
            await asyncio.wait_for(gate.wait(), timeout=2)  # only if all are in flight at once
            return await super().query(promql, at=at)

    observed = await estimator.estimate_workload(Barrier(HEALTHY), engine="vllm",
                                                 selector=SELECTOR, window_s=WINDOW, now=NOW)
    assert observed.availability.ok


async def test_status_is_camel_case_rounded_and_omits_unknowns():
    observed = await observe({**HEALTHY, "rate": 10.123456, "spec": None, "itl_p99": None})
    assert to_wire(observed.to_status()) == {
        "windowSeconds": 900, "observedAt": "2023-11-14T22:13:20Z", "samples": 9000,
        "rateRps": 10.12, "prefixHitShare": 0.3, "burstinessCv": 1.6, "queueWaitMs": 12.0,
        "kvCacheUsage": 0.45, "stalenessSeconds": 7.5,
        "promptTokens": {"mean": 5000.0, "p50": 4000.0, "p90": 9000.0, "p99": 18000.0},
        "outputTokens": {"mean": 500.0, "p50": 400.0, "p90": 900.0, "p99": 1900.0},
        "ttftMs": {"p50": 200.0, "p90": 500.0, "p99": 1250.0},
        "itlMs": {"p50": 20.0, "p90": 35.0},
    }


async def test_nothing_matching_the_selector_is_metrics_missing():
    observed = await observe({})
    assert observed.availability.reason is MetricsReason.MISSING
    assert observed.availability.message == (
        'no vllm:request_success_total series match {model_name="m"} in the last 900s')
    assert to_wire(observed.to_status()) == {
        "windowSeconds": 900, "observedAt": "2023-11-14T22:13:20Z", "samples": 0}


async def test_an_old_newest_sample_is_metrics_stale():
    observed = await observe({**HEALTHY, "staleness": 500.0}, stale_after_s=120)
    assert observed.availability.reason is MetricsReason.STALE
    assert "500s old (limit 120s)" in observed.availability.message


async def test_too_few_requests_are_metrics_missing():
    observed = await observe({**HEALTHY, "samples": 3.2}, min_samples=50)
    assert observed.availability.reason is MetricsReason.MISSING
    assert "3 requests finished in the last 900s" in observed.availability.message


async def test_lengths_without_series_are_metrics_missing():
    observed = await observe({**HEALTHY, "output_mean": None})
    assert observed.availability.reason is MetricsReason.MISSING
    assert "vllm:request_generation_tokens_sum" in observed.availability.message


async def test_a_prometheus_outage_becomes_the_prometheus_error_reason():
    fake = CannedPrometheus(HEALTHY, error=PrometheusError(ErrorKind.UNREACHABLE, "refused"))
    observed = await estimator.estimate_workload(fake, engine="vllm", selector=SELECTOR,
                                                 window_s=WINDOW, now=NOW)
    assert observed.availability == Availability(reason=MetricsReason.PROMETHEUS_ERROR,
                                                  message="unreachable: refused")
    assert observed.rate_rps is None


# --- into the optimizer's Workload -------------------------------------------------------------


BASE = Workload.model_validate({
    "promptTokens": {"kind": "fixed", "value": 100}, "outputTokens": {"kind": "fixed",
                                                                      "value": 10},
    "arrivals": {"kind": "poisson", "requestsPerSecond": 1}, "peakFactor": 2.5,
    "outputPredictability": 0.8})


def observed_with(**changes) -> ObservedWorkload:
    fields = {"engine": Engine.VLLM, "window_s": 900, "observed_at": NOW,
              "availability": Availability(reason=MetricsReason.AVAILABLE, message=""),
              "rate_rps": 12.3456, "samples": 11000.0,
              "prompt_tokens": LengthStats(mean=5000.0, p50=4000.0, p90=9000.0),
              "output_tokens": LengthStats(mean=500.0, p50=400.0, p90=900.0),
              "prefix_hit_share": 0.3, "burstiness_cv": 1.05}
    return ObservedWorkload(**{**fields, **changes})


def test_lengths_become_lognormal_from_mean_and_p90():
    spec = estimator.to_workload_spec(observed_with(), base=BASE)
    assert spec.prompt_tokens == LognormalLengths(kind="lognormal", mean=5000.0, p90=9000.0)
    assert spec.output_tokens == LognormalLengths(kind="lognormal", mean=500.0, p90=900.0)


@pytest.mark.parametrize("stats", [
    LengthStats(mean=1200.4, p50=1500.0, p90=1900.0),  # all in one bucket: median above mean
    LengthStats(mean=1200.4, p50=900.0, p90=1100.0),  # p90 not above the mean
    LengthStats(mean=1200.4),
])
def test_lengths_the_buckets_cannot_spread_are_fixed_at_the_mean(stats):
    spec = estimator.to_workload_spec(observed_with(prompt_tokens=stats), base=BASE)
    assert spec.prompt_tokens == FixedLengths(kind="fixed", value=1200)


def test_a_p90_beyond_any_lognormal_is_capped():
    stats = LengthStats(mean=100.0, p50=40.0, p90=1000.0)
    spec = estimator.to_workload_spec(observed_with(output_tokens=stats), base=BASE)
    assert isinstance(spec.output_tokens, LognormalLengths)
    assert 226.0 < spec.output_tokens.p90 <= 100.0 * MAX_P90_OVER_MEAN


@pytest.mark.parametrize(("cv", "expected"), [
    (None, PoissonArrivals(kind="poisson", requests_per_second=12.35)),
    (0.85, PoissonArrivals(kind="poisson", requests_per_second=12.35)),
    (2.345, GammaArrivals(kind="gamma", requests_per_second=12.35, cv=2.35)),
    (0.3, GammaArrivals(kind="gamma", requests_per_second=12.35, cv=0.3)),
    (55.0, GammaArrivals(kind="gamma", requests_per_second=12.35, cv=10.0)),
])
def test_burstiness_picks_poisson_or_gamma_arrivals(cv, expected):
    spec = estimator.to_workload_spec(observed_with(burstiness_cv=cv), base=BASE)
    assert spec.arrivals == expected


@pytest.mark.parametrize("share", [0.05, 0.3, 0.6])
def test_prefix_reuse_reproduces_the_observed_cached_tokens(share):
    spec = estimator.to_workload_spec(observed_with(prefix_hit_share=share), base=BASE)
    assert spec.prefix is not None and spec.prefix.hit_rate == 1.0
    assert spec.prefix.shared_tokens <= 5000
    assert spec.expected_cached_tokens() == pytest.approx(share * 5000.0, abs=1.0)


def test_a_share_no_prefix_can_reach_takes_the_longest_prefix_allowed():
    spec = estimator.to_workload_spec(observed_with(prefix_hit_share=0.99), base=BASE)
    assert spec.prefix is not None and spec.prefix.shared_tokens == 5000


@pytest.mark.parametrize("share", [None, 0.0, 0.005])
def test_no_prefix_without_a_meaningful_share(share):
    assert estimator.to_workload_spec(observed_with(prefix_hit_share=share),
                                      base=BASE).prefix is None


def test_keeps_what_metrics_cannot_show_from_the_base():
    spec = estimator.to_workload_spec(observed_with(), base=BASE)
    assert (spec.peak_factor, spec.output_predictability) == (2.5, 0.8)


def test_refuses_an_observation_without_traffic():
    with pytest.raises(ValueError, match="no request rate"):
        estimator.to_workload_spec(observed_with(rate_rps=None), base=BASE)
    with pytest.raises(ValueError, match="mean prompt"):
        estimator.to_workload_spec(observed_with(prompt_tokens=LengthStats()), base=BASE)
