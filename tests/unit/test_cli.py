import json
from pathlib import Path

import pytest

from trilemma.optimizer import cli

SHARED = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "validation"
DEV_CSV = SHARED / "aic_silicon_sample_dev.csv"
BASE = ["estimate", "--model", "meta-llama/Llama-3.1-70B", "--gpu", "h100_sxm"]


def run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_estimate_prints_latency_throughput_memory_and_calibration(capsys):
    code, out, _ = run(capsys, *BASE, "--tp", "4", "--quant", "fp8", "--concurrency", "16")
    assert code == 0
    for word in ("TTFT", "TPOT", "per GPU", "weights", "KV capacity", "calibration: "):
        assert word in out


def test_estimate_json_is_one_document_with_the_figures(capsys):
    code, out, _ = run(capsys, *BASE, "--tp", "2", "--quant", "fp8", "--kv-dtype", "fp8",
                       "--spec", "eagle3:3", "--json")
    doc = json.loads(out)
    assert code == 0
    assert doc["spec"] == "eagle3:3" and doc["fits"] is True
    assert doc["ttft_ms"] > 0 and doc["tpot_ms"] > 0 and doc["output_tokens_per_s_per_gpu"] > 0
    assert doc["memory_bytes_per_gpu"]["weights"] > 0
    assert doc["provenance"]["gemm"] == "fitted"


@pytest.mark.parametrize(("phase", "extra"), [
    ("decode", ["--batch", "32", "--kv-len", "2048"]),
    ("prefill", ["--batch", "2", "--prompt", "4096"]),
    ("prefill", ["--batch", "2", "--prompt-tokens", "4096"]),
])
def test_estimate_single_steps(capsys, phase, extra):
    code, out, _ = run(capsys, *BASE, "--tp", "8", "--quant", "fp8", "--phase", phase, *extra,
                       "--json")
    doc = json.loads(out)
    assert code == 0 and doc["phase"] == phase and doc["step_ms"] > 0


def test_the_old_length_flags_are_hidden_aliases_of_the_glossary_names(capsys):
    spec = ["--tp", "4", "--spec", "eagle3:3"]  # speculation: predictability matters
    _, new, _ = run(capsys, *BASE, *spec, "--prompt-tokens", "2048", "--output-tokens", "300",
                    "--cached-tokens", "512", "--output-predictability", "0.9", "--json")
    _, old, _ = run(capsys, *BASE, *spec, "--isl", "2048", "--osl", "300", "--cached", "512",
                    "--predictability", "0.9", "--json")
    _, default, _ = run(capsys, *BASE, *spec, "--isl", "2048", "--osl", "300", "--cached",
                        "512", "--json")
    assert new == old != default
    doc = json.loads(new)
    assert (doc["isl"], doc["osl"], doc["cached"]) == (2048, 300, 512)
    with pytest.raises(SystemExit):
        run(capsys, "estimate", "--help")
    usage = capsys.readouterr().out
    assert "--prompt-tokens" in usage and "--isl" not in usage


def test_a_configuration_that_does_not_fit_says_so(capsys):
    code, out, _ = run(capsys, "estimate", "--model", "meta-llama/Llama-3.1-405B", "--gpu",
                       "h100_sxm", "--tp", "1")
    assert code == 0
    assert "DOES NOT FIT" in out


@pytest.mark.parametrize(("argv", "field", "why"), [
    (["--gpu", "h900"], "gpu", "unknown GPU"),
    (["--tp", "3"], "tp", "does not divide the 64 attention heads"),
    (["--quant", "nvfp4"], "quant", "Blackwell"),
    (["--quant", "fp7"], "quant", ""),
    (["--kv-dtype", "int2"], "kv_dtype", "must be one of"),
    (["--spec", "eagle3:99"], "spec", ""),
    (["--spec", "teleport:3"], "spec", ""),
    (["--engine", "tgi"], "engine", "vllm or sglang"),
    (["--concurrency", "4", "--cached-tokens", "5000", "--prompt-tokens", "1024"],
     "cached_tokens", "[0, prompt_tokens)"),
    # the spellings before the glossary still parse, into the same options
    (["--concurrency", "4", "--cached", "5000", "--isl", "1024"],
     "cached_tokens", "[0, prompt_tokens)"),
])
def test_bad_input_exits_2_naming_field_value_and_reason(capsys, argv, field, why):
    args = [*BASE]
    for flag, value in zip(argv[::2], argv[1::2], strict=True):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    code, _, err = run(capsys, *args)
    assert code == 2
    assert f"error: {field}=" in err
    assert why in err


def test_fp8_kv_cache_on_an_a100_is_refused(capsys):
    code, _, err = run(capsys, "estimate", "--model", "meta-llama/Llama-3.1-8B", "--gpu",
                       "a100_sxm", "--kv-dtype", "fp8")
    assert code == 2 and "kv_dtype" in err


def test_unknown_model_says_how_to_pass_a_config_json(capsys):
    code, _, err = run(capsys, "estimate", "--model", "acme/Nonexistent-7B", "--gpu", "h100")
    assert code == 2
    assert "config.json" in err


@pytest.mark.parametrize(("content", "key"), [
    ("{not json", ""),
    ('{"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2}', "hidden_size"),
    ('{"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2, '
     '"num_attention_heads": 6, "num_key_value_heads": 4, "intermediate_size": 128, '
     '"vocab_size": 100}', "num_key_value_heads"),
])
def test_malformed_config_json_exits_2_naming_the_key(capsys, tmp_path, content, key):
    path = tmp_path / "config.json"
    path.write_text(content)
    code, _, err = run(capsys, "estimate", "--model", str(path), "--gpu", "h100_sxm")
    assert code == 2
    assert key in err


def test_a_local_config_json_is_estimated_like_a_bundled_model(capsys, tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "intermediate_size": 14336, "vocab_size": 128256, "max_position_embeddings": 131072}))
    code, out, _ = run(capsys, "estimate", "--model", str(path), "--gpu", "h100_sxm", "--json")
    assert code == 0
    assert json.loads(out)["tpot_ms"] > 0


def test_validate_refuses_a_csv_without_the_schema_columns(capsys, tmp_path):
    path = tmp_path / "x.csv"
    path.write_text("a,b\n1,2\n")
    code, _, err = run(capsys, "validate", str(path))
    assert code == 2 and "missing columns" in err


def test_validate_missing_file_exits_2(capsys, tmp_path):
    code, _, err = run(capsys, "validate", str(tmp_path / "nope.csv"))
    assert code == 2 and "csv=" in err


def _row(**kw):
    row = {"id": "r1", "model_path": "meta-llama/Llama-3.1-70B", "system": "h100_sxm",
           "backend": "vllm", "precision": "fp8", "gemm_quant_mode": "fp8", "isl": "1024",
           "osl": "1024", "batch_size": "8", "tp_size": "4", "pp_size": "1",
           "attention_dp_size": "1", "moe_tp_size": "4", "moe_ep_size": "1", "mode": "agg",
           "silicon_ttft_ms": "100", "silicon_tpot_ms": "12"}
    row.update(kw)
    return row


def test_validate_json_lists_every_row_with_a_prediction_or_a_reason(capsys, tmp_path):
    rows = [_row(), _row(id="r2", backend="trtllm"), _row(id="r3", mode="disagg"),
            _row(id="r4", model_path="acme/unknown"), _row(id="r5", tp_size="3")]
    path = tmp_path / "rows.csv"
    path.write_text(",".join(rows[0]) + "\n" + "\n".join(",".join(r.values()) for r in rows))
    code, out, _ = run(capsys, "validate", str(path), "--json")
    doc = json.loads(out)
    assert code == 0
    assert [r["id"] for r in doc["rows"]] == ["r1", "r2", "r3", "r4", "r5"]
    first = doc["rows"][0]
    assert first["skipped"] is None and first["pred_ttft_ms"] > 0 and first["pred_tpot_ms"] > 0
    assert all(r["skipped"] and r["pred_ttft_ms"] is None for r in doc["rows"][1:])
    assert doc["summary"]["modelled"] == 1 and doc["summary"]["skipped"] == 4
    assert sum(doc["summary"]["skip_reasons"].values()) == 4


@pytest.mark.skipif(not DEV_CSV.exists(), reason="needs ../shared/data/validation")
def test_validate_meets_the_accuracy_bar_on_the_vllm_dev_rows(capsys, tmp_path):
    # The acceptance bar of the performance model: vLLM aggregated rows, median APE
    # <= 20% TTFT and <= 15% TPOT, with >= 90% of those rows modelled.
    code, out, _ = run(capsys, "validate", str(DEV_CSV), "--json")
    doc = json.loads(out)
    vllm = doc["summary"]["by_backend"]["vllm"]
    assert code == 0
    assert vllm["ttft"]["median_ape"] <= 20.0
    assert vllm["tpot"]["median_ape"] <= 15.0
    import csv

    with DEV_CSV.open() as fh:
        total = sum(1 for r in csv.DictReader(fh) if r["backend"] == "vllm" and r["mode"] == "agg")
    assert vllm["ttft"]["n"] >= 0.9 * total


def _config_file(tmp_path, **worker):
    doc = {"model": "meta-llama/Llama-3.1-70B", "engine": "vllm", "mode": "aggregated",
           "replicas": 2, "worker": {"gpu": "h100_sxm", "tp": 4, "quant": "fp8", **worker}}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps({"recommended": {"config": doc}}))
    return path


def test_render_prints_the_engine_command_and_manifests_byte_identically(capsys, tmp_path):
    path = _config_file(tmp_path, kv_dtype="fp8")
    code, first, _ = run(capsys, "render", str(path), "--name", "chat")
    _, second, _ = run(capsys, "render", str(path), "--name", "chat")
    assert code == 0 and first == second
    assert "# vllm serve meta-llama/Llama-3.1-70B --tensor-parallel-size 4" in first
    assert "--kv-cache-dtype fp8" in first
    assert "kind: Deployment" in first and "kind: Service" in first


def test_render_for_sglang_uses_its_own_flags(capsys, tmp_path):
    code, out, _ = run(capsys, "render", str(_config_file(tmp_path)), "--engine", "sglang")
    assert code == 0
    assert "sglang.launch_server" in out and "--tp-size 4" in out


def test_render_of_a_malformed_plan_exits_2(capsys, tmp_path):
    path = tmp_path / "plan.json"
    path.write_text("{\"recommended\": 3}")
    code, _, err = run(capsys, "render", str(path))
    assert code == 2 and "recommended.config" in err


def test_an_uncalibrated_gpu_is_labelled_as_such(capsys):
    code, out, _ = run(capsys, "estimate", "--gpu", "mi325x")
    assert code == 0 and "UNCALIBRATED" in out and "datasheet" in out


def test_an_extrapolated_gpu_names_the_calibrated_gpu_it_rests_on(capsys):
    code, out, _ = run(capsys, "estimate", "--gpu", "b300")
    assert code == 0 and "UNCALIBRATED" not in out
    assert "EXTRAPOLATED" in out and "b200_sxm's fitted kernels" in out


@pytest.mark.skipif(not (SHARED / "latency_tables.csv").exists(),
                    reason="needs ../shared/data/validation")
def test_validate_recognises_latency_vs_load_tables(capsys):
    code, out, _ = run(capsys, "validate", str(SHARED / "latency_tables.csv"), "--json")
    doc = json.loads(out)
    assert code == 0
    assert doc["summary"]["modelled"] > 700
    assert doc["summary"]["overall"]["itl"]["median_ape"] is not None


def _disagg_file(tmp_path):
    worker = {"gpu": "h100_sxm", "tp": 2, "quant": "fp8"}
    doc = {"model": "meta-llama/Llama-3.1-70B", "engine": "vllm", "mode": "disaggregated",
           "replicas": 2, "worker": worker, "prefill": worker, "prefill_replicas": 1}
    path = tmp_path / "disagg.json"
    path.write_text(json.dumps(doc))
    return path


def test_a_disaggregated_vllm_plan_needs_a_router_and_renders_with_one(capsys, tmp_path):
    path = _disagg_file(tmp_path)
    code, _, err = run(capsys, "render", str(path))
    assert code == 2 and "--router-command" in err
    code, out, _ = run(capsys, "render", str(path), "--router-command", "my-router --port 8000")
    assert code == 0
    assert '"kv_role":"kv_both"' in out and "VLLM_NIXL_SIDE_CHANNEL_HOST" in out
    assert "my-router" in out


def test_render_refuses_a_config_json_path_as_the_served_model(capsys, tmp_path):
    doc = {"model": str(tmp_path / "config.json"), "worker": {"gpu": "h100_sxm"}}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(doc))
    code, _, err = run(capsys, "render", str(path))
    assert code == 2 and "model=" in err and "cannot be deployed" in err
