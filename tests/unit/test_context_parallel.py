"""Decode context parallelism: the perf model, the engines that run it, its flags, the search."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trilemma.optimizer import render
from trilemma.optimizer.catalog import Engine, KvDtype, QuantRecipe, gpus, models
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.perf import context_parallel, memory, steps
from trilemma.optimizer.perf import engine as perf_engine
from trilemma.optimizer.search import space
from trilemma.optimizer.search.configs import ServingConfig, WorkerConfig
from trilemma.optimizer.serving import engine_config
from trilemma.optimizer.spec import load_spec

CASES = Path(__file__).parent / "fixtures" / "search"
DSV3 = "deepseek-ai/DeepSeek-V3"
LAYOUT = {"tp": 8, "dp": 1, "ep": False, "pp": 1}


@pytest.fixture(scope="module")
def dsv3() -> steps.StepModel:
    return steps.StepModel(models.load_model(DSV3), gpus.get_gpu("h100_sxm"), QuantRecipe.FP8,
                           KvDtype.FP8, perf_engine.engine_facts())


def test_kv_per_gpu_falls_by_cp_and_more_sequences_fit() -> None:
    arch, gpu = models.load_model(DSV3), gpus.get_gpu("h100_sxm")
    per_token = [float(memory.kv_bytes_per_token_per_gpu(arch, KvDtype.FP8, 8, 2, cp))
                 for cp in (1, 2, 4, 8)]
    assert per_token == pytest.approx([per_token[0] / cp for cp in (1, 2, 4, 8)])
    fit = [float(memory.breakdown(arch, gpu, QuantRecipe.FP8, KvDtype.FP8,
                                  perf_engine.engine_facts(), tp=8, pp=2, dp=1,
                                  seq_len=128_000, max_batched_tokens=8192,
                                  max_num_seqs=256, cp=cp).max_seqs) for cp in (1, 8)]
    # Weights and activations are those of TP8 either way: only the KV is sharded.
    assert fit[1] >= 8 * fit[0] > 0


def test_decode_step_falls_for_long_contexts_and_pays_collectives(dsv3) -> None:
    base = dsv3.step(**LAYOUT, dec_seqs=64, dec_kv=64_000)
    dcp = dsv3.step(**LAYOUT, dec_seqs=64, dec_kv=64_000, cp=4)
    assert float(dcp.total) < float(base.total)
    assert float(dcp.attention) < float(base.attention) / 2
    assert float(dcp.comm) > float(base.comm) > 0


def test_short_contexts_lose_below_the_threshold_the_search_uses(dsv3) -> None:
    ctx = context_parallel.LONG_PROMPT_TOKENS / 4
    base = float(dsv3.step(**LAYOUT, dec_seqs=64, dec_kv=ctx).total)
    assert all(float(dsv3.step(**LAYOUT, dec_seqs=64, dec_kv=ctx, cp=cp).total) > base
               for cp in (2, 4, 8))


def test_mla_prefill_gathers_the_cached_context_from_the_shards(dsv3) -> None:
    chunk = {"dec_seqs": 0.0, "dec_kv": 0.0, "pf_tokens": 4000, "pf_seqs": 1}
    cold = dsv3.step(**LAYOUT, **chunk, pf_kv=4000, cp=8)
    warm = dsv3.step(**LAYOUT, **chunk, pf_kv=120_000, cp=8)
    base = dsv3.step(**LAYOUT, **chunk, pf_kv=120_000)
    assert float(warm.comm) - float(base.comm) > float(cold.comm) - float(dsv3.step(
        **LAYOUT, **chunk, pf_kv=4000).comm) >= 0
    # Prefill attention itself is not split by DCP: the gather only adds.
    assert float(warm.attention) == pytest.approx(float(base.attention))


def test_engines_run_dcp_only_where_their_pinned_release_does() -> None:
    dsv3 = models.load_model(DSV3)
    llama70 = models.load_model("meta-llama/Llama-3.1-70B")     # 8 KV heads
    llama405 = models.load_model("meta-llama/Llama-3.1-405B")   # 8 KV heads, 128 heads
    gpt_oss = models.load_model("openai/gpt-oss-120b")          # sliding-window layers
    tp, cp = np.array([8, 8, 8, 4]), np.array([1, 2, 8, 8])
    assert context_parallel.feasible(dsv3, Engine.VLLM, tp, cp).tolist() == [
        True, True, True, False]
    assert context_parallel.feasible(dsv3, Engine.SGLANG, tp, cp).tolist() == [
        True, False, False, False]
    assert not context_parallel.feasible(llama70, Engine.VLLM, 8, 2)
    assert context_parallel.feasible(llama405, Engine.VLLM, 16, 2)
    assert not context_parallel.feasible(llama405, Engine.VLLM, 16, 4)
    assert not context_parallel.feasible(gpt_oss, Engine.VLLM, 8, 2)


def _config(engine: Engine = Engine.VLLM, **worker) -> ServingConfig:
    return ServingConfig(model=DSV3, engine=engine,
                         worker=WorkerConfig(gpu="h200_sxm", quant=QuantRecipe.FP8, **worker))


def test_vllm_renders_its_dcp_flag_and_nothing_without_cp() -> None:
    argv = render.engine_args(_config(tp=8, cp=4), "vllm")
    assert argv[argv.index("--decode-context-parallel-size") + 1] == "4"
    assert argv[argv.index("--tensor-parallel-size") + 1] == "8"
    plain = render.engine_args(_config(tp=8), "vllm")
    assert not any("context-parallel" in a or a in ("-dcp", "-pcp") for a in plain)
    assert "--decode-context-parallel-size" in render.decided_flags(_config(tp=8), "vllm")


def test_no_flag_is_invented_for_an_engine_or_layout_without_it() -> None:
    with pytest.raises(InputError) as err:
        render.engine_args(_config(Engine.SGLANG, tp=8, cp=2), "sglang")
    assert err.value.field == "cp"
    with pytest.raises(InputError, match="divide"):
        render.engine_args(_config(tp=4, cp=8), "vllm")
    argv = render.engine_args(_config(Engine.SGLANG, tp=8), "sglang")
    assert not any("cp" in a or "context-parallel" in a for a in argv)


def test_cp_1_keeps_the_canonical_json_and_hash_of_existing_plans() -> None:
    plain = _config(tp=8)
    assert "cp" not in plain.to_dict()["worker"]
    assert plain.config_hash() == ServingConfig.from_dict(plain.to_dict()).config_hash()
    sharded = _config(tp=8, cp=2)
    assert sharded.to_dict()["worker"]["cp"] == 2
    assert ServingConfig.from_dict(sharded.to_dict()) == sharded
    assert sharded.config_hash() != plain.config_hash()
    assert "DCP2" in sharded.summary()


def test_simulator_engine_holds_cp_times_the_tokens() -> None:
    sm = steps.StepModel(models.load_model(DSV3), gpus.get_gpu("h200_sxm"), QuantRecipe.FP8,
                         KvDtype.FP8, perf_engine.engine_facts())
    one, four = (engine_config(sm, tp=8, cp=cp) for cp in (1, 4))
    assert four.block_size == 4 * one.block_size and four.cp == 4
    tokens = [e.kv_blocks * e.block_size for e in (one, four)]
    assert tokens[1] == pytest.approx(4 * tokens[0], rel=0.01)


def test_search_considers_cp_for_long_prompts_only_and_counts_it(tmp_path: Path) -> None:
    both = tmp_path / "both.yaml"
    both.write_text((CASES / "code_completion.yaml").read_text()
                    + "bounds:\n  engines: [vllm, sglang]\n")
    long = space.enumerate_space(load_spec(both), space.SearchSettings())
    cps = {int(c) for r in long.rows for c in r.cp}
    assert cps > {1}
    engines = {r.group.engine for r in long.rows}
    assert engines == {Engine.VLLM, Engine.SGLANG}
    assert all((r.cp == 1).all() for r in long.rows if r.group.engine is Engine.SGLANG)
    assert all((r.tp % r.cp == 0).all() for r in long.rows)
    kept = sum(len(r) for r in long.rows) * long.modes * long.replica_options
    assert kept + sum(long.pruned.values()) == long.enumerated
    without = space.enumerate_space(load_spec(both), space.SearchSettings(cp=(1,)))
    assert long.enumerated == 4 * without.enumerated
    short = space.enumerate_space(load_spec(CASES / "chatbot.yaml"), space.SearchSettings())
    assert all((r.cp == 1).all() for r in short.rows)
