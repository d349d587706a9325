"""The scheduler: the fast engine takes the reference's every decision, and the decisions are
vLLM V1's (preemption, prefix cache, chunked prefill, speculation, disaggregation)."""

import numpy as np
import pytest

from tests.support.simruns import FIELDS, assert_fast_matches_reference
from trilemma.optimizer import serving
from trilemma.optimizer.catalog import gpus, models
from trilemma.optimizer.catalog.speculation import SpecConfig, SpecMethod, expected_tokens_per_step
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.perf.engine import engine_facts
from trilemma.optimizer.serving import toy

ROOFLINE = toy.RooflineStepModel(models.load_model("meta-llama/Llama-3.1-8B"),
                                 gpus.get_gpu("h100_sxm"), engine_facts())
LINEAR = toy.LinearStepModel(base_ms=5.0, per_token_ms=0.02, per_kv_token_ms=1e-5)
NGRAM3 = serving.Speculation(config=SpecConfig(method=SpecMethod.NGRAM, k=3), acceptance=0.7)
LINK = serving.KvTransfer(bytes_per_token=131_072, bandwidth=50e9, latency_ms=2.0)


def _workload(seed=0, *, requests=150, prompt=None, output=None, arrivals=None, prefix=None):
    return serving.sample_requests(
        np.random.default_rng(seed), requests=requests,
        prompt_tokens=prompt or serving.Lognormal(mean=500, p90=900, high=1500),
        output_tokens=output or serving.Lognormal(mean=60, p90=110, high=300),
        arrivals=arrivals or serving.Poisson(rate_per_s=12.0), prefix=prefix)


def _cluster(*, kv=4000, seqs=32, budget=2048, spec=None, replicas=1,
             balancer=serving.Balancer.LEAST_OUTSTANDING, prefill=None, overhead=0.0):
    engine = serving.EngineConfig(kv_blocks=kv, max_num_seqs=seqs,
                                  max_num_batched_tokens=budget, speculation=spec)
    pool = serving.Pool(engine=engine, replicas=replicas, balancer=balancer)
    if prefill is None:
        return serving.Cluster(pool=pool, request_overhead_ms=overhead)
    return serving.Cluster(pool=pool, prefill=prefill, transfer=LINK, request_overhead_ms=overhead)


def _prefill_pool(kv=4000, replicas=1):
    return serving.Pool(engine=serving.EngineConfig(kv_blocks=kv, max_num_seqs=16,
                                                    max_num_batched_tokens=2048),
                        replicas=replicas)


SCENARIOS = {
    "open loop, ample KV": (_workload(), _cluster()),
    "KV too small: preemption": (_workload(1, arrivals=serving.Offline()),
                                 _cluster(kv=260, seqs=16)),
    "prefix cache under eviction": (
        _workload(2, prefix=serving.SharedPrefixes(tokens=320, share=0.8, prefixes=4)),
        _cluster(kv=300, seqs=16)),
    "prefix longer than a chunk, tight KV: partial hits": (
        _workload(9, prompt=serving.Lognormal(mean=1500, p90=2800, high=4000),
                  prefix=serving.SharedPrefixes(tokens=1200, share=0.8, prefixes=3)),
        _cluster(kv=700, seqs=12, budget=512)),
    "chunked prefill": (_workload(3, prompt=serving.Lognormal(mean=1500, p90=2800, high=4000)),
                        _cluster(budget=256, seqs=8)),
    "speculation with preemption": (_workload(4, arrivals=serving.ClosedLoop(concurrency=24)),
                                    _cluster(kv=260, spec=NGRAM3)),
    "two replicas, round robin, overhead": (
        _workload(5, arrivals=serving.ClosedLoop(concurrency=20)),
        _cluster(replicas=2, balancer=serving.Balancer.ROUND_ROBIN, overhead=7.0)),
    "disaggregated": (_workload(6), _cluster(replicas=2, prefill=_prefill_pool())),
    "disaggregated, decode side preempts": (
        _workload(7, arrivals=serving.Offline(),
                  prefix=serving.SharedPrefixes(tokens=200, share=0.5)),
        _cluster(kv=200, seqs=16, spec=NGRAM3, prefill=_prefill_pool(kv=150, replicas=2))),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_fast_engine_takes_the_reference_engines_every_decision(name):
    workload, cluster = SCENARIOS[name]
    assert_fast_matches_reference(cluster, workload, ROOFLINE)


def test_the_scenarios_exercise_what_they_are_named_for():
    def run(name):
        w, c = SCENARIOS[name]
        return serving.simulate(c, w, ROOFLINE, np.random.default_rng(11))
    assert run("KV too small: preemption").preemptions.sum() > 0
    assert run("speculation with preemption").preemptions.sum() > 0
    assert run("disaggregated, decode side preempts").preemptions.sum() > 0
    assert run("prefix cache under eviction").summary().prefix_hit_share > 0.3
    # Hits on prefixes registered chunk by chunk, or whose tails were evicted block by block.
    partial = run("prefix longer than a chunk, tight KV: partial hits")
    assert partial.preemptions.sum() > 0
    assert np.any((partial.cached_tokens > 0) & (partial.cached_tokens < 1200 // 16 * 16))
    w, _ = SCENARIOS["chunked prefill"]
    whole = serving.Cluster(pool=serving.Pool(engine=serving.EngineConfig(
        kv_blocks=4000, max_num_seqs=8, max_num_batched_tokens=8192)))
    chunked = run("chunked prefill")
    assert chunked.engine_steps.sum() > serving.simulate(whole, w, ROOFLINE,
                                                         np.random.default_rng(11)).engine_steps.sum()


@pytest.mark.parametrize("spec", [None, NGRAM3], ids=["plain", "speculative"])
def test_preemption_happens_when_kv_is_too_small_and_every_request_still_completes(spec):
    w = _workload(8, requests=120, arrivals=serving.Offline())
    small = serving.simulate(_cluster(kv=230, seqs=32, spec=spec), w, ROOFLINE,
                             np.random.default_rng(0))
    ample = serving.simulate(_cluster(kv=20_000, seqs=32, spec=spec), w, ROOFLINE,
                             np.random.default_rng(0))
    assert small.preemptions.sum() > 5 and ample.preemptions.sum() == 0
    assert np.all(np.isfinite(small.finish_ms))
    assert np.all(small.finish_ms >= small.first_token_ms)
    # Recomputing prefills costs time: the same work takes longer.
    assert small.makespan_ms > ample.makespan_ms


def test_a_request_that_cannot_fit_the_kv_cache_alone_is_refused():
    w = _workload(prompt=serving.Fixed(tokens=5000), requests=3)
    with pytest.raises(InputError) as err:
        serving.simulate(_cluster(kv=100), w, LINEAR, np.random.default_rng(0))
    assert err.value.field == "kv_blocks"


def test_a_cached_prefix_skips_its_prefill_tokens():
    # One request at a time: every request after the first finds the prefix cached.
    w = _workload(requests=20, prompt=serving.Fixed(tokens=1024), output=serving.Fixed(tokens=4),
                  arrivals=serving.Poisson(rate_per_s=0.5),
                  prefix=serving.SharedPrefixes(tokens=520, share=1.0))
    res = serving.simulate(_cluster(), w, LINEAR, np.random.default_rng(0))
    # Only whole blocks are cached: 520 // 16 = 32 blocks = 512 tokens.
    assert res.cached_tokens[0] == 0 and np.all(res.cached_tokens[1:] == 512)
    assert res.ttft_ms[0] == pytest.approx(5.0 + 0.02 * 1024)
    np.testing.assert_allclose(res.ttft_ms[1:], 5.0 + 0.02 * 512)


@pytest.mark.parametrize("concurrency,replicas", [(1, 1), (7, 1), (32, 1), (12, 3)])
def test_closed_loop_mode_keeps_exactly_c_requests_in_flight(concurrency, replicas):
    w = _workload(9, requests=200, arrivals=serving.ClosedLoop(concurrency=concurrency))
    res = serving.simulate(_cluster(replicas=replicas, overhead=3.0), w, ROOFLINE,
                           np.random.default_rng(0))
    last_sent = res.arrival_ms.max()
    # The count after every instant's events, before the clients run out of requests.
    t, count = res.occupancy_ms, res.occupancy
    at_end_of_instant = np.append(t[1:] != t[:-1], True)
    keep = at_end_of_instant & (t < last_sent)
    assert np.all(count[keep][concurrency - 1:] == concurrency)
    assert count.max() == concurrency
    assert res.mean_in_system(0.0, last_sent) == pytest.approx(concurrency, rel=1e-9)


def test_offline_mode_queues_every_request_at_time_zero():
    w = _workload(requests=50, arrivals=serving.Offline())
    res = serving.simulate(_cluster(seqs=8), w, LINEAR, np.random.default_rng(0))
    assert np.all(res.arrival_ms == 0.0)
    assert res.occupancy[0] == 50 or res.occupancy.max() == 50
    # FCFS: requests are first scheduled in row order.
    assert np.all(np.diff(res.first_scheduled_ms) >= 0)


@pytest.mark.parametrize("method", list(serving.Method))
def test_a_run_is_identical_for_the_same_seed(method):
    w, c = SCENARIOS["speculation with preemption"]
    a = serving.simulate(c, w, ROOFLINE, np.random.default_rng(5), method=method)
    b = serving.simulate(c, w, ROOFLINE, np.random.default_rng(5), method=method)
    other = serving.simulate(c, w, ROOFLINE, np.random.default_rng(6), method=method)
    for field in FIELDS:
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    # The generator drives the speculative acceptances, so another seed changes the run.
    assert not np.array_equal(a.finish_ms, other.finish_ms)


@pytest.mark.parametrize("a", [0.0, 0.3, 0.7, 0.95, 1.0])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_verify_steps_yield_the_catalogs_mean_tokens(a, k):
    spec = serving.Speculation(config=SpecConfig(method=SpecMethod.NGRAM, k=k), acceptance=a)
    tokens = spec.step_tokens(np.random.default_rng(0).random(200_000))
    assert tokens.min() >= 1 and tokens.max() <= k + 1
    assert tokens.mean() == pytest.approx(float(expected_tokens_per_step(a, k)), rel=0.01)


def test_disaggregated_mode_adds_the_kv_transfer_to_ttft():
    prompt, osl = 1000, 8
    # One request at a time, so nothing queues.
    w = _workload(requests=10, prompt=serving.Fixed(tokens=prompt),
                  output=serving.Fixed(tokens=osl),
                  arrivals=serving.Timestamps(ms=np.arange(10) * 1000.0))
    combined = serving.simulate(_cluster(), w, LINEAR, np.random.default_rng(0))
    split = serving.simulate(_cluster(prefill=_prefill_pool()), w, LINEAR,
                             np.random.default_rng(0))
    prefill_step = 5.0 + 0.02 * prompt
    np.testing.assert_allclose(combined.ttft_ms, prefill_step)
    # Prefill replica, then the link, then the decode replica's first step (one token over a
    # KV of the whole prompt) samples the first token.
    first_decode = 5.0 + 0.02 + 1e-5 * prompt
    np.testing.assert_allclose(split.ttft_ms, prefill_step + LINK.ms(prompt) + first_decode)
    assert LINK.ms(prompt) == pytest.approx(2.0 + prompt * 131_072 / 50e9 * 1e3)


def test_disaggregated_requests_finish_on_decode_replicas():
    w = _workload(10)
    res = serving.simulate(_cluster(replicas=2, prefill=_prefill_pool(replicas=2)), w,
                           ROOFLINE, np.random.default_rng(0))
    assert set(np.unique(res.engine)) == {0, 1}
    assert res.engine_steps[2:].sum() > 0  # the prefill engines worked too


@pytest.mark.parametrize("balancer", list(serving.Balancer))
def test_the_balancer_spreads_a_steady_stream_over_the_replicas(balancer):
    w = _workload(11, requests=300)
    res = serving.simulate(_cluster(replicas=3, balancer=balancer), w, ROOFLINE,
                           np.random.default_rng(0))
    counts = np.bincount(res.engine, minlength=3)
    if balancer is serving.Balancer.ROUND_ROBIN:
        assert list(counts) == [100, 100, 100]
    else:
        assert counts.min() > 60


def test_least_outstanding_avoids_the_replica_stuck_with_long_requests():
    # Row 0 is very long; round robin keeps sending every third request to its replica.
    out = np.full(90, 20)
    out[0] = 3000
    w = serving.RequestStream(prompt_tokens=np.full(90, 200), output_tokens=out,
                              prefix_id=np.full(90, -1), prefix_tokens=np.zeros(90),
                              arrival_ms=np.arange(90) * 50.0)
    def ttft(balancer):
        c = _cluster(replicas=3, balancer=balancer, seqs=1, budget=2048)
        return serving.simulate(c, w, LINEAR, np.random.default_rng(0)).ttft_ms.mean()
    assert ttft(serving.Balancer.LEAST_OUTSTANDING) < 0.2 * ttft(serving.Balancer.ROUND_ROBIN)


@pytest.mark.parametrize("balancer", list(serving.Balancer))
@pytest.mark.parametrize("disaggregated", [False, True])
def test_a_huge_pool_simulates_like_one_engine_per_request(balancer, disaggregated):
    """A pool of 100k replicas costs what a pool of one replica per request does (memory and
    time do not grow with the replica count), and decides exactly the same."""
    w = _workload(12, requests=40)

    def run(replicas):
        prefill = _prefill_pool(replicas=replicas) if disaggregated else None
        return serving.simulate(_cluster(replicas=replicas, balancer=balancer, prefill=prefill),
                                w, LINEAR, np.random.default_rng(0))

    huge, exact = run(100_000), run(len(w))
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(huge, name), getattr(exact, name), err_msg=name)
    assert len(huge.engine_steps) == (2 if disaggregated else 1) * len(w)
