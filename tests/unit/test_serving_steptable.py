"""The fast path: the step-time table against direct perf-model calls, and whole fast runs
against the reference."""

import numpy as np
import pytest

from trilemma.optimizer import serving
from trilemma.optimizer.catalog import gpus, models
from trilemma.optimizer.catalog.speculation import SpecConfig, SpecMethod
from trilemma.optimizer.perf.engine import engine_facts
from trilemma.optimizer.serving import steptable, toy

ROOFLINE_8B = toy.RooflineStepModel(models.load_model("meta-llama/Llama-3.1-8B"),
                                    gpus.get_gpu("h100_sxm"), engine_facts())
ROOFLINE_70B = toy.RooflineStepModel(models.load_model("meta-llama/Llama-3.1-70B"),
                                     gpus.get_gpu("h100_sxm"), engine_facts())
NGRAM3 = serving.Speculation(config=SpecConfig(method=SpecMethod.NGRAM, k=3), acceptance=0.7)


def _real_step_model(model="meta-llama/Llama-3.1-8B", tp=1):
    """The calibrated StepModel, or a skip where the kernel tables are not installed yet."""
    from trilemma.optimizer.perf import estimate
    try:
        return estimate.step_model(estimate.resolve(model=model, gpu="h100_sxm", tp=tp))
    except (AttributeError, ImportError, FileNotFoundError, KeyError) as e:
        pytest.skip(f"calibrated kernels unavailable: {e!r}")


def _random_shapes(rng, n, seqs, budget, max_context):
    d = rng.integers(0, seqs + 1, n)
    s = rng.integers(0, 9, n)
    p = np.where(s > 0, np.maximum(rng.integers(1, budget + 1, n), s), 0)
    c = np.where(s > 0, p / np.maximum(s, 1) * rng.uniform(1.0, 6.0, n), 0.0)
    d = np.where((d == 0) & (s == 0), 1, d)
    kv = rng.uniform(16, max_context, n)
    return d, kv, p, s, c


def _table_errors(model, engine, max_context=32_000, n=1500):
    table = steptable.StepTable(model, engine, max_context=max_context)
    d, kv, p, s, c = _random_shapes(np.random.default_rng(0), n, engine.seats,
                                    engine.max_num_batched_tokens, max_context)
    direct = steptable.step_ms(model, engine, d, kv, p, s, c)
    fast = np.array([table(int(a), float(b), int(x), int(y), float(z))
                     for a, b, x, y, z in zip(d, kv, p, s, c, strict=True)])
    return np.abs(fast / direct - 1.0)


@pytest.mark.parametrize("model,tp", [(ROOFLINE_8B, 1), (ROOFLINE_70B, 4)], ids=["8b", "70b"])
@pytest.mark.parametrize("seqs,spec", [(64, None), (1024, None), (256, NGRAM3)])
def test_step_table_matches_the_step_model_on_random_batches(model, tp, seqs, spec):
    engine = serving.EngineConfig(kv_blocks=10_000, max_num_seqs=seqs, tp=tp, speculation=spec)
    err = _table_errors(model, engine)
    assert np.percentile(err, 99) < 0.02
    assert err.max() < 0.05


def test_step_table_matches_the_calibrated_step_model():
    model = _real_step_model()
    err = _table_errors(model, serving.EngineConfig(kv_blocks=10_000, max_num_seqs=256), n=800)
    assert np.percentile(err, 99) < 0.02
    assert err.max() < 0.05


def test_step_table_is_exact_on_its_grid_points_and_fills_lazily():
    engine = serving.EngineConfig(kv_blocks=10_000, max_num_seqs=64)
    table = steptable.StepTable(ROOFLINE_8B, engine, max_context=4096)
    kv = table.kv_axis[5]
    assert table(17, kv, 0, 0, 0.0) == pytest.approx(
        float(steptable.step_ms(ROOFLINE_8B, engine, 17, kv, 0, 0, 0.0)), rel=1e-12)
    before = table.evaluations
    table(17, kv + 1.0, 0, 0, 0.0)
    assert table.evaluations == before  # same rows, nothing new to price
    full_grid = (len(table.d_axis) * len(table.p_axis) * len(table.s_axis) * len(table.u_axis))
    table(30, 1000.0, 512, 1, 512.0)
    assert table.evaluations < full_grid / 10


def test_repeated_runs_share_their_step_tables():
    w = serving.sample_requests(np.random.default_rng(0), requests=200,
                                prompt_tokens=serving.Lognormal(mean=800, p90=1400),
                                output_tokens=serving.Fixed(tokens=50),
                                arrivals=serving.Poisson(rate_per_s=10.0))
    cluster = serving.Cluster(pool=serving.Pool(engine=serving.EngineConfig(kv_blocks=9000)))
    tables = {}
    first = serving.simulate(cluster, w, ROOFLINE_8B, np.random.default_rng(0), tables=tables)
    second = serving.simulate(cluster, w, ROOFLINE_8B, np.random.default_rng(0), tables=tables)
    assert len(tables) == 1
    assert second.step_evaluations == first.step_evaluations  # the same table, no new shapes
    np.testing.assert_array_equal(first.finish_ms, second.finish_ms)


SCENARIOS = {
    "poisson": (serving.Poisson(rate_per_s=25.0), None, 20_000),
    "closed loop": (serving.ClosedLoop(concurrency=48), None, 20_000),
    "KV-bound, preempting": (serving.ClosedLoop(concurrency=48), None, 1500),
    "speculative": (serving.Poisson(rate_per_s=20.0), NGRAM3, 20_000),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_fast_runs_agree_with_the_reference_within_a_few_percent(name):
    arrivals, spec, kv = SCENARIOS[name]
    w = serving.sample_requests(np.random.default_rng(3), requests=500,
                                prompt_tokens=serving.Lognormal(mean=1000, p90=1600),
                                output_tokens=serving.Lognormal(mean=200, p90=350),
                                arrivals=arrivals)
    cluster = serving.Cluster(pool=serving.Pool(engine=serving.EngineConfig(
        kv_blocks=kv, max_num_seqs=64, speculation=spec)))
    ref = serving.simulate(cluster, w, ROOFLINE_8B, np.random.default_rng(1),
                           method=serving.Method.REFERENCE).summary()
    fast = serving.simulate(cluster, w, ROOFLINE_8B, np.random.default_rng(1)).summary()
    for metric in ("ttft_ms", "tpot_ms", "e2e_ms"):
        for q in ("p50", "p90", "p99"):
            # With speculation a shifted step reorders which request draws which acceptances,
            # so the tail of a 500-request run moves more than the table's own error.
            tol = 0.08 if spec is not None and q == "p99" else 0.03
            got, want = getattr(getattr(fast, metric), q), getattr(getattr(ref, metric), q)
            assert got == pytest.approx(want, rel=tol), (metric, q)
    assert fast.requests_per_s == pytest.approx(ref.requests_per_s, rel=0.02)


def test_fast_runs_agree_with_direct_calls_on_the_calibrated_step_model():
    model = _real_step_model()
    w = serving.sample_requests(np.random.default_rng(4), requests=400,
                                prompt_tokens=serving.Lognormal(mean=1000, p90=1600),
                                output_tokens=serving.Lognormal(mean=150, p90=260),
                                arrivals=serving.Poisson(rate_per_s=12.0))
    cluster = serving.Cluster(pool=serving.Pool(engine=serving.engine_config(
        model, max_num_seqs=64)))
    exact = serving.simulate(cluster, w, model, np.random.default_rng(0),
                             method=serving.Method.EXACT).summary()
    fast = serving.simulate(cluster, w, model, np.random.default_rng(0)).summary()
    for metric in ("ttft_ms", "tpot_ms", "e2e_ms"):
        for q in ("p50", "p90", "p99"):
            got, want = getattr(getattr(fast, metric), q), getattr(getattr(exact, metric), q)
            assert got == pytest.approx(want, rel=0.03), (metric, q)


def test_drafting_is_priced_by_the_perf_layer_and_only_in_steps_that_decode():
    model = _real_step_model()
    eagle = serving.Speculation(config=SpecConfig(method=SpecMethod.EAGLE3, k=3),
                                acceptance=0.7)
    plain = serving.EngineConfig(kv_blocks=10_000, max_num_seqs=64)
    spec = serving.EngineConfig(kv_blocks=10_000, max_num_seqs=64, speculation=eagle)
    verify = float(model.step(tp=1, dp=1, ep=False, pp=1, dec_seqs=8.0, dec_kv=2000.0,
                              q=4.0).total)
    with_drafts = float(steptable.step_ms(model, spec, 8, 2000.0, 0, 0, 0.0))
    assert with_drafts > verify > float(steptable.step_ms(model, plain, 8, 2000.0, 0, 0, 0.0))
    prefill_only = (spec, 0, 0.0, 1024, 1, 1024.0)
    assert float(steptable.step_ms(model, *prefill_only)) == pytest.approx(
        float(steptable.step_ms(model, plain, 0, 0.0, 1024, 1, 1024.0)))
    err = _table_errors(model, spec, n=400)
    assert np.percentile(err, 99) < 0.02



@pytest.mark.parametrize("spec", [None, NGRAM3])
def test_a_decode_cursor_prices_each_step_to_the_bit_as_one_call_would(spec):
    engine = serving.EngineConfig(kv_blocks=4000, max_num_seqs=64, speculation=spec)
    table = steptable.StepTable(ROOFLINE_8B, engine, max_context=20_000)
    rng = np.random.default_rng(5)
    for d in (1, 7, 33, 64):
        # Increasing as in a decode run, from below the grid's second point to past its end
        # (extrapolated), with exact grid points among them; then one step back.
        kv = np.sort(np.concatenate([table.kv_axis[:6], rng.uniform(1.0, 30_000, 300)]))
        at = table.decode_cursor(d)
        for x in [*kv.tolist(), 50.0]:
            assert at(x) == table(d, x, 0, 0, 0.0)
    direct = steptable.DirectPricer(ROOFLINE_8B, engine)
    assert direct.decode_cursor(3)(900.0) == direct(3, 900.0, 0, 0, 0.0)
