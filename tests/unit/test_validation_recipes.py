"""Rows modelled with the launch flags of the benchmark script their provenance names."""

from __future__ import annotations

import numpy as np

from trilemma.optimizer import validation, validation_recipes, validation_sim
from trilemma.optimizer.catalog.quantization import KvDtype
from trilemma.optimizer.perf import estimate, memory
from trilemma.optimizer.perf.engine import Engine, engine_facts

_SOURCE = ("source_file=2026-03-25.csv; model=DeepSeek-R1; silicon_concurrency=32; "
           "measured={when}; wip=False; image={image}")


def _row(*, tp: int = 4, when: str = "2026-03-25T16:34:14Z",
         image: str = "lmsysorg/sglang:v0.5.9-cu130", model: str = "deepseek-ai/DeepSeek-R1",
         precision: str = "fp8", conc: int = 32) -> dict[str, str]:
    return {"id": f"dsr1_fp8_tp{tp}_c{conc}", "backend": "sglang", "system": "b200_sxm",
            "model_path": model, "precision": precision, "gemm_quant_mode": "fp8",
            "moe_quant_mode": "fp8", "mode": "agg", "isl": "8192", "osl": "1024",
            "batch_size": str(conc), "tp_size": str(tp), "pp_size": "1",
            "attention_dp_size": "1", "moe_tp_size": str(tp), "moe_ep_size": "1",
            "silicon_data_source": _SOURCE.format(when=when, image=image),
            "silicon_ttft_ms": "1000", "silicon_tpot_ms": "20"}


def test_script_branch_by_tp() -> None:
    # dsr1_fp8_b200.sh @ 12ba0ae07: TP4 gets 0.95 of memory and 32 running, TP8 0.82 and 128.
    tp4 = validation_recipes.recipe(_row(tp=4), gpus=4, conc=32)
    tp8 = validation_recipes.recipe(_row(tp=8), gpus=8, conc=32)
    assert tp4 is not None and tp8 is not None
    assert (tp4.kv, tp4.mem_fraction_static, tp4.max_running_requests,
            tp4.chunked_prefill_size) == (KvDtype.FP8, 0.95, 32, 8192)
    assert (tp8.mem_fraction_static, tp8.max_running_requests,
            tp8.chunked_prefill_size) == (0.82, 128, 32768)
    assert "SemiAnalysisAI/InferenceX/benchmarks/single_node/dsr1_fp8_b200.sh" in tp4.source


def test_unmapped_rows_keep_defaults() -> None:
    # An image the config never named, a time outside every window, a layout the script
    # refuses (TP2), and no measured time at all: no recipe.
    assert validation_recipes.recipe(_row(image="lmsysorg/sglang:v0.5.7"), gpus=4,
                                     conc=32) is None
    assert validation_recipes.recipe(_row(when="2026-05-01T00:00:00Z"), gpus=4,
                                     conc=32) is None
    assert validation_recipes.recipe(_row(tp=2), gpus=2, conc=32) is None
    bare = _row()
    bare["silicon_data_source"] = "source_file=gap.csv; silicon_concurrency=32"
    assert validation_recipes.recipe(bare, gpus=4, conc=32) is None


def test_date_only_row_across_a_script_change_is_ambiguous() -> None:
    # qwen3.5_bf16_b200.sh changed at 2026-02-20T05:32Z (0.8 memory -> 0.82, 32k chunks):
    # a row dated that day only could be either; one timed after the change is not.
    qwen = dict(model="Qwen/Qwen3.5-397B-A17B", precision="bf16", tp=8,
                image="lmsysorg/sglang:nightly-dev-20260216-d3bae71e")
    assert validation_recipes.recipe(_row(when="2026-02-20T00:00:00.000Z", **qwen),
                                     gpus=8, conc=32) is None
    timed = validation_recipes.recipe(_row(when="2026-02-20T05:32:41Z", **qwen),
                                      gpus=8, conc=32)
    assert timed is not None and timed.cuda_graph_max_bs == 32  # "conc" resolved


def test_copy_takes_the_recipe_of_the_same_run() -> None:
    mapped = _row()
    copy = _row()
    copy["silicon_data_source"] = "source_file=gap.csv; silicon_concurrency=32"
    out = validation_recipes.recipes_for([mapped, copy], [4, 4], [32, 32])
    assert out[0] is not None and out[1] == out[0]


def test_mean_lengths_of_the_client_draw() -> None:
    # The recipe's row ran InferenceMAX's client: uniform on [int(0.8 x 1024), 1024].
    client = validation_sim.client_for(_row())
    assert client.mean_length(1024) == (819 + 1024) / 2


def test_recipe_flags_give_the_kv_room_the_run_had() -> None:
    # The mechanism: the script's fp8 KV cache and 0.95 memory fraction, through the same
    # memory model a deployment uses, hold the 32 sequences of 9k tokens that the defaults
    # (bf16 KV, 0.9) cannot.
    launch = validation_recipes.recipe(_row(), gpus=4, conc=32)
    assert launch is not None
    facts = engine_facts(Engine.SGLANG)

    def seats(kv: KvDtype, util_facts: object) -> float:
        cfg = estimate.resolve(model="deepseek-ai/DeepSeek-R1", gpu="b200_sxm", tp=4,
                               quant="fp8", kv_dtype=kv.value, engine="sglang")
        m = memory.breakdown(cfg.arch, cfg.gpu, cfg.quant, cfg.kv, util_facts, tp=4, pp=1,
                             dp=1, seq_len=np.float64(9216), max_batched_tokens=8192,
                             max_num_seqs=32)
        return float(m.max_seqs)

    assert seats(KvDtype.BF16, facts) < 32 <= seats(launch.kv, launch.facts(facts))
    row = validation.predict_rows([_row()])[0]
    assert row.recipe is not None and "--mem-fraction-static 0.95" in row.recipe


def test_vllm_script_values_from_the_run() -> None:
    # minimaxm2.5_fp8_b200.sh in PR #947 (vLLM 0.19): --max-num-batched-tokens $((ISL * 2)),
    # --block-size 32, --kv-cache-dtype fp8, --gpu-memory-utilization 0.90.
    row = _row(model="MiniMaxAI/MiniMax-M2.5", tp=2, when="2026-04-03T02:34:55Z",
               image="vllm/vllm-openai:v0.19.0-cu130")
    row["backend"] = "vllm"
    launch = validation_recipes.recipe(row, gpus=2, conc=32)
    assert launch is not None
    assert (launch.chunked_prefill_size, launch.block_size, launch.kv,
            launch.mem_fraction_static) == (2 * 8192, 32, KvDtype.FP8, 0.90)
    facts = launch.facts(engine_facts(Engine.VLLM))
    assert (facts.block_size, facts.gpu_memory_utilization) == (32, 0.90)


def test_mtp_recipe_models_speculation() -> None:
    # The 2026-03-20 Qwen3.5 FP8 rows naming v0.5.9-cu130 are qwen3.5_fp8_b200_mtp.sh
    # (EAGLE on the MTP layer, 3 steps): modelled with it, they predict a faster decode than
    # the same run under the plain script of 2026-03-24 (same fp8 KV and chunk, no MTP).
    row = _row(model="Qwen/Qwen3.5-397B-A17B", when="2026-03-20T22:08:19Z", tp=4)
    row.update(isl="1024", osl="1024")
    launch = validation_recipes.recipe(row, gpus=4, conc=32)
    assert launch is not None and launch.speculative == "mtp:3"
    later = _row(model="Qwen/Qwen3.5-397B-A17B", when="2026-03-24T00:52:21Z", tp=4,
                 image="lmsysorg/sglang:v0.5.9-cu130-amd64")
    later.update(isl="1024", osl="1024")
    spec, plain = validation.predict_rows([row]), validation.predict_rows([later])
    assert plain[0].recipe and "speculative" not in plain[0].recipe
    assert spec[0].recipe and "speculative mtp:3" in spec[0].recipe
    assert spec[0].pred_tpot_ms is not None and plain[0].pred_tpot_ms is not None
    assert spec[0].pred_tpot_ms < plain[0].pred_tpot_ms


def test_every_recipe_cites_a_commit_and_a_script() -> None:
    repo, entries = validation_recipes._recipes()
    assert repo == "SemiAnalysisAI/InferenceX"
    for e in entries:
        assert e.start < e.until, e.name
        path, _, commit = e.source.partition("@")
        assert path.endswith(".sh") and len(commit) == 12, e.name
