"""Gated DeltaNet and DSA-indexer pricing (perf/hybrid_layers.py) and their memory."""

import dataclasses

import numpy as np
import pytest

from trilemma.optimizer import serving
from trilemma.optimizer.catalog import gpus, models
from trilemma.optimizer.catalog.engines import Engine
from trilemma.optimizer.catalog.quantization import KvDtype
from trilemma.optimizer.perf import estimate as est
from trilemma.optimizer.perf import hybrid_layers, memory, steps
from trilemma.optimizer.perf.steps import StepModel

QWEN35 = "Qwen/Qwen3.5-397B-A17B"
GLM5 = "zhipuai/GLM-5"


def _sm(model, tp=8, quant="fp8", kv="bf16", engine="sglang", arch=None):
    cfg = est.resolve(model=model, gpu="b200_sxm", tp=tp, quant=quant, kv_dtype=kv,
                      engine=engine)
    if arch is None:
        return est.step_model(cfg)
    sm = est.step_model(cfg)
    return StepModel(arch, cfg.gpu, cfg.quant, cfg.kv, sm.facts)


def _attention(sm, tp, **kw):
    return float(sm.step(tp=tp, dp=1, ep=False, pp=1, **kw).attention)


def test_qwen35_has_15_full_attention_layers_and_45_linear_ones():
    counts = steps.layer_counts(models.load_model(QWEN35))
    assert (counts.full_attention, counts.linear_attention) == (15, 45)


def test_only_full_attention_layers_grow_with_the_decode_context():
    # Linear layers read a fixed state: the decode attention grows with context only through
    # the 15 full layers, a quarter of what 60 full layers would add.
    sm = _sm(QWEN35)
    growth = (_attention(sm, 8, dec_seqs=32.0, dec_kv=32768.0)
              - _attention(sm, 8, dec_seqs=32.0, dec_kv=2048.0))
    per_layer = (sm.km.decode_attention_ms(32.0, 32768.0, 4.0, 1.0, 256, "bf16")
                 - sm.km.decode_attention_ms(32.0, 2048.0, 4.0, 1.0, 256, "bf16"))
    assert growth == pytest.approx(15 * float(per_layer), rel=1e-6)


def test_linear_layer_decode_is_bound_by_its_state():
    arch = models.load_model(QWEN35)
    sm = _sm(QWEN35)
    tp = np.float64(8.0)
    one, many = (hybrid_layers.gdn_core_ms(sm.km, sm.gpu, arch, tp, np.float64(0.0),
                                           np.float64(n), 0.0) for n in (1.0, 101.0))
    la = arch.linear_attention
    state = 2 * (la.num_value_heads / 8) * la.key_head_dim * la.value_head_dim * 4.0
    # 100 more sequences move at least 100 states in and out.
    assert float(many - one) * 1e-3 * sm.gpu.memory_bw >= 100 * state


def test_gated_attention_doubles_the_query_projection():
    arch = models.load_model(QWEN35)
    gated = _sm(QWEN35)
    plain = _sm(QWEN35, arch=dataclasses.replace(arch, attention_output_gate=False))
    tokens, tp = np.float64(4096.0), np.float64(8.0)
    assert float(gated._attention_gemms(tokens, tp)) > float(plain._attention_gemms(tokens, tp))


def test_dsa_decode_attention_stops_growing_past_topk_except_for_the_index_scan():
    sm = _sm(GLM5)
    arch = sm.arch
    assert hybrid_layers.sparse_window(arch) == 2048
    short, long = (_attention(sm, 8, dec_seqs=16.0, dec_kv=n) for n in (8192.0, 65536.0))
    scan = [float(hybrid_layers.indexer_core_ms(
        sm.km, sm.gpu, arch, pf_tokens=np.float64(0.0), pf_keys=np.float64(0.0),
        pf_scored=np.bool_(False), dec_seqs=np.float64(16.0), dec_kv=np.float64(n),
        launch_ms=0.0)) for n in (8192, 65536)]
    assert long - short == pytest.approx(arch.num_layers * (scan[1] - scan[0]), rel=1e-6)


def test_the_indexer_adds_its_replicated_projections_to_every_layer():
    arch = models.load_model(GLM5)
    with_ix = _sm(GLM5, arch=arch)
    without = _sm(GLM5, arch=dataclasses.replace(arch, indexer=None))
    kw = dict(tp=8.0, dp=1, ep=False, pp=1, dec_seqs=8.0, dec_kv=1024.0)
    extra = float(with_ix.step(**kw).gemm - without.step(**kw).gemm)
    per_layer = hybrid_layers.indexer_gemms_ms(with_ix.km, with_ix.attn_kernel, arch,
                                               np.float64(8.0), np.float64(8.0))
    assert extra == pytest.approx(arch.num_layers * float(per_layer), rel=1e-6)


def test_a_prefill_within_the_topk_only_caches_index_keys():
    # SGLang skips the indexer's scoring when every key would be kept anyway: a 2048-token
    # prompt pays wk and the key-only kernels; a 4096-token one pays queries and logits too.
    sm = _sm(GLM5)
    arch = sm.arch
    no_ix = _sm(GLM5, arch=dataclasses.replace(arch, indexer=None))

    def extra(prompt):
        kw = dict(tp=8.0, dp=1, ep=False, pp=1, dec_seqs=0.0, dec_kv=0.0, pf_tokens=prompt,
                  pf_seqs=1.0, pf_kv=prompt)
        a, b = sm.step(**kw), no_ix.step(**kw)
        return float(a.gemm - b.gemm), float(a.attention - b.attention)

    assert not hybrid_layers.scores(arch, np.float64(2048.0), Engine.SGLANG)
    assert hybrid_layers.scores(arch, np.float64(2049.0), Engine.SGLANG)
    assert hybrid_layers.scores(arch, np.float64(2048.0), Engine.VLLM)  # no such skip
    gemm, core = extra(2048.0)
    key_only = sm.km.gemm_ms(sm.attn_kernel, 2048.0, arch.indexer.head_dim, arch.hidden_size)
    assert gemm == pytest.approx(arch.num_layers * float(key_only), rel=1e-9)
    launch = sm.facts.kernel_launch_us / 1e3
    assert core == pytest.approx(
        arch.num_layers * hybrid_layers.INDEXER_K_ONLY_KERNELS * launch, rel=1e-9)
    long_gemm, long_core = extra(4096.0)
    assert long_gemm > 2.0 * gemm and long_core > 2.0 * core


def test_linear_layers_hold_no_kv_and_the_dsa_cache_holds_index_keys():
    qwen = models.load_model(QWEN35)
    per_token = float(memory.kv_bytes_per_token_per_gpu(qwen, KvDtype.BF16, 8.0, 1.0))
    assert per_token == 15 * 2 * 1 * 256 * 2  # 15 full layers, one KV head per rank
    glm = models.load_model(GLM5)
    per_layer = float(memory.per_layer_kv_bytes(glm, KvDtype.FP8, 8.0))
    assert per_layer == 512 + 64 + 128 + 4


def test_sglang_splits_the_free_memory_between_states_and_kv():
    rest, kv, state = np.float64(190.0), np.float64(1.0), np.float64(0.5)
    pool = memory.state_pool_bytes(rest, state, 0.9)
    assert float(pool) == pytest.approx(90.0)  # 0.9 : 1
    # SGLang: 100 bytes of KV pool -> 100 sequences; vLLM's one pool: 190 / 1.5 -> 126.
    assert float(memory.seqs_that_fit(rest - pool, pool, kv, state)) == 100
    assert float(memory.state_pool_bytes(rest, state, None)) == 0.0
    assert float(memory.seqs_that_fit(rest, np.float64(0.0), kv, state)) == 126
    # No state (not a hybrid model): no pool is set aside.
    assert float(memory.state_pool_bytes(rest, np.float64(0.0), 0.9)) == 0.0


def test_the_recurrent_state_limits_sglang_sequences_of_a_hybrid_model():
    sm = _sm(QWEN35, tp=4)
    kw = dict(tp=4.0, pp=1.0, dp=1.0, seq_len=2048.0, max_batched_tokens=8192.0,
              max_num_seqs=1024.0)
    sglang = memory.breakdown(sm.arch, sm.gpu, sm.recipe, sm.kv, sm.facts, **kw)
    state = float(hybrid_layers.recurrent_state_bytes_per_gpu(sm.arch, np.float64(4.0)))
    assert state > 0
    assert float(sglang.state_pool) == pytest.approx(
        0.9 * float(sglang.kv_cache + sglang.state_pool) / 1.9)
    assert float(sglang.max_seqs) <= float(sglang.state_pool) / state


def test_sglang_runs_dsa_models_on_blackwell_with_an_fp8_kv_cache():
    glm, qwen = models.load_model(GLM5), models.load_model(QWEN35)
    b200, h100 = gpus.get_gpu("b200_sxm"), gpus.get_gpu("h100_sxm")
    pick = hybrid_layers.engine_kv_dtype
    assert pick(Engine.SGLANG, glm, b200, KvDtype.BF16) is KvDtype.FP8
    assert pick(Engine.SGLANG, glm, h100, KvDtype.BF16) is KvDtype.BF16
    assert pick(Engine.VLLM, glm, b200, KvDtype.BF16) is KvDtype.BF16
    assert pick(Engine.SGLANG, qwen, b200, KvDtype.BF16) is KvDtype.BF16


def test_linear_layer_prefill_is_linear_in_tokens_and_reads_no_prefix():
    # The chunked delta rule carries a state, not a cache: a cached prefix costs nothing and
    # twice the tokens cost about twice as much (attention's pairs would grow fourfold).
    sm = _sm(QWEN35)

    def linear_layers(tokens, context):
        return float(sm._hybrid_core(np.float64(8.0), np.float64(0.0), np.float64(0.0),
                                     np.float64(tokens), np.float64(1.0),
                                     np.float64(context)))

    short = linear_layers(8192.0, 8192.0)
    assert linear_layers(8192.0, 65536.0) == short
    assert 1.5 * short < linear_layers(16384.0, 16384.0) < 2.2 * short


def test_the_simulator_runs_no_more_requests_than_sglangs_state_slots() -> None:
    # Qwen3.5 fp8 on 4 B200s: SGLang's state pool holds fewer slots than its default
    # --max-running-requests, so the simulated engine is capped there, as SGLang caps it.
    cfg = est.resolve(model=QWEN35, gpu="b200_sxm", tp=4, pp=1, dp=1, ep=False,
                           quant="fp8", kv_dtype="bf16", engine="sglang")
    sm = est.step_model(cfg)
    f = sm.facts
    engine = serving.engine_config(sm, tp=4)
    mem = memory.breakdown(sm.arch, sm.gpu, sm.recipe, sm.kv, f, tp=4, pp=1, dp=1,
                           seq_len=f.block_size,
                           max_batched_tokens=engine.max_num_batched_tokens,
                           max_num_seqs=f.default_max_num_seqs(sm.gpu))
    slots = int(mem.max_seqs)
    assert slots < f.default_max_num_seqs(sm.gpu)
    assert engine.max_num_seqs == slots
