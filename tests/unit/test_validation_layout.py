"""Silicon rows whose parallel columns contradict their SGLang launch flags (validation_layout)."""

from __future__ import annotations

import pytest

from trilemma.optimizer import validation, validation_layout

# The same run written twice: correctly (tp 4, moe tp 1 x ep 4) and by a converter that
# multiplied `--tp 4 --ep-size 4` into a 16-GPU layout. Same measurements, byte for byte.
_RUN = {
    "model_path": "deepseek-ai/DeepSeek-R1", "system": "b200_sxm", "backend": "sglang",
    "precision": "fp4", "gemm_quant_mode": "nvfp4", "isl": "1024", "osl": "1024",
    "batch_size": "8", "pp_size": "1", "attention_dp_size": "1", "mode": "agg",
    "silicon_ttft_ms": "188.34375941660255", "silicon_tpot_ms": "10.422528889832838",
}
GOOD = {**_RUN, "id": "x_sglang_fp4_agg_1024x1024_c8_tp4_0_ep4_0_287", "tp_size": "4",
        "moe_tp_size": "1", "moe_ep_size": "4"}
MULTIPLIED = {**_RUN, "id": "x_sglang_fp4_agg_1024x1024_c8_tp4_ep4_1040", "tp_size": "16",
              "moe_tp_size": "4", "moe_ep_size": "4"}
FLAGLESS_COPY = {**MULTIPLIED, "id": "dsr1_b200_sglang_fp4_agg_1024x1024_c8_cfg202",
                 "model_path": "deepseek-ai/DeepSeek-V3"}


def test_flags_that_agree_leave_the_row_alone():
    assert validation_layout.corrected(GOOD) == (GOOD, None)


def test_multiplied_columns_are_read_from_the_launch_flags():
    fixed, note = validation_layout.corrected(MULTIPLIED)
    assert (fixed["tp_size"], fixed["moe_tp_size"], fixed["moe_ep_size"]) == ("4", "1", "4")
    assert note is not None and "--tp 4 --ep-size 4" in note and "16 GPUs" in note


def test_other_engines_keep_their_columns():
    # vLLM derives EP from tp x dp; its ids' flags do not mean SGLang's.
    row = {**MULTIPLIED, "backend": "vllm"}
    assert validation_layout.corrected(row) == (row, None)


def test_a_flagless_copy_of_a_flagged_run_takes_its_layout():
    out = validation_layout.corrected_rows([FLAGLESS_COPY, MULTIPLIED])
    fixed, note = out[0]
    assert (fixed["tp_size"], fixed["moe_tp_size"], fixed["moe_ep_size"]) == ("4", "1", "4")
    assert note is not None and MULTIPLIED["id"] in note
    # A different measurement is another run: no layout is borrowed.
    other = {**FLAGLESS_COPY, "silicon_tpot_ms": "10.5"}
    assert validation_layout.corrected_rows([other, MULTIPLIED])[0] == (other, None)


def test_validate_predicts_the_launched_layout_and_says_so():
    good, multiplied = validation.predict_rows([GOOD, MULTIPLIED])
    assert multiplied.skipped is None and good.skipped is None
    assert multiplied.pred_ttft_ms == pytest.approx(good.pred_ttft_ms)
    assert multiplied.pred_tpot_ms == pytest.approx(good.pred_tpot_ms)
    assert multiplied.note and good.note is None
    assert "note" in multiplied.as_json() and "note" not in good.as_json()
    summary = validation.summarize([good, multiplied])
    assert summary["launch_flag_layouts"] == 1
    # Read as written (16 GPUs over two nodes) the prediction differs: the correction matters.
    as_written = validation.predict_rows([{**MULTIPLIED, "id": "no_flags"}])[0]
    assert as_written.pred_ttft_ms != pytest.approx(good.pred_ttft_ms)
