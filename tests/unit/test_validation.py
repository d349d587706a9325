"""`trilemma validate` on AIConfigurator-schema rows: how a row maps onto a configuration."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from trilemma.optimizer import validation
from trilemma.optimizer.catalog import models
from trilemma.optimizer.catalog.quantization import KvDtype
from trilemma.optimizer.perf import estimate, latency

DEV_CSV = (Path(__file__).resolve().parents[3] / "shared" / "data" / "validation"
           / "aic_silicon_sample_dev.csv")

DP_ROW = {
    "id": "dp2", "model_path": "MiniMaxAI/MiniMax-M2.5", "system": "b200_sxm",
    "backend": "vllm", "precision": "fp8", "gemm_quant_mode": "fp8", "isl": "1024",
    "osl": "1024", "batch_size": "32", "tp_size": "2", "pp_size": "1",
    "attention_dp_size": "2", "moe_tp_size": "1", "moe_ep_size": "4", "mode": "agg",
    "silicon_ttft_ms": "300", "silicon_tpot_ms": "20",
}


def _closed_loop(concurrency: float) -> tuple[float, float]:
    cfg = estimate.resolve(model="MiniMaxAI/MiniMax-M2.5", gpu="b200_sxm", tp=2, pp=1, dp=2,
                           ep=True, quant="fp8", kv_dtype="fp8", engine="vllm")
    r = latency.closed_loop(estimate.step_model(cfg), tp=2, pp=1, dp=2, ep=True,
                            concurrency=concurrency, prompt_tokens=1024, output_tokens=1024)
    return float(r.ttft_ms), float(r.tpot_ms)


def test_batch_size_is_per_attention_dp_rank():
    # 32 per rank on 2 DP ranks is a closed loop of 64 requests in flight, not 32.
    (res,) = validation.predict_rows([DP_ROW])
    assert res.skipped is None
    assert (res.pred_ttft_ms, res.pred_tpot_ms) == pytest.approx(_closed_loop(64.0))
    assert res.pred_tpot_ms != pytest.approx(_closed_loop(32.0)[1])


@pytest.mark.skipif(not DEV_CSV.exists(), reason="needs ../shared/data/validation")
def test_dev_rows_record_concurrency_as_batch_size_times_dp():
    # The rows' provenance names the benchmark's concurrency: it is batch_size x DP on every
    # attention-DP row, which is the reading predict_rows relies on.
    seen = 0
    with DEV_CSV.open() as fh:
        for row in csv.DictReader(fh):
            m = re.search(r"silicon_concurrency=(\d+)", row["silicon_data_source"])
            dp = int(float(row["attention_dp_size"] or 1))
            if m and dp > 1 and row["backend"] == "vllm":
                seen += 1
                assert int(m.group(1)) == int(float(row["batch_size"])) * dp, row["id"]
    assert seen > 0


def test_vllm_fp8_and_fp4_rows_run_an_fp8_kv_cache():
    # The measured queueing sets in where an fp8 cache runs out (validation.kv_dtype_for).
    def kv(model, precision, backend="vllm"):
        row = {**DP_ROW, "model_path": model, "precision": precision, "backend": backend,
               "gemm_quant_mode": ""}
        arch = models.load_model(model)
        engine = validation.Engine(backend)
        return validation.kv_dtype_for(row, engine, arch, validation.recipe_for(row, arch))

    assert kv("MiniMaxAI/MiniMax-M2.5", "fp8") is KvDtype.FP8
    assert kv("meta-llama/Llama-3.1-70B", "fp4") is KvDtype.FP8
    assert kv("meta-llama/Llama-3.1-70B", "") is KvDtype.BF16
    # gpt-oss keeps its attention (and so its cache) in bf16; SGLang rows are not changed.
    assert kv("openai/gpt-oss-120b", "fp4") is KvDtype.BF16
    assert kv("MiniMaxAI/MiniMax-M2.5", "fp8", backend="sglang") is KvDtype.BF16


def test_a_release_before_async_scheduling_pays_the_step_overhead_in_series():
    # vLLM < 0.14 schedules between GPU steps; 0.14+ overlaps it (engine.yaml
    # cpu_overlap_since), so the same row decodes slower on 0.12 than on 0.19.
    row = {**DP_ROW, "attention_dp_size": "1", "moe_ep_size": "1", "moe_tp_size": "2",
           "batch_size": "4"}
    old, new = validation.predict_rows([{**row, "backend_version": "0.12.0"},
                                        {**row, "backend_version": "0.19.0"}])
    assert old.pred_tpot_ms > new.pred_tpot_ms
    (nightly,) = validation.predict_rows([{**row, "backend_version": "nightly-5b8c30d"}])
    assert nightly.pred_tpot_ms == pytest.approx(new.pred_tpot_ms)
