"""The latency-table validation: name mapping, skip reasons, a synthetic table, the real one."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from trilemma.optimizer import validation_tables as vt
from trilemma.optimizer.catalog import models
from trilemma.optimizer.errors import InputError

REAL_TABLE = (Path(__file__).resolve().parents[3] / "shared" / "data" / "validation"
              / "latency_tables.csv")

BASE = {
    "source_url_or_path": "synthetic", "engine": "vLLM", "engine_version": "0.x",
    "model": "meta-llama/Llama-3.1-8B", "gpu": "H100 80GB HBM3", "num_gpus": "1", "tp": "1",
    "pp": "1", "precision": "bf16", "isl": "1000", "osl": "200", "load_type": "concurrency",
    "load_value": "8", "ttft_ms": "80", "ttft_stat": "mean", "itl_ms": "8", "itl_stat": "mean",
    "notes": "",
}


def row(**changes: str) -> dict[str, str]:
    return {**BASE, **changes}


@pytest.mark.parametrize(("name", "expected"), [
    ("meta-llama3-8b-instruct", "meta-llama/Llama-3.1-8B"),
    ("meta-llama3-70b-instruct", "meta-llama/Llama-3.1-70B"),
    ("Llama-3.3-70B-Instruct", "meta-llama/Llama-3.1-70B"),
    ("gpt-oss-20b", "openai/gpt-oss-20b"),
    ("Qwen/Qwen3-8B", "Qwen/Qwen3-8B"),
])
def test_maps_table_model_names_to_architectural_twins(name, expected):
    alias, why = vt.map_model(name)
    assert why is None and alias is not None and alias.model == expected


def test_llama3_twin_says_what_differs():
    alias, _ = vt.map_model("meta-llama3-8b-instruct")
    assert alias is not None and alias.note and "rope" in alias.note
    assert alias.max_position_embeddings == 8192


@pytest.mark.parametrize("name", ["llama-2-7b-chat", "meta-llama/Llama-2-70b-hf", "llama2-13b"])
def test_refuses_llama2_with_a_reason(name):
    alias, why = vt.map_model(name)
    assert alias is None and why and "Llama-2" in why


@pytest.mark.parametrize(("name", "key"), [
    ("A100-SXM4-80GB", "a100_sxm"), ("H100 80GB HBM3", "h100_sxm"),
    ("H100_80GB_HBM3", "h100_sxm"), ("H100 80G", "h100_sxm"), ("h200_sxm", "h200_sxm"),
])
def test_maps_gpu_names_to_catalog_keys(name, key):
    assert vt.map_gpu(name)[0] == key


def test_maps_precisions():
    arch = models.load_model("meta-llama/Llama-3.1-8B")
    assert vt.map_precision("fp16", arch)[:2] == ("bf16", "bf16")
    assert vt.map_precision("BF16", arch)[:2] == ("bf16", "bf16")
    assert vt.map_precision("fp8", arch)[:2] == ("fp8", "bf16")
    assert vt.map_precision("kv-cache FP8", arch)[:2] == ("bf16", "fp8")
    assert isinstance(vt.map_precision("kv-cache FP8 skip-SW", arch), str)
    assert isinstance(vt.map_precision("w4a16-awq", arch), str)


@pytest.mark.parametrize(("changes", "reason"), [
    ({"model": "llama-2-7b"}, "Llama-2"),
    ({"gpu": "not stated next to table"}, "not a catalog GPU"),
    ({"precision": "kv-cache FP8 skip-SW"}, "mixes dtypes"),
    ({"engine": "TGI"}, "not modelled"),
    ({"load_type": "request_rate_sweep"}, "not modelled"),
    ({"num_gpus": "3", "tp": "2"}, "multiple"),
    ({"gpu": "A100-SXM4-80GB", "precision": "fp8"}, "quant"),
    ({"model": "meta-llama3-8b-instruct", "isl": "8000", "osl": "1000"}, "context"),
    ({"ttft_ms": "", "itl_ms": ""}, "no measured"),
    ({"model": "meta-llama/Llama-3.1-70B", "gpu": "l4"}, "fit"),
])
def test_keeps_unmodellable_rows_with_the_reason(changes, reason):
    [result] = vt.predict_table_rows([row(**changes)])
    assert result.skipped and reason in result.skipped
    assert result.pred_ttft_ms is None and result.pred_itl_ms is None


def test_nim_rows_record_the_engine_substitution():
    [result] = vt.predict_table_rows([row(engine="NVIDIA NIM (TensorRT-LLM backend)")])
    assert result.skipped is None
    assert any("TensorRT-LLM" in note for note in result.assumptions)


def test_latency_grows_with_concurrency():
    results = vt.predict_table_rows([row(load_value=str(c)) for c in (1, 16, 128)])
    ttft = [r.pred_ttft_ms for r in results]
    itl = [r.pred_itl_ms for r in results]
    assert ttft == sorted(ttft) and itl == sorted(itl)


def test_qps_row_matches_the_closed_loop_of_equal_throughput():
    [conc] = vt.predict_table_rows([row(load_value="32")])
    [lo, hi] = vt.predict_table_rows([row(load_type="qps", load_value="1"),
                                      row(load_type="qps", load_value="1000000")])
    assert lo.skipped is None and lo.concurrency is not None and lo.concurrency < 32
    assert any("Poisson" in note for note in lo.assumptions)
    assert hi.skipped and "capacity" in hi.skipped
    assert conc.concurrency == 32


def test_reads_a_synthetic_table_and_summarises(tmp_path):
    path = tmp_path / "t.csv"
    rows = [row(load_value="1"), row(load_value="16"), row(model="llama-2-7b")]
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(BASE))
        writer.writeheader()
        writer.writerows(rows)
    read = vt.read_table(path)
    assert vt.matches_columns(read[0])
    summary = vt.summarize(vt.predict_table_rows(read))
    assert (summary["rows"], summary["modelled"], summary["skipped"]) == (3, 2, 1)
    assert summary["skipped_rows"][0]["id"] == "row3"
    assert summary["overall"]["ttft"]["n"] == 2
    [group] = summary["groups"]
    assert group["model"] == "meta-llama/Llama-3.1-8B" and group["itl"]["n"] == 2


def test_read_table_names_missing_columns(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("model,gpu\nx,y\n")
    with pytest.raises(InputError, match="missing columns: source_url_or_path"):
        vt.read_table(path)
    with pytest.raises(InputError, match="cannot be read"):
        vt.read_table(tmp_path / "absent.csv")


@pytest.mark.skipif(not REAL_TABLE.exists(), reason="needs ../shared beside the repository")
def test_models_most_rows_of_the_published_tables():
    results = vt.predict_table_rows(vt.read_table(REAL_TABLE))
    summary = vt.summarize(results)
    assert summary["rows"] == len(results) == summary["modelled"] + summary["skipped"]
    assert summary["modelled"] >= 700
    assert sum(summary["skip_reasons"].values()) == summary["skipped"]
    for metric in ("ttft", "itl"):
        stats = summary["overall"][metric]
        assert stats["n"] > 0 and 0 <= stats["median_ape"] <= stats["p90_ape"]
    assert {g["gpu"] for g in summary["groups"]} >= {"A100-SXM4-80GB", "H100_80GB_HBM3"}
