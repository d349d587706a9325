import numpy as np
import pytest

from trilemma.optimizer.catalog.speculation import SpecConfig, SpecMethod
from trilemma.optimizer.perf import estimate as est
from trilemma.optimizer.perf import latency

LLAMA70 = "meta-llama/Llama-3.1-70B"


def _loop(conc, isl=1024, osl=256, tp=4, cached=0.0, **kw):
    cfg = est.resolve(model=LLAMA70, gpu="h100_sxm", tp=tp, quant="fp8")
    return latency.closed_loop(est.step_model(cfg), tp=tp, pp=1, dp=1, ep=False,
                               concurrency=np.asarray(conc, dtype=float),
                               prompt_tokens=isl, output_tokens=osl, cached_tokens=cached, **kw)


def test_at_concurrency_one_ttft_is_the_prefill_plus_fixed_overheads():
    cfg = est.resolve(model=LLAMA70, gpu="h100_sxm", tp=4, quant="fp8")
    r = _loop(1)
    prefill = est.prefill_ms(cfg, batch=1, prompt_tokens=1024)
    overhead = est.step_model(cfg).facts.request_overhead_ms
    assert prefill + overhead < float(r.ttft_ms) < prefill + overhead + float(r.tpot_ms) * 2


def test_more_concurrency_raises_throughput_and_latency_together():
    r = _loop([1, 4, 16, 64, 256])
    assert np.all(np.diff(r.output_tokens_per_s) > 0)
    assert np.all(np.diff(r.tpot_ms) > 0)
    assert np.all(np.diff(r.ttft_ms) > 0)


def test_throughput_saturates_once_the_batch_is_full():
    r = _loop([256, 4096], max_num_seqs=256)
    # Extra clients only queue: the same tokens per second, a much longer TTFT.
    assert float(r.output_tokens_per_s[1]) == pytest.approx(float(r.output_tokens_per_s[0]),
                                                            rel=0.02)
    assert float(r.ttft_ms[1]) > 5 * float(r.ttft_ms[0])


def test_a_cached_prefix_cuts_ttft():
    cold = _loop(8, isl=8192)
    warm = _loop(8, isl=8192, cached=7168)
    assert float(warm.ttft_ms) < 0.5 * float(cold.ttft_ms)


def test_littles_law_ties_rate_latency_and_concurrency():
    r = _loop(np.array([8.0, 64.0]))
    in_flight = r.requests_per_s * (r.e2e_ms / 1e3)
    np.testing.assert_allclose(in_flight, [8.0, 64.0], rtol=0.1)


def test_speculation_shortens_tpot_at_low_concurrency_for_predictable_output():
    plain = _loop(1, osl=512)
    spec = _loop(1, osl=512, spec=SpecConfig(method=SpecMethod.EAGLE3, k=3),
                 output_predictability=0.9)
    assert float(spec.tokens_per_step) > 2.0
    assert float(spec.tpot_ms) < 0.7 * float(plain.tpot_ms)


def test_speculation_gains_shrink_at_high_concurrency():
    def gain(conc):
        plain = _loop(conc, osl=512)
        spec = _loop(conc, osl=512, spec=SpecConfig(method=SpecMethod.EAGLE3, k=3))
        return float(plain.tpot_ms / spec.tpot_ms)

    assert gain(256) < gain(1)


def test_a_config_that_does_not_fit_is_reported_not_raised():
    r = _loop(4, tp=1, isl=131072, osl=1024)
    assert not bool(r.fits)


@pytest.mark.parametrize("pp", [1, 2])
def test_pipeline_parallel_layouts_predict_finite_positive_latencies(pp):
    cfg = est.resolve(model=LLAMA70, gpu="h100_sxm", tp=2, pp=pp, quant="fp8")
    e = est.closed_loop(cfg, concurrency=32, prompt_tokens=2048, output_tokens=256)
    assert e.fits and 0 < e.tpot_ms < 1000 and 0 < e.ttft_ms < 1e5


def _engine_loop(engine, conc, osl):
    cfg = est.resolve(model=LLAMA70, gpu="h100_sxm", tp=4, quant="fp8", engine=engine)
    return latency.closed_loop(est.step_model(cfg), tp=4, pp=1, dp=1, ep=False,
                               concurrency=float(conc), prompt_tokens=2048,
                               output_tokens=np.asarray(osl, dtype=float))


def test_a_prefill_first_engine_moves_in_waves():
    # SGLang prefills a whole wave before decoding it: at 64 clients its TTFT holds about half
    # the wave's prefill (several chunks), where vLLM's chunked prefill rides beside decodes.
    sglang, vllm = _engine_loop("sglang", 64, 256), _engine_loop("vllm", 64, 256)
    assert float(sglang.ttft_ms) > 2.0 * float(vllm.ttft_ms)
    chunks = np.ceil(64 * 2048 / 8192)
    assert float(sglang.ttft_ms) > float(sglang.mixed_step_ms) * (chunks + 1.0) / 2.0


def test_a_prefill_first_tpot_carries_the_stall_of_the_chunks_after_it():
    # The chunks after a request's own stall its decode; a longer output dilutes the stall,
    # down to the pure decode step.
    r = _engine_loop("sglang", 64, [128, 512, 4096])
    assert np.all(np.diff(r.tpot_ms) < 0)
    assert float(r.tpot_ms[-1]) == pytest.approx(float(r.decode_step_ms[-1]), rel=0.1)


def test_vllm_keeps_sequences_resident_at_their_current_length():
    # vLLM's paged cache holds a running sequence at its current length, isl + osl/2 on
    # average in a closed loop: a load that fits that way does not queue although it would
    # not fit at the full length (Llama-70B fp8 on two H100s, 1024/8192: ~24 at full length).
    cfg = est.resolve(model=LLAMA70, gpu="h100_sxm", tp=2, quant="fp8")
    r = latency.closed_loop(est.step_model(cfg), tp=2, pp=1, dp=1, ep=False,
                            concurrency=np.array([16.0, 32.0]), prompt_tokens=1024,
                            output_tokens=8192)
    assert float(r.memory.max_seqs[1]) < 32
    assert float(r.running[1]) > float(r.memory.max_seqs[1])
    assert float(r.ttft_ms[1]) < 3.0 * float(r.ttft_ms[0])


def test_a_prefill_first_engine_still_reserves_the_full_length():
    cfg = est.resolve(model=LLAMA70, gpu="h100_sxm", tp=2, quant="fp8", engine="sglang")
    r = latency.closed_loop(est.step_model(cfg), tp=2, pp=1, dp=1, ep=False, concurrency=32.0,
                            prompt_tokens=1024, output_tokens=8192)
    assert float(r.running) <= float(r.memory.max_seqs)


def test_a_dp_rank_prefills_alone_but_its_decodes_wait_for_every_rank():
    # vLLM attention DP (perf/dp_lockstep.py): a steady-state prefill chunk is one rank's, so
    # the MoE layers do not see it dp times; the ranks' MoE lockstep stretches decode steps.
    cfg = est.resolve(model="MiniMaxAI/MiniMax-M2.5", gpu="h100_sxm", tp=4, dp=4, ep=True,
                      quant="fp8")
    sm = est.step_model(cfg)
    kw = dict(tp=4, dp=4, ep=True, pp=1, dec_seqs=4.0, dec_kv=1536.0, pf_tokens=1024.0,
              pf_seqs=1.0, pf_kv=1024.0)
    assert float(sm.step(**kw, pf_ranks=1.0).moe) < 0.6 * float(sm.step(**kw).moe)
    from trilemma.optimizer.perf import dp_lockstep
    share = np.array([0.1])
    assert float(dp_lockstep.stretched_share(share, np.array([4.0]), True)[0]) == \
        pytest.approx(1 - 0.9**4)
    assert float(dp_lockstep.stretched_share(share, np.array([4.0]), False)[0]) == 0.1


def test_a_longer_prompt_pays_more_api_server_time_before_its_prefill():
    # engine.yaml request_overhead_per_prompt_token_us: tokenization and input processing
    # grow with the prompt; at concurrency 1 TTFT is that overhead plus the prefill.
    import dataclasses
    cfg = est.resolve(model=LLAMA70, gpu="h100_sxm", tp=4, quant="fp8")
    sm = est.step_model(cfg)
    flat = est.StepModel(cfg.arch, cfg.gpu, cfg.quant, cfg.kv, dataclasses.replace(
        sm.facts, request_overhead_per_prompt_token_us=0.0))
    per_token = sm.facts.request_overhead_per_prompt_token_us
    assert per_token > 0

    def ttft(model, isl):
        return float(latency.closed_loop(model, tp=4, pp=1, dp=1, ep=False, concurrency=1.0,
                                         prompt_tokens=isl, output_tokens=64).ttft_ms)

    for isl in (1024.0, 8192.0):
        assert ttft(sm, isl) - ttft(flat, isl) == pytest.approx(per_token * 1e-3 * isl,
                                                                rel=0.05)
