"""Spec documents: the three case studies parse, both key spellings work, files load or fail
with an InputError naming the file."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pydantic
import pytest
import yaml

from trilemma.optimizer import spec
from trilemma.optimizer.catalog.quantization import QuantRecipe
from trilemma.optimizer.catalog.speculation import SpecMethod
from trilemma.optimizer.errors import InputError

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "spec"
MODELS = Path(__file__).resolve().parents[2] / "optimizer" / "catalog" / "data" / "models"

# (fixture, model, mean prompt tokens, mean output tokens, mean cached tokens)
CASE_STUDIES = [
    ("code_completion.yaml", "deepseek-ai/DeepSeek-V3", 120_000, 400, 116_000),
    ("code_rewriting.yaml", "Qwen/Qwen2.5-Coder-14B-Instruct", 2_500, 1_500, 0),
    ("chatbot.yaml", "deepseek-ai/DeepSeek-V3", 5_000, 500, 1_500),
]


@pytest.mark.parametrize(("name", "model", "prompt", "output", "cached"), CASE_STUDIES)
def test_each_case_study_parses_with_its_published_shape(name, model, prompt, output, cached):
    request = spec.load_spec(FIXTURES / name)
    workload = request.workload
    assert [m.id for m in request.candidates] == [model]
    assert workload.prompt_distribution().mean_tokens() == pytest.approx(prompt, rel=0.03)
    assert workload.output_distribution().mean_tokens() == pytest.approx(output, rel=0.03)
    assert workload.expected_cached_tokens() == pytest.approx(cached, rel=0.03, abs=1)


def test_code_rewriting_is_highly_predictable_and_bounds_speculation():
    request = spec.load_spec(FIXTURES / "code_rewriting.yaml")
    assert request.workload.output_predictability >= 0.9
    assert request.bounds.speculation == [SpecMethod.NONE, SpecMethod.NGRAM, SpecMethod.EAGLE3]
    assert request.slo.effective_tpot_p50_ms == pytest.approx(1000 / 80)


def test_code_completion_sizes_for_its_peak_and_keeps_kubernetes_placement():
    request = spec.load_spec(FIXTURES / "code_completion.yaml")
    assert request.workload.design_rate() == pytest.approx(2.0 * 2.0)
    b200 = request.hardware.group("b200")
    assert b200.gpu == "b200_sxm"
    assert b200.node_selector == {"nvidia.com/gpu.product": "NVIDIA-B200"}
    assert b200.tolerations[0].operator is spec.TolerationOperator.EXISTS
    assert request.bounds.quantizations == [QuantRecipe.FP8, QuantRecipe.NVFP4]
    assert request.api_version == spec.API_VERSION and request.kind == spec.KIND


def _snake(node: Any) -> Any:
    """The same document with every key in snake_case (string map keys kept as written)."""
    if isinstance(node, list):
        return [_snake(item) for item in node]
    if not isinstance(node, dict):
        return node
    return {re.sub(r"(?<!^)(?=[A-Z])", "_", k).lower():
            (v if k == "nodeSelector" else _snake(v)) for k, v in node.items()}


@pytest.mark.parametrize("name", [c[0] for c in CASE_STUDIES])
def test_camel_case_and_snake_case_documents_mean_the_same(name):
    raw = yaml.safe_load((FIXTURES / name).read_text())
    snake = _snake(raw)
    assert snake != raw
    assert spec.parse_spec(snake) == spec.parse_spec(raw)


@pytest.mark.parametrize("name", [c[0] for c in CASE_STUDIES])
def test_a_dumped_spec_parses_back_to_the_same_spec(name):
    request = spec.load_spec(FIXTURES / name)
    dumped = request.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert spec.parse_spec(dumped) == request
    assert "promptTokens" in dumped["workload"]


def test_specs_are_frozen():
    request = spec.load_spec(FIXTURES / "chatbot.yaml")
    with pytest.raises(pydantic.ValidationError):
        request.objective = spec.Objective.MIN_COST  # type: ignore[misc]


def test_the_header_constants_match_the_accepted_values():
    fields = spec.PlanRequest.model_fields
    assert fields["api_version"].annotation.__args__[0].__args__ == (spec.API_VERSION,)
    assert fields["kind"].annotation.__args__[0].__args__ == (spec.KIND,)


# --- files -------------------------------------------------------------------------------


def test_a_missing_file_is_an_input_error_naming_the_path(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(InputError) as caught:
        spec.load_spec(path)
    assert caught.value.value == str(path)
    assert "file not found" in caught.value.why


@pytest.mark.parametrize(("suffix", "text", "why"), [
    (".yaml", "model: [unclosed\n", "not valid YAML: line"),
    (".yaml", "model: {id: a}\nmodel: {id: b}\n", "duplicate key 'model'"),
    (".json", '{"model": ', "not valid JSON: line 1"),
    (".yaml", "- just\n- a list\n", "top level must be a mapping"),
    (".yaml", "", "top level must be a mapping"),
])
def test_a_malformed_file_is_an_input_error_naming_the_path(tmp_path, suffix, text, why):
    path = tmp_path / f"spec{suffix}"
    path.write_text(text)
    with pytest.raises(InputError) as caught:
        spec.load_spec(path)
    assert why in caught.value.why
    if "mapping" not in why:
        assert caught.value.value == str(path)


def test_a_json_spec_loads_like_its_yaml_twin(tmp_path):
    raw = yaml.safe_load((FIXTURES / "chatbot.yaml").read_text())
    path = tmp_path / "chatbot.json"
    path.write_text(json.dumps(raw))
    assert spec.load_spec(path) == spec.load_spec(FIXTURES / "chatbot.yaml")


def test_a_bad_spec_file_raises_a_spec_error_listing_every_problem(tmp_path):
    raw = yaml.safe_load((FIXTURES / "chatbot.yaml").read_text())
    raw["workload"]["prefix"]["hitRate"] = 3
    raw["hardware"]["gpus"][0]["gpu"] = "h900"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(spec.SpecError) as caught:
        spec.load_spec(path)
    text = str(caught.value)
    assert "workload.prefix.hitRate = 3" in text
    assert "hardware.gpus[0].gpu = 'h900': unknown GPU" in text


TRACE = "timestamp,prompt,output,prefix\n0.0,1000,100,800\n0.5,2000,50,800\n2.0,1500,80,0\n"


def _trace_spec(folder: Path, trace_path: str) -> Path:
    path = folder / "spec.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"id": "meta-llama/Llama-3.1-8B"},
        "workload": {"arrivals": {"kind": "trace", "path": trace_path}},
        "hardware": {"gpus": [{"gpu": "l40s", "count": 2}]},
    }))
    return path


def test_a_trace_path_resolves_against_the_spec_files_folder(tmp_path, monkeypatch):
    folder = tmp_path / "specs"
    (folder / "traces").mkdir(parents=True)
    (folder / "traces" / "day.csv").write_text(TRACE)
    monkeypatch.chdir(tmp_path)  # not the spec's folder
    request = spec.load_spec(_trace_spec(folder, "traces/day.csv"))
    trace_arrivals = request.workload.arrivals
    assert isinstance(trace_arrivals, spec.TraceArrivals)
    assert Path(trace_arrivals.path) == (folder / "traces" / "day.csv").resolve()
    assert request.workload.mean_rate() == pytest.approx(2 / 2.0)


def test_a_trace_error_names_the_file_and_line(tmp_path):
    (tmp_path / "t.csv").write_text(TRACE.replace("0.5,2000,50,800", "0.5,2000,abc,800"))
    with pytest.raises(spec.SpecError) as caught:
        spec.load_spec(_trace_spec(tmp_path, "t.csv"))
    line = caught.value.problems[0]
    assert line.startswith("workload.arrivals.path = ")
    assert "t.csv:3 ('abc'): output must be a number" in line


def test_a_local_config_json_model_resolves_against_the_spec_files_folder(tmp_path, monkeypatch):
    shutil.copy(MODELS / "meta-llama--Llama-3.1-8B.json", tmp_path / "config.json")
    raw = yaml.safe_load((FIXTURES / "chatbot.yaml").read_text())
    raw["model"] = {"id": "config.json", "quality": {"score": 48.3, "source": "test"}}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(FIXTURES)
    request = spec.load_spec(path)
    assert request.model is not None
    assert Path(request.model.id) == (tmp_path / "config.json").resolve()
    assert request.model.arch.family == "llama3"
