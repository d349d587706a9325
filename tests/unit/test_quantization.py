"""Quantization: the support matrix, GEMM formats and kernel keys, parsing, and cited quality."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest

from trilemma.optimizer.catalog import build_quant_quality, gpus, quantization
from trilemma.optimizer.catalog.gpus import Arch
from trilemma.optimizer.catalog.quantization import KvDtype, Precision, QuantRecipe
from trilemma.optimizer.errors import InputError

ALL_GPUS = gpus.all_gpus()
BLACKWELL = {"b200_sxm", "b300_sxm", "gb200", "gb300", "rtx_pro_6000_server"}
EVERY = {g.key for g in ALL_GPUS}
# Where vLLM runs each recipe (the module docstrings cite why).
SUPPORTED = {
    QuantRecipe.BF16: EVERY,
    QuantRecipe.FP8: EVERY - {"a100_sxm", "a100_pcie"},
    QuantRecipe.INT8: EVERY - BLACKWELL,
    QuantRecipe.INT4: EVERY,
    QuantRecipe.NVFP4: BLACKWELL,
    QuantRecipe.MXFP4: EVERY,
}
MATRIX = [(r, g) for r in QuantRecipe for g in ALL_GPUS]
FAMILIES = ["llama3", "qwen3", "qwen2", "qwen2.5", "deepseek_v3", "mixtral", "gpt_oss",
            "kimi_k2", "minimax_m2", "gemma", "llama4", "glm", "never_heard_of_it"]


@pytest.mark.parametrize("recipe,gpu", MATRIX, ids=lambda x: getattr(x, "key", None) or x.value)
def test_the_support_matrix_follows_vllm_kernels(recipe, gpu):
    assert recipe.supported_on(gpu) == (gpu.key in SUPPORTED[recipe])
    reason = recipe.unsupported_reason(gpu)
    assert (reason is None) == recipe.supported_on(gpu)
    if reason is not None:
        assert recipe.value in reason and gpu.name in reason


@pytest.mark.parametrize("gpu", ALL_GPUS, ids=lambda g: g.key)
def test_fp4_recipes_run_natively_only_on_blackwell(gpu):
    assert QuantRecipe.NVFP4.supported_on(gpu) == (gpu.arch is Arch.BLACKWELL)
    if QuantRecipe.MXFP4.supported_on(gpu):
        native = QuantRecipe.MXFP4.compute_precision(gpu) is Precision.FP4
        assert native == (gpu.arch is Arch.BLACKWELL)


def test_a100_cannot_run_fp8_and_says_what_to_use_instead():
    reason = QuantRecipe.FP8.unsupported_reason(gpus.get_gpu("a100"))
    assert reason is not None
    assert "sm89" in reason and "Marlin" in reason and "bf16 or int4" in reason


def test_int8_on_blackwell_is_refused_citing_the_vllm_kernel_gap():
    reason = QuantRecipe.INT8.unsupported_reason(gpus.get_gpu("b200"))
    assert reason is not None and "25935" in reason


@pytest.mark.parametrize(
    "recipe,gpu,precision,key",
    [
        (QuantRecipe.BF16, "h100", Precision.BF16, "bf16"),
        (QuantRecipe.FP8, "h100", Precision.FP8, "fp8"),
        (QuantRecipe.FP8, "l40s", Precision.FP8, "fp8"),
        (QuantRecipe.FP8, "mi300x", Precision.FP8, "fp8"),
        (QuantRecipe.INT8, "a100", Precision.INT8, "int8"),
        (QuantRecipe.INT4, "a100", Precision.BF16, "w4a16"),
        (QuantRecipe.INT4, "b200", Precision.BF16, "w4a16"),
        (QuantRecipe.NVFP4, "b200", Precision.FP4, "fp4"),
        (QuantRecipe.NVFP4, "rtx_pro_6000", Precision.FP4, "fp4"),
        (QuantRecipe.MXFP4, "b200", Precision.FP4, "fp4"),
        (QuantRecipe.MXFP4, "gb200", Precision.FP4, "fp4"),
        (QuantRecipe.MXFP4, "h100", Precision.BF16, "w4a16"),
        (QuantRecipe.MXFP4, "a100", Precision.BF16, "w4a16"),
        (QuantRecipe.MXFP4, "mi300x", Precision.BF16, "w4a16"),
    ],
)
def test_compute_precision_and_gemm_kernel_key_per_gpu(recipe, gpu, precision, key):
    hw = gpus.get_gpu(gpu)
    assert recipe.compute_precision(hw) is precision
    assert recipe.gemm_kernel_key(hw) == key
    assert hw.supports(precision)  # the GEMM runs in a format the GPU has


@pytest.mark.parametrize("recipe,gpu", [(QuantRecipe.FP8, "a100"), (QuantRecipe.NVFP4, "h100"),
                                        (QuantRecipe.INT8, "b200")])
def test_asking_how_an_unsupported_recipe_computes_raises_input_error(recipe, gpu):
    for ask in (recipe.compute_precision, recipe.gemm_kernel_key):
        with pytest.raises(InputError) as err:
            ask(gpus.get_gpu(gpu))
        assert err.value.field == "quant" and err.value.value == recipe.value
        assert "not supported" in err.value.why


@pytest.mark.parametrize(
    "recipe,weight_bytes,precision",
    [
        (QuantRecipe.BF16, 2.0, Precision.BF16),
        (QuantRecipe.FP8, 1.0, Precision.FP8),
        (QuantRecipe.INT8, 1.0, Precision.INT8),
        (QuantRecipe.INT4, 0.5 + 2 / 128 + 0.5 / 128, Precision.INT4),
        (QuantRecipe.NVFP4, 0.5 + 1 / 16, Precision.FP4),
        (QuantRecipe.MXFP4, 0.5 + 1 / 32, Precision.FP4),
    ],
)
def test_weight_bytes_include_the_formats_scales(recipe, weight_bytes, precision):
    assert recipe.weight_bytes == pytest.approx(weight_bytes)
    assert recipe.weight_precision is precision
    assert recipe.weight_bytes >= precision.bytes


@pytest.mark.parametrize(
    "precision,nbytes", [(Precision.BF16, 2), (Precision.FP8, 1), (Precision.INT8, 1),
                         (Precision.FP4, 0.5), (Precision.INT4, 0.5)]
)
def test_a_precision_knows_its_bytes_and_its_rate_table_key(precision, nbytes):
    assert precision.bytes == nbytes
    assert precision.key == precision.value


def test_a_precision_indexes_a_gpu_rate_table_directly():
    h100 = gpus.get_gpu("h100")
    assert h100.supports(Precision.FP8)
    assert h100.dense_flops[Precision.FP8] == h100.dense_flops["fp8"]


def test_recipe_values_are_the_cli_spellings_in_checkpoint_matching_order():
    # perf/ picks a checkpoint's recipe by prefix in this order ("fp8_block" -> fp8).
    assert [r.value for r in QuantRecipe] == ["bf16", "fp8", "int8", "int4", "nvfp4", "mxfp4"]


@pytest.mark.parametrize("gpu", ALL_GPUS, ids=lambda g: g.key)
def test_fp8_kv_cache_needs_fp8_hardware_and_bf16_kv_runs_everywhere(gpu):
    assert KvDtype.BF16.supported_on(gpu)
    assert KvDtype.FP8.supported_on(gpu) == (gpu.arch is not Arch.AMPERE)


def test_kv_dtypes_know_their_bytes_and_parse_from_cli_values():
    assert (KvDtype.BF16.bytes, KvDtype.FP8.bytes) == (2.0, 1.0)
    assert KvDtype("fp8") is KvDtype.FP8


@pytest.mark.parametrize(
    "text,recipe",
    [("fp8", QuantRecipe.FP8), ("FP8", QuantRecipe.FP8), (" nvfp4 ", QuantRecipe.NVFP4),
     ("bf16", QuantRecipe.BF16), ("bfloat16", QuantRecipe.BF16), ("awq", QuantRecipe.INT4),
     ("GPTQ", QuantRecipe.INT4), ("mxfp4", QuantRecipe.MXFP4)],
)
def test_parse_recipe_accepts_cli_values_and_common_names(text, recipe):
    assert quantization.parse_recipe(text) is recipe


@pytest.mark.parametrize("text", ["fp16", "int2", "", "w8a8"])
def test_parse_recipe_rejects_unknown_text_listing_the_valid_values(text):
    with pytest.raises(InputError) as err:
        quantization.parse_recipe(text, field="spec.quant")
    assert err.value.field == "spec.quant" and err.value.value == text
    assert all(r.value in err.value.why for r in QuantRecipe)


# ---- quality ---------------------------------------------------------------------------------

TABLE = quantization.load_quality_raw()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("recipe", list(QuantRecipe), ids=lambda r: r.value)
def test_every_recipe_has_a_cited_quality_delta_for_every_family(recipe, family):
    delta = quantization.quality_delta(recipe, family)
    assert math.isfinite(delta.points) and -10.0 < delta.points <= 1.0
    assert delta.source


def test_bf16_costs_nothing():
    delta = quantization.quality_delta(QuantRecipe.BF16, "llama3")
    assert delta.points == 0.0 and not delta.fallback


def test_a_family_with_published_rows_gets_their_mean():
    delta = quantization.quality_delta(QuantRecipe.FP8, "llama3")
    family = TABLE["recipes"]["fp8"]["families"]["llama3"]
    assert not delta.fallback and delta.rows == len(family["rows"]) > 1
    assert delta.points == family["points"]
    assert "huggingface.co" in delta.source


@pytest.mark.parametrize("family", ["qwen3", "mixtral", "gemma", "glm", "some_new_family"])
def test_a_family_without_rows_falls_back_to_the_recipes_cross_family_median(family):
    delta = quantization.quality_delta(QuantRecipe.INT4, family)
    assert delta.fallback
    assert delta.points == TABLE["recipes"]["int4"]["fallback"]["points"]
    assert family in delta.source and "median" in delta.source


@pytest.mark.parametrize("spelling", ["llama3.1", "Llama3", "LLAMA3.3", "llama-3.1"])
def test_family_spellings_are_normalized_before_lookup(spelling):
    assert quantization.normalize_family(spelling) == "llama3"
    assert quantization.quality_delta(QuantRecipe.FP8, spelling).fallback is False


def test_family_alias_keys_are_written_as_normalization_leaves_them():
    for alias, family in TABLE["family_aliases"].items():
        assert quantization.normalize_family(alias) == family


@pytest.mark.parametrize(
    "recipe,family",
    [(QuantRecipe.MXFP4, "gpt_oss"), (QuantRecipe.MXFP4, "gpt-oss-120b"),
     (QuantRecipe.FP8, "deepseek_v3"), (QuantRecipe.FP8, "minimax_m2"),
     (QuantRecipe.INT4, "kimi_k2"), (QuantRecipe.INT4, "kimi_k25")],
)
def test_a_family_released_in_a_format_costs_nothing_in_that_format(recipe, family):
    delta = quantization.quality_delta(recipe, family)
    assert delta.points == 0.0 and not delta.fallback
    assert "released in" in delta.source and "AIConfigurator" in delta.source


def test_formats_nobody_published_on_use_a_labelled_4_bit_proxy():
    for recipe in (QuantRecipe.NVFP4, QuantRecipe.MXFP4):
        delta = quantization.quality_delta(recipe, "llama3")
        assert delta.fallback and "proxy" in delta.source


def _rows():
    for recipe, entry in TABLE["recipes"].items():
        for family, fam in entry["families"].items():
            for row in fam["rows"]:
                yield recipe, family, row


@pytest.mark.parametrize("recipe,family,row", list(_rows()),
                         ids=lambda x: x if isinstance(x, str) else None)
def test_every_quality_row_is_cited_and_shows_its_derivation(recipe, family, row):
    assert row["source"] and row["derivation"] and row["benchmark"]
    assert -10.0 < row["delta"] < 5.0


@pytest.mark.parametrize("recipe", TABLE["recipes"])
def test_family_points_are_the_mean_of_their_rows_and_the_fallback_their_median(recipe):
    entry = TABLE["recipes"][recipe]
    means = []
    for fam in entry["families"].values():
        assert fam["points"] == pytest.approx(statistics.mean(r["delta"] for r in fam["rows"]),
                                              abs=1e-3)
        means.append(fam["points"])
    if means:
        assert entry["fallback"]["points"] == pytest.approx(statistics.median(means), abs=1e-3)


def test_every_excluded_row_says_why():
    assert TABLE["excluded_rows"]
    for row in TABLE["excluded_rows"]:
        assert row["why"] and row["source"]


@pytest.mark.skipif(not build_quant_quality.DEFAULT_CSV.is_file(),
                    reason="../shared/data/validation/quant_quality.csv not present")
def test_the_shipped_quality_table_is_what_the_builder_makes_from_the_csv():
    shipped = Path(build_quant_quality.OUTPUT).read_text(encoding="utf-8")
    rebuilt = build_quant_quality.render(build_quant_quality.build(build_quant_quality.DEFAULT_CSV))
    assert shipped == rebuilt, "rerun: python -m trilemma.optimizer.catalog.build_quant_quality"
