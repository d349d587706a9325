"""Engine defaults the performance model reads per GPU (perf/engine.py, data/engine.yaml)."""

from __future__ import annotations

import pytest

from trilemma.optimizer.catalog import gpus
from trilemma.optimizer.perf import estimate, latency
from trilemma.optimizer.perf.engine import Engine, engine_facts


def test_sglang_prefills_16k_tokens_a_batch_on_b200_and_8k_below_160_gib():
    # ServerArgs.chunked_prefill_size: 8192 under 160 GiB (H100, H200), 16384 from B200 up.
    sglang = engine_facts(Engine.SGLANG)
    assert sglang.default_max_num_batched_tokens(gpus.get_gpu("b200_sxm")) == 16384
    assert sglang.default_max_num_batched_tokens(gpus.get_gpu("h200_sxm")) == 8192
    assert sglang.default_max_num_batched_tokens(gpus.get_gpu("h100_sxm")) == 8192


def test_the_sglang_budget_leaves_vllm_and_the_sequence_cap_alone():
    vllm, sglang = engine_facts(Engine.VLLM), engine_facts(Engine.SGLANG)
    for key in ("b200_sxm", "h100_sxm", "l40s"):
        gpu = gpus.get_gpu(key)
        assert sglang.default_max_num_seqs(gpu) == vllm.default_max_num_seqs(gpu)
    assert vllm.default_max_num_batched_tokens(gpus.get_gpu("b200_sxm")) == 8192


def test_a_b200_sglang_wave_of_16k_prompt_tokens_prefills_in_one_batch():
    # 16 prompts of 1024 tokens: one prefill batch on B200, so every first token comes at its
    # end; an 8192-token budget would have split it in two and let half the wave out earlier.
    cfg = estimate.resolve(model="deepseek-ai/DeepSeek-R1", gpu="b200_sxm", tp=8,
                           quant="fp8", engine="sglang")
    sm = estimate.step_model(cfg)
    kw = dict(tp=8, pp=1, dp=1, ep=False, concurrency=16.0, prompt_tokens=1024.0,
              output_tokens=1024.0)
    default = latency.closed_loop(sm, **kw)
    halved = latency.closed_loop(sm, max_batched_tokens=8192, **kw)
    overhead = sm.facts.request_overhead_ms
    assert float(default.ttft_ms) == pytest.approx(overhead + float(default.mixed_step_ms))
    assert float(halved.ttft_ms) < float(default.ttft_ms)
