"""The exported JSON schema is self-contained and documented, as the CRD generator needs."""

from __future__ import annotations

import json
from typing import Any

import pytest

from trilemma.optimizer import spec

MODELS = [spec.PlanRequest, spec.HardwarePool, spec.Workload, spec.Slo]


def _nodes(node: Any, path: str = "$"):
    yield path, node
    if isinstance(node, dict):
        for key, child in node.items():
            yield from _nodes(child, f"{path}.{key}")
    elif isinstance(node, list):
        for i, child in enumerate(node):
            yield from _nodes(child, f"{path}[{i}]")


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_the_schema_has_no_refs_or_defs(model):
    text = json.dumps(spec.spec_json_schema(model))
    assert "$ref" not in text
    assert "$defs" not in text


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_optional_fields_are_not_nullable_unions(model):
    for path, node in _nodes(spec.spec_json_schema(model)):
        if isinstance(node, dict):
            assert node.get("type") != "null", path
            assert "const" not in node, path


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_every_property_has_a_description(model):
    for path, node in _nodes(spec.spec_json_schema(model)):
        if path.endswith(".properties") and isinstance(node, dict):
            for key, prop in node.items():
                assert prop.get("description"), f"{path}.{key}"


def test_the_schema_uses_camel_case_keys_and_enums():
    schema = spec.spec_json_schema()
    workload = schema["properties"]["workload"]["properties"]
    assert {"promptTokens", "outputTokens", "peakFactor", "outputPredictability"} <= set(workload)
    assert schema["properties"]["objective"]["enum"] == [
        "min_cost", "max_throughput", "min_latency", "balanced"]
    gpu = schema["properties"]["hardware"]["properties"]["gpus"]["items"]["properties"]
    assert gpu["nodeSelector"]["additionalProperties"] == {"type": "string"}
    assert gpu["tolerations"]["items"]["properties"]["operator"]["enum"] == ["Equal", "Exists"]


def test_openapi_v3_mode_writes_exclusive_bounds_as_booleans():
    plain = spec.spec_json_schema(spec.Slo)["properties"]["maxCostPerHour"]
    v3 = spec.spec_json_schema(spec.Slo, openapi_v3=True)["properties"]["maxCostPerHour"]
    assert plain["exclusiveMinimum"] == 0 and "minimum" not in plain
    assert v3["exclusiveMinimum"] is True and v3["minimum"] == 0


def test_a_tagged_union_keeps_its_discriminator_without_dangling_refs():
    prompt = spec.spec_json_schema()["properties"]["workload"]["properties"]["promptTokens"]
    assert prompt["discriminator"] == {"propertyName": "kind"}
    kinds = [branch["properties"]["kind"]["enum"] for branch in prompt["oneOf"]]
    assert kinds == [["fixed"], ["lognormal"], ["histogram"]]
