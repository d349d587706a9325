"""`trilemma validate` on AIConfigurator-schema rows: how a row maps onto a configuration."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from trilemma.optimizer import validation
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
                           ep=True, quant="fp8", kv_dtype="bf16", engine="vllm")
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
