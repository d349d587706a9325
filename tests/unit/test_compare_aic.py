"""`trilemma validate --compare aiconfigurator`: the row mapping, the head-to-head and the CLI.

All but the last test run without AIConfigurator installed; that one is skipped where the
[compare] extra is absent.
"""

import json
from importlib import metadata
from pathlib import Path

import pytest

from trilemma.optimizer import cli, compare_aic, validation

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "validation"
HEADER = ("id,backend,backend_version,model_path,system,precision,mode,isl,osl,gemm_quant_mode,"
          "moe_quant_mode,batch_size,tp_size,pp_size,attention_dp_size,moe_tp_size,moe_ep_size,"
          "silicon_ttft_ms,silicon_tpot_ms")


def row(**over):
    base = {"id": "r1", "backend": "vllm", "backend_version": "0.19.0",
            "model_path": "Qwen/Qwen3-32B", "system": "h100_sxm", "precision": "",
            "mode": "agg", "isl": "1024", "osl": "1024", "gemm_quant_mode": "",
            "moe_quant_mode": "", "batch_size": "8", "tp_size": "2", "pp_size": "1",
            "attention_dp_size": "1", "moe_tp_size": "", "moe_ep_size": "",
            "silicon_ttft_ms": "100", "silicon_tpot_ms": "10"}
    return base | over


AIC_BUNDLES = {"Qwen/Qwen3-32B", "meta-llama/Meta-Llama-3.1-70B", "openai/gpt-oss-120b",
               "MiniMaxAI/MiniMax-M2.5"}


def bundled(name):
    return name in AIC_BUNDLES


def test_columns_pass_through_by_name_with_aics_batch_size():
    q = compare_aic.aic_query(row(model_path="MiniMaxAI/MiniMax-M2.5", system="b200_sxm",
                                  precision="fp8", gemm_quant_mode="fp8", moe_quant_mode="fp8",
                                  batch_size="16", tp_size="4", attention_dp_size="4",
                                  moe_tp_size="1", moe_ep_size="4", isl="8192", osl="512"),
                              bundled)
    assert isinstance(q, compare_aic.AicQuery)
    kw = q.estimate_kwargs("0.24.0")
    assert kw == {"model_path": "MiniMaxAI/MiniMax-M2.5", "system_name": "b200_sxm",
                  "mode": "agg", "backend_name": "vllm", "backend_version": "0.24.0",
                  "isl": 8192, "osl": 512, "batch_size": 16, "tp_size": 4, "pp_size": 1,
                  "attention_dp_size": 4, "moe_tp_size": 1, "moe_ep_size": 4,
                  "gemm_quant_mode": "fp8", "moe_quant_mode": "fp8"}


def test_empty_columns_leave_aic_its_defaults():
    q = compare_aic.aic_query(row(), bundled)
    assert isinstance(q, compare_aic.AicQuery)
    assert (q.moe_tp_size, q.moe_ep_size, q.gemm_quant_mode, q.moe_quant_mode) == (
        None, None, None, None)


def test_disaggregated_rows_are_not_asked():
    reason = compare_aic.aic_query(row(mode="disagg"), bundled)
    assert reason == "disaggregated run: compared on aggregated serving only"


def test_a_renamed_model_asks_for_aics_bundled_twin():
    q = compare_aic.aic_query(row(model_path="meta-llama/Llama-3.1-70B"), bundled)
    assert isinstance(q, compare_aic.AicQuery)
    assert q.model_path == "meta-llama/Meta-Llama-3.1-70B"


def test_a_model_aic_does_not_bundle_is_skipped_instead_of_downloaded():
    for model in ("nvidia/DeepSeek-R1-NVFP4",  # no twin at all
                  "zhipuai/GLM-5"):            # a twin, but not in this AIConfigurator
        reason = compare_aic.aic_query(row(model_path=model), bundled)
        assert isinstance(reason, str)
        assert "not bundled with AIConfigurator" in reason


def test_fp4_on_an_mxfp4_checkpoint_leaves_the_quant_to_the_checkpoint():
    fp4 = {"precision": "fp4", "gemm_quant_mode": "nvfp4", "moe_quant_mode": "nvfp4"}
    gpt = compare_aic.aic_query(row(model_path="openai/gpt-oss-120b", **fp4), bundled)
    llama = compare_aic.aic_query(row(model_path="meta-llama/Llama-3.1-70B", **fp4), bundled)
    assert isinstance(gpt, compare_aic.AicQuery) and isinstance(llama, compare_aic.AicQuery)
    assert (gpt.gemm_quant_mode, gpt.moe_quant_mode) == (None, None)
    assert (llama.gemm_quant_mode, llama.moe_quant_mode) == ("nvfp4", "nvfp4")


def test_unreadable_lengths_are_a_reason():
    assert compare_aic.aic_query(row(isl=""), bundled) == "isl, osl or batch_size missing"
    reason = compare_aic.aic_query(row(tp_size="two"), bundled)
    assert isinstance(reason, str) and reason.startswith("unreadable row")


def test_aic_errors_group_into_short_reasons():
    a = RuntimeError("OOM: the model 'X' does not fit (tp=1, pp=1, dp=1). Try increasing tp")
    b = RuntimeError("OOM: the model 'X' does not fit (tp=2, pp=1, dp=1). Try increasing tp")
    c = ValueError('MoE data missing for MoeKey { quant: "fp8", topk: 8 } at /x/y.parquet')
    assert compare_aic.skip_reason(a) == compare_aic.skip_reason(b)
    assert compare_aic.skip_reason(a) == ("AIConfigurator: RuntimeError: OOM: the model 'X' "
                                         "does not fit")
    assert compare_aic.skip_reason(c) == ("AIConfigurator: ValueError: MoE data missing for "
                                         "MoeKey {...}")


def result(i, system, backend, ttft, tpot, skipped=None, meas=(100.0, 10.0)):
    r = row(id=f"r{i}", system=system, backend=backend, silicon_ttft_ms=str(meas[0]),
            silicon_tpot_ms=str(meas[1]))
    return validation.row_result(i, r, None if skipped else ttft, None if skipped else tpot,
                                 skipped)


def test_compare_scores_both_models_on_the_rows_both_predicted_only():
    ours = [result(0, "h100_sxm", "vllm", 110, 11), result(1, "h100_sxm", "vllm", 150, 15),
            result(2, "h100_sxm", "vllm", 0, 0, skipped="no"),
            result(3, "b200_sxm", "sglang", 100, 10)]
    theirs = [result(0, "h100_sxm", "vllm", 130, 9), result(1, "h100_sxm", "vllm", 0, 0,
                                                              skipped="AIC failed"),
              result(2, "h100_sxm", "vllm", 120, 12), result(3, "b200_sxm", "sglang", 0, 0,
                                                             skipped="x")]
    pairs = compare_aic.compare(ours, theirs, {("h100_sxm", "vllm"): "0.24.0"})
    assert [(p["system"], p["backend"]) for p in pairs] == [("b200_sxm", "sglang"),
                                                            ("h100_sxm", "vllm")]
    b200, h100 = pairs
    assert (h100["rows"], h100["trilemma_predicted"], h100["aic_predicted"],
            h100["both_predicted"]) == (3, 2, 2, 1)
    assert h100["ttft"]["trilemma"]["median_ape"] == 10.0
    assert h100["ttft"]["aiconfigurator"]["median_ape"] == 30.0
    assert h100["tpot"]["trilemma"]["median_ape"] == 10.0
    assert h100["tpot"]["aiconfigurator"]["median_ape"] == 10.0
    assert h100["aic_database"] == "0.24.0"
    assert b200["both_predicted"] == 0 and b200["ttft"]["trilemma"]["n"] == 0
    lines = compare_aic.comparison_lines(pairs)
    assert "current = 0.24.0" in lines[2] and "10.0%" in lines[2] and "30.0%" in lines[2]
    assert lines[1].split()[-5:] == ["-", "-", "-", "-", "-"]


def test_compare_needs_the_same_rows():
    with pytest.raises(ValueError):
        compare_aic.compare([result(0, "h100_sxm", "vllm", 1, 1)], [], {})


def write(tmp_path, *rows):
    path = tmp_path / "rows.csv"
    cols = HEADER.split(",")
    path.write_text("\n".join([HEADER, *(",".join(r[c] for c in cols) for r in rows)]) + "\n")
    return path


def test_cli_compare_prints_both_tables_and_the_head_to_head(capsys, tmp_path, monkeypatch):
    rows = [row(id="a"), row(id="b", isl="4096"), row(id="c", mode="disagg")]
    path = write(tmp_path, *rows)

    def fake_aic(rs):  # stands in for AIConfigurator: 20% high on TTFT, one row missing
        rs = list(rs)
        out = [validation.row_result(0, rs[0], 120.0, 10.0, None),
               validation.row_result(1, rs[1], None, None, "AIConfigurator: failed"),
               validation.row_result(2, rs[2], None, None, "disaggregated")]
        return compare_aic.AicRun(results=out, versions={("h100_sxm", "vllm"): "0.24.0"})

    monkeypatch.setattr(compare_aic, "predict_aic", fake_aic)
    monkeypatch.setattr(metadata, "version", lambda name: "0.12.0")
    assert cli.main(["validate", str(path), "--compare", "aiconfigurator"]) == 0
    out = capsys.readouterr().out
    assert "== trilemma ==" in out and "== AIConfigurator 0.12.0" in out
    assert "'current' database: h100_sxm/vllm 0.24.0" in out
    head = out.split("== head to head")[1].splitlines()
    h100 = next(line for line in head if line.startswith("h100_sxm"))
    assert h100.split()[2:5] == ["3", "2", "1"]       # rows, trilemma, AIC
    assert "20.0%" in h100 and h100.endswith("current = 0.24.0")

    assert cli.main(["validate", str(path), "--compare", "aiconfigurator", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["aiconfigurator"]["databases"] == {"h100_sxm/vllm": "0.24.0"}
    assert doc["compare"][0]["both_predicted"] == 1


def test_cli_compare_without_the_extra_says_how_to_install(capsys, tmp_path, monkeypatch):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", missing)
    code = cli.main(["validate", str(write(tmp_path, row())), "--compare", "aiconfigurator"])
    assert code == cli.EXIT_BAD_INPUT
    assert "pip install 'trilemma[compare]'" in capsys.readouterr().err


def test_cli_compare_refuses_latency_tables(capsys):
    code = cli.main(["validate", str(SHARED / "latency_tables.csv"), "--compare",
                     "aiconfigurator"])
    assert code == cli.EXIT_BAD_INPUT
    assert "silicon-sample rows only" in capsys.readouterr().err


def test_aiconfigurator_predicts_a_row_against_its_current_database():
    pytest.importorskip("aiconfigurator")
    from aiconfigurator.sdk.perf_database import get_version_slots

    rows = [row(id="a"), row(id="b", batch_size="32"), row(id="c", mode="disagg"),
            row(id="d", model_path="no-such/model")]
    run = compare_aic.predict_aic(rows)
    a, b, c, d = run.results
    assert a.skipped is None and b.skipped is None
    assert a.pred_ttft_ms > 0 and 0 < a.pred_tpot_ms < b.pred_tpot_ms  # more load, slower
    assert c.skipped and d.skipped and "not bundled" in d.skipped
    assert run.versions == {("h100_sxm", "vllm"): get_version_slots("h100_sxm",
                                                                    "vllm")["current"]}
