"""The shipped calibration: credited, compact, byte-stable, accurate, and reproducible."""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path

import numpy as np
import pytest

from trilemma.optimizer.errors import InputError
from trilemma.optimizer.perf import kernel_forms, kernels

CALIBRATION = Path(kernels.__file__).parent / "data" / "calibration.json"
AIC = Path(os.environ.get("TRILEMMA_AIC_DATA")
           or Path(__file__).resolve().parents[2].parent / "shared" / "data" / "aic")
needs_aic = pytest.mark.skipif(not (AIC / "profiles").is_dir(),
                               reason=f"AIConfigurator tables not found at {AIC}")
DOC = json.loads(CALIBRATION.read_text())

# Error budget per fit key pattern: (max median APE, max p90 APE), set from the fitted results
# with some headroom; the first matching pattern applies. The loosest rows are the honest
# limits of one smooth form per table (L40S decode attention warm-L2 steps, MoE routing).
ERROR_BOUNDS = (
    ("gemm/bf16", 0.12, 0.40),
    ("gemm/fp8", 0.18, 0.60),
    ("gemm/fp8_block", 0.15, 0.35),
    ("gemm/fp4", 0.10, 0.30),
    ("context_attention/*", 0.20, 0.55),
    ("decode_attention/*", 0.25, 0.95),
    ("mla_*_core/*", 0.12, 0.65),
    ("mla_*", 0.10, 0.32),
    ("moe/*", 0.22, 0.80),
    ("comm/*", 0.14, 0.40),
)
# SGLang's own kernels: its tables mix kernel sources per family (TRT-LLM and Triton MoE on
# B200, FA3 and Triton attention on Hopper), which one smooth form fits less tightly.
ENGINE_ERROR_BOUNDS = (
    ("gemm/*", 0.14, 0.40),
    ("deepep/*", 0.12, 0.30),
    ("moe/*", 0.31, 0.75),
    ("context_attention/*", 0.22, 0.80),
    ("mla_*_core/*", 0.12, 1.20),
)
FITS = [(gpu, key, fit) for gpu, entry in sorted(DOC["gpus"].items())
        for key, fit in sorted(entry["fits"].items())]
ENGINE_FITS = [(engine, gpu, key, fit) for engine, doc in sorted(DOC["engines"].items())
               for gpu, entry in sorted(doc["gpus"].items())
               for key, fit in sorted(entry["fits"].items())]


def _bounds(key: str, engine: bool = False) -> tuple[float, float]:
    for pattern, median, p90 in (*(ENGINE_ERROR_BOUNDS if engine else ()), *ERROR_BOUNDS):
        if fnmatch.fnmatch(key, pattern):
            return median, p90
    raise AssertionError(f"no error bound for {key}")


def test_the_file_credits_aiconfigurator_and_says_how_to_rebuild_it():
    assert "NVIDIA AIConfigurator v0.11.0" in DOC["source"]["credit"]
    assert DOC["source"]["commit"] == "095f58a51c4ca8e61b66ec108d86f223f8d559ce"
    assert DOC["source"]["license"] == "Apache-2.0"
    assert "python -m trilemma.optimizer.perf.fitting" in DOC["generated_by"]


def test_the_file_is_compact_and_in_canonical_form():
    from trilemma.optimizer.perf import fitting

    text = CALIBRATION.read_text()
    assert len(text.encode()) < 200_000
    assert fitting.dumps(json.loads(text)) == text  # sorted keys, fixed layout


def test_every_parameter_is_rounded_to_six_significant_digits():
    for _, _, fit in FITS:
        for value in fit["params"].values():
            assert float(f"{value:.5e}") == value


@pytest.mark.parametrize("gpu", ["a100_sxm", "b200_sxm", "h100_sxm", "h200_sxm", "l40s"])
def test_each_calibrated_gpu_has_every_core_family(gpu):
    fits = DOC["gpus"][gpu]["fits"]
    for key in ("gemm/bf16", "context_attention/bf16", "decode_attention/bf16", "moe/bf16",
                "comm/allgather/8", "comm/allreduce/8"):
        assert key in fits


@pytest.mark.parametrize("gpu,key,fit", FITS, ids=[f"{g}-{k}" for g, k, _ in FITS])
def test_recorded_fit_errors_are_within_the_stated_bounds(gpu, key, fit):
    median, p90 = _bounds(key)
    assert fit["n"] > 0
    assert fit["median_ape"] <= median, (gpu, key, fit["median_ape"])
    assert fit["p90_ape"] <= p90, (gpu, key, fit["p90_ape"])


@pytest.mark.parametrize("engine,gpu,key,fit", ENGINE_FITS,
                         ids=[f"{e}-{g}-{k}" for e, g, k, _ in ENGINE_FITS])
def test_engine_fits_come_from_that_engines_tables_within_their_bounds(engine, gpu, key, fit):
    median, p90 = _bounds(key, engine=True)
    assert fit["median_ape"] <= median and fit["p90_ape"] <= p90, (fit["median_ape"],
                                                                   fit["p90_ape"])
    assert fit["table"].startswith(f"aiconfigurator_core/systems/data/{gpu}/")
    assert f"/{engine}/{fit['version']}/" in fit["table"]
    assert set(fit["params"]) == set(kernel_forms.FORM_PARAMS[fit["form"]])
    # Collectives are NCCL's under every engine: an engine never brings its own.
    assert not key.startswith("comm/")


def test_sglang_kernels_are_credited_to_the_aiconfigurator_wheel():
    source = DOC["engines"]["sglang"]["source"]
    assert "AIConfigurator 0.12.0" in source["credit"] and source["license"] == "Apache-2.0"
    assert "--sglang-tables" in DOC["generated_by"]
    assert sorted(DOC["engines"]["sglang"]["gpus"]) == ["b200_sxm", "h100_sxm", "h200_sxm"]


@pytest.mark.parametrize("gpu,key,fit", FITS, ids=[f"{g}-{k}" for g, k, _ in FITS])
def test_each_fit_records_where_its_rows_came_from(gpu, key, fit):
    assert fit["table"].startswith(f"profiles/{gpu}/")
    assert fit["table"].endswith(".parquet")
    assert fit["kernel_source"] and fit["version"] and fit["domain"]
    assert set(fit["params"]) == set(kernel_forms.FORM_PARAMS[fit["form"]])


@pytest.mark.parametrize("gpu,key,fit", [f for f in FITS if f[2]["form"] != "comm"],
                         ids=[f"{g}-{k}" for g, k, f in FITS if f["form"] != "comm"])
def test_fitted_rates_stay_within_one_and_a_half_datasheet_peaks(gpu, key, fit):
    sheet = DOC["gpus"][gpu]["datasheet"]
    for name in ("flops", "gemm_flops", "attn_flops", "mem_bw"):
        if name in fit["params"]:
            ref = kernel_forms.rate_reference(name, key, sheet)
            assert ref is not None and fit["params"][name] <= 1.5 * ref * (1 + 1e-5)


def test_datasheet_defaults_are_relative_efficiencies_below_one_and_a_half():
    # exp_rate (softmax pairs/s) and the link rates are relative too, but not efficiencies.
    for key, entry in DOC["datasheet_defaults"].items():
        for name in set(entry["relative"]) & {"flops", "gemm_flops", "attn_flops", "mem_bw"}:
            assert 0 < entry["params"][name] <= 1.5 + 1e-6, (key, name)


# --- Against the measured tables ---------------------------------------------------------------

def _sample(df, n=300):
    """A fixed, spread-out sample of rows (no randomness)."""
    idx = np.unique(np.linspace(0, len(df) - 1, min(n, len(df))).round().astype(int))
    return df.iloc[idx]


def _table(gpu, family, name):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    paths = sorted((AIC / "profiles" / gpu / family).glob(f"*/*/{name}"))
    assert paths, (gpu, family, name)
    df = pd.read_parquet(paths[0])
    return df.sort_values(list(df.columns), kind="mergesort").reset_index(drop=True)


def _spot_rows():
    """(gpu, family, kernel) combinations to check against measured rows."""
    cases = []
    for gpu, entry in sorted(DOC["gpus"].items()):
        for key in sorted(entry["fits"]):
            family, _, kernel = key.partition("/")
            plain = family in ("gemm", "context_attention", "decode_attention", "moe")
            mla = family in ("mla_context", "mla_decode") and kernel.startswith("bf16/")
            if plain or mla:
                cases.append((gpu, family, kernel))
            elif family == "comm" and kernel.endswith("/8"):
                # vLLM's all-reduce is the custom one where measured: check that, not NCCL's.
                custom = "comm/custom_allreduce/8" in entry["fits"]
                if not (kernel == "allreduce/8" and custom):
                    cases.append((gpu, family, kernel.rpartition("/")[0]))
    return cases


GEMM_DTYPES = {"bf16": "bfloat16", "fp8": "fp8", "fp8_block": "fp8_block", "fp4": "nvfp4"}
MOE_DTYPES = {"bf16": "bfloat16", "fp8": "fp8", "fp8_block": "fp8_block", "w4a16": "int4_wo",
              "mxfp4": "w4a16_mxfp4", "fp4": "nvfp4"}
KV = {"bf16": "bfloat16", "fp8": "fp8"}
NCCL_OPS = {"allgather": "all_gather", "allreduce": "all_reduce",
            "reduce_scatter": "reduce_scatter", "alltoall": "alltoall"}


def _predict_rows(gpu, family, kernel):
    """Measured latencies of sampled rows and the runtime API's predictions for them."""
    km = kernels.kernel_model(gpu)
    c = lambda df, name: df[name].to_numpy(dtype=float)  # noqa: E731
    if family == "gemm":
        df = _table(gpu, "gemm", "gemm_perf.parquet")
        df = df[(df.gemm_dtype == GEMM_DTYPES[kernel]) & (df.n >= 128) & (df.k >= 128)]
        if kernel == "fp8_block":
            df = df[(df.n % 128 == 0) & (df.k % 128 == 0)]
        df = _sample(df)
        return c(df, "latency"), km.gemm_ms(kernel, c(df, "m"), c(df, "n"), c(df, "k"))
    if family in ("context_attention", "decode_attention"):
        phase = "context" if family == "context_attention" else "generation"
        df = _table(gpu, "attention", f"{phase}_attention_perf.parquet")
        df = df[df.kv_cache_dtype == KV[kernel]]
        share = df.kernel_source.value_counts(normalize=True)
        df = _sample(df[df.kernel_source.isin(share[share >= 0.05].index)])
        w = c(df, "window_size") if "window_size" in df else 0.0
        args = (c(df, "num_heads"), c(df, "num_key_value_heads"), c(df, "head_dim"))
        if phase == "context":
            s = c(df, "isl")
            pred = km.context_attention_ms(c(df, "batch_size"), s, s, *args, kernel, w)
        else:
            pred = km.decode_attention_ms(c(df, "batch_size"), c(df, "step") + 1, *args,
                                          kernel, w)
        return c(df, "latency"), pred
    if family == "moe":
        df = _table(gpu, "moe", "moe_perf.parquet")
        df = df[(df.moe_dtype == MOE_DTYPES[kernel]) & (df.version == df.version.max())]
        df = _sample(df)
        pred = np.concatenate([
            km.moe_ms(kernel, *(c(g, n) for n in ("num_tokens", "hidden_size", "inter_size",
                                                   "topk", "num_experts", "moe_tp_size",
                                                   "moe_ep_size")), imbalance=dist)
            for dist, g in df.groupby("distribution", sort=True)])
        measured = np.concatenate([c(g, "latency")
                                   for _, g in df.groupby("distribution", sort=True)])
        return measured, pred
    if family in ("mla_context", "mla_decode"):
        gemm, _, kv = kernel.partition("/")
        phase = "context" if family == "mla_context" else "generation"
        df = _table(gpu, "mla", f"mla_{phase}_module_perf.parquet")
        df = _sample(df[(df.gemm_type == "bfloat16") & (df.kv_cache_dtype == KV[kv])
                        & (df.mla_dtype == "bfloat16")])
        length = c(df, "isl") if phase == "context" else c(df, "step")
        fn = km.mla_context_ms if phase == "context" else km.mla_decode_ms
        return c(df, "latency"), fn(gemm, c(df, "batch_size"), length, c(df, "num_heads"), kv)
    # comm: the 8-GPU rows
    if kernel == "custom_allreduce":
        df = _table(gpu, "comm", "custom_allreduce_perf.parquet")
        df = df[(df.kernel_source == "vLLM_custom_graph") & (df.num_gpus == 8)]
        return c(df, "latency"), km.allreduce_ms(8, 2.0 * c(df, "message_size"))
    df = _table(gpu, "comm", "nccl_perf.parquet")
    df = df[(df.op_name == NCCL_OPS[kernel]) & (df.num_gpus == 8) & (df.nccl_dtype == "half")]
    fn = getattr(km, f"{kernel}_ms")
    return c(df, "latency"), fn(8, 2.0 * c(df, "message_size"))


SPOT = _spot_rows()


@needs_aic
@pytest.mark.parametrize("gpu,family,kernel", SPOT, ids=[f"{g}-{f}-{k}" for g, f, k in SPOT])
def test_runtime_predictions_match_sampled_measured_rows(gpu, family, kernel):
    measured, predicted = _predict_rows(gpu, family, kernel)
    assert len(measured) > 0
    ape = np.abs(predicted / measured - 1.0)
    key = f"{family}/{kernel}" if family != "comm" else f"comm/{kernel}/8"
    median_bound, p90_bound = _bounds(key)
    assert np.all(np.isfinite(predicted)) and np.all(predicted > 0)
    # The sample's errors stay near the bounds of the full-table fit: the runtime API
    # evaluates what was fitted. (Single rows can be far off: a few kernel paths are
    # pathological, e.g. Triton MoE with 22-wide expert slices on L40S runs 60x slower.)
    assert np.median(ape) <= median_bound + 0.05, np.median(ape)
    assert np.quantile(ape, 0.9) <= p90_bound + 0.15, np.quantile(ape, 0.9)


# --- Reproducibility -----------------------------------------------------------------------------

def _assert_fit_matches(fresh, shipped):
    assert fresh["n"] == shipped["n"]
    assert fresh["kernel_source"] == shipped["kernel_source"]
    assert fresh["median_ape"] == pytest.approx(shipped["median_ape"], abs=0.005)
    for name, value in shipped["params"].items():
        assert fresh["params"][name] == pytest.approx(value, rel=1e-3), name


@needs_aic
def test_refitting_h100_gemm_and_collectives_reproduces_the_shipped_parameters():
    pytest.importorskip("scipy")
    from trilemma.optimizer.perf import fitting

    shipped = DOC["gpus"]["h100_sxm"]["fits"]
    sheet = fitting.read_datasheet(AIC, "h100_sxm")
    checked = 0
    for problem in fitting.gpu_problems(AIC, "h100_sxm"):
        if problem.key in ("gemm/bf16", "gemm/fp8_block") or problem.key.startswith("comm/"):
            _assert_fit_matches(fitting.fit_problem(problem, sheet), shipped[problem.key])
            checked += 1
    assert checked == 2 + 15


@needs_aic
@pytest.mark.slow
def test_the_calibration_script_reproduces_the_shipped_file(tmp_path):
    pytest.importorskip("scipy")
    from trilemma.optimizer.perf import fitting

    out = tmp_path / "calibration.json"
    assert fitting.main(["--aic", str(AIC), "--shared-only", "--out", str(out)]) == 0
    fresh = json.loads(out.read_text())
    assert sorted(fresh["gpus"]) == sorted(DOC["gpus"])
    for gpu, entry in DOC["gpus"].items():
        assert sorted(fresh["gpus"][gpu]["fits"]) == sorted(entry["fits"])
        for key, fit in entry["fits"].items():
            _assert_fit_matches(fresh["gpus"][gpu]["fits"][key], fit)


@pytest.mark.slow
def test_the_sglang_fits_reproduce_from_the_installed_aiconfigurator_tables(tmp_path):
    pytest.importorskip("scipy")
    from trilemma.optimizer.perf import fitting

    try:
        tables = fitting.installed_sglang_tables()
    except InputError:
        pytest.skip("aiconfigurator-core (the [compare] extra) is not installed")
    shipped = DOC["engines"]["sglang"]["gpus"]
    fresh = fitting.fit_engine("sglang", tables, DOC["gpus"])
    assert sorted(fresh["gpus"]) == sorted(shipped)
    for gpu, entry in shipped.items():
        assert sorted(fresh["gpus"][gpu]["fits"]) == sorted(entry["fits"])
        for key, fit in entry["fits"].items():
            _assert_fit_matches(fresh["gpus"][gpu]["fits"][key], fit)


def test_calibrating_without_the_sglang_tables_says_where_to_get_them(tmp_path):
    pytest.importorskip("scipy")
    from trilemma.optimizer.cli import main

    empty = tmp_path / "tables"
    empty.mkdir()
    out = tmp_path / "calibration.json"
    # An empty folder: refused at once, naming the flag and what it lacks; nothing is written.
    assert main(["calibrate", "--aic", str(AIC), "--sglang-tables", str(empty),
                 "--out", str(out)]) == 2
    assert not out.exists()
