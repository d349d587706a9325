"""Model quality: the bundled MMLU-Pro table is cited and covers every bundled model, and
quality() adds the catalog's quantization delta to the base score."""

from __future__ import annotations

import re

import pytest

from trilemma.optimizer import spec
from trilemma.optimizer.catalog import models as catalog_models
from trilemma.optimizer.catalog.quantization import QuantRecipe, quality_delta
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.spec import models as spec_models

RAW = spec_models.load_quality_raw()
CITATION = re.compile(r"https?://|arXiv:\d{4}\.\d{4,5}")


def test_every_bundled_model_is_scored_or_omitted_with_a_reason():
    scored, omitted = set(RAW["models"]), set(RAW["omitted"])
    assert not scored & omitted
    assert scored | omitted == set(catalog_models.bundled_models())
    assert all(str(why).strip() for why in RAW["omitted"].values())


@pytest.mark.parametrize("model_id", [k for k, v in RAW["models"].items() if "same_as" not in v])
def test_every_score_is_a_cited_percentage(model_id):
    entry = RAW["models"][model_id]
    assert 0 < entry["score"] <= 100
    assert CITATION.search(entry["source"]), entry["source"]
    for key in ("checkpoint", "mode", "setting"):
        assert entry[key]


@pytest.mark.parametrize("model_id", [k for k, v in RAW["models"].items() if "same_as" in v])
def test_a_same_as_entry_points_at_a_scored_model_of_the_same_family(model_id):
    target = RAW["models"][model_id]["same_as"]
    assert "score" in RAW["models"][target]
    assert (catalog_models.load_model(model_id).family
            == catalog_models.load_model(target).family)
    assert spec.base_quality(model_id).score == RAW["models"][target]["score"]


@pytest.mark.parametrize(("model_id", "score"), [
    ("deepseek-ai/DeepSeek-V3", 75.9),
    ("deepseek-ai/DeepSeek-R1", 84.0),
    ("meta-llama/Llama-3.1-70B", 66.4),
    ("meta-llama/Llama-3.1-405B", 73.3),
    ("Qwen/Qwen3-235B-A22B-FP8", 75.2),
    ("meta-llama/Llama-4-Maverick-17B-128E-Instruct", 80.5),
])
def test_the_table_gives_the_published_score(model_id, score):
    found = spec.base_quality(model_id)
    assert found.score == score
    assert found.benchmark == "MMLU-Pro"


def test_a_lookup_accepts_the_catalogs_id_spellings():
    assert spec.base_quality("deepseek-ai--deepseek-v3").score == 75.9


@pytest.mark.parametrize(("model_id", "recipe"), [
    ("deepseek-ai/DeepSeek-V3", QuantRecipe.BF16),
    ("deepseek-ai/DeepSeek-V3", QuantRecipe.FP8),
    ("deepseek-ai/DeepSeek-V3", QuantRecipe.NVFP4),
    ("meta-llama/Llama-3.1-70B", QuantRecipe.FP8),
    ("meta-llama/Llama-3.1-70B", QuantRecipe.INT4),
    ("Qwen/Qwen3-30B-A3B", QuantRecipe.INT4),
])
def test_quality_is_the_base_score_plus_the_quantization_delta(model_id, recipe):
    family = catalog_models.load_model(model_id).family
    expected = spec.base_quality(model_id).score + quality_delta(recipe, family).points
    assert spec.quality(model_id, recipe) == pytest.approx(expected)


def test_quantizing_a_bf16_model_costs_points_and_its_release_format_costs_none():
    llama = "meta-llama/Llama-3.1-70B"
    assert spec.quality(llama, QuantRecipe.BF16) == 66.4
    assert spec.quality(llama, QuantRecipe.INT4) < 66.4
    assert spec.quality("deepseek-ai/DeepSeek-V3", QuantRecipe.FP8) == 75.9  # released in fp8


def test_a_score_in_the_spec_wins_over_the_table():
    choice = spec.ModelChoice(id="meta-llama/Llama-3.1-70B",
                              quality={"score": 70.0, "source": "own eval"})
    assert choice.base_quality().score == 70.0
    delta = quality_delta(QuantRecipe.INT4, "llama3").points
    assert choice.quality_at(QuantRecipe.INT4) == pytest.approx(70.0 + delta)


def test_a_model_without_a_published_score_asks_for_one():
    with pytest.raises(InputError, match=r"give quality: \{score, source\}") as caught:
        spec.base_quality("openai/gpt-oss-120b")
    assert "MMLU, not MMLU-Pro" in caught.value.why


def test_a_quality_floor_needs_one_benchmark_across_candidates():
    raw = {
        "models": [{"id": "deepseek-ai/DeepSeek-V3"},
                   {"id": "Qwen/Qwen2.5-Coder-14B-Instruct",
                    "quality": {"score": 60, "source": "x", "benchmark": "HumanEval"}}],
        "workload": {"promptTokens": {"kind": "fixed", "value": 100},
                     "outputTokens": {"kind": "fixed", "value": 10},
                     "arrivals": {"kind": "poisson", "requestsPerSecond": 1}},
        "slo": {"qualityFloor": 50},
        "hardware": {"gpus": [{"gpu": "h200", "count": 8}]},
    }
    with pytest.raises(spec.SpecError, match="one benchmark; got HumanEval, MMLU-Pro"):
        spec.parse_spec(raw)
    raw["slo"] = {}
    assert len(spec.parse_spec(raw).candidates) == 2
