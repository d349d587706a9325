"""Every spec rule rejects a bad value with a message naming the key path, the value and the rule.

One valid base document; each case breaks one key and checks the first problem line, which
reads `path.as.written = value: rule`.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest

from trilemma.optimizer import spec
from trilemma.optimizer.errors import InputError

DELETE = object()


def base_document() -> dict[str, Any]:
    """A small valid spec touching every section."""
    return {
        "model": {"id": "deepseek-ai/DeepSeek-V3"},
        "workload": {
            "promptTokens": {"kind": "lognormal", "mean": 5000, "p90": 9000},
            "outputTokens": {"kind": "fixed", "value": 500},
            "prefix": {"sharedTokens": 1500, "hitRate": 0.8},
            "arrivals": {"kind": "poisson", "requestsPerSecond": 4},
            "peakFactor": 1.5,
            "outputPredictability": 0.5,
        },
        "slo": {
            "ttftMs": {"p50": 500, "p90": 1000, "p99": 2000},
            "tpotMs": {"p50": 30, "p99": 80},
            "endToEndMs": {"p99": 60000},
            "minTokensPerSecondPerUser": 20,
            "qualityFloor": 60,
            "maxCostPerHour": 300,
        },
        "hardware": {"gpus": [
            {"gpu": "h100_sxm", "count": 16},
            {"gpu": "a100_sxm", "count": 8, "pricePerGpuHour": 1.8, "gpusPerNode": 8,
             "nodeSelector": {"cloud.example.com/gpu": "a100"},
             "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists",
                              "effect": "NoSchedule"}]},
        ]},
        "objective": "min_cost",
        "bounds": {"quantizations": ["bf16", "fp8"], "kvDtypes": ["bf16"],
                   "maxTensorParallel": 8},
    }


_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def with_(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `doc` with the key at `path` ("a.b[0].c") set to `value`, or deleted."""
    out = copy.deepcopy(doc)
    *parents, last = [int(i) if i else key for key, i in _PART.findall(path)]
    node: Any = out
    for part in parents:
        node = node[part]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return out


def first_problem(doc: dict[str, Any]) -> str:
    with pytest.raises(spec.SpecError) as caught:
        spec.parse_spec(doc)
    return caught.value.problems[0]


def test_the_base_document_is_valid():
    assert spec.parse_spec(base_document()).objective is spec.Objective.MIN_COST


# (key to break, bad value, expected path in the message, expected rule fragment)
CASES = [
    # workload: lengths
    ("workload.promptTokens.mean", 0, "workload.promptTokens.mean", "greater than or equal to 1"),
    ("workload.promptTokens.p90", 4000, "workload.promptTokens.p90", "must exceed the mean"),
    ("workload.promptTokens.p90", 20000, "workload.promptTokens.p90", "no lognormal has p90"),
    ("workload.promptTokens.kind", "weibull", "workload.promptTokens.kind",
     "unknown kind; one of 'fixed', 'lognormal', 'histogram'"),
    ("workload.arrivals.kind", DELETE, "workload.arrivals.kind", "required"),
    ("workload.outputTokens.value", 0, "workload.outputTokens.value", "greater than or equal"),
    ("workload.outputTokens", {"kind": "histogram", "values": [10, 20], "weights": [1]},
     "workload.outputTokens.weights", "need 2 weights"),
    ("workload.outputTokens", {"kind": "histogram", "values": [20, 10], "weights": [1, 1]},
     "workload.outputTokens.values", "strictly increasing"),
    ("workload.outputTokens", {"kind": "histogram", "edges": [1, 10], "weights": [-1]},
     "workload.outputTokens.weights", "not all 0"),
    ("workload.outputTokens", {"kind": "histogram", "weights": [1]},
     "workload.outputTokens.values", "give values (point lengths) or edges"),
    ("workload.outputTokens", {"kind": "histogram", "edges": [0, 10], "weights": [1]},
     "workload.outputTokens.edges[0]", "first edge must be >= 1"),
    ("workload.outputTokens", DELETE, "workload.outputTokens", "required unless arrivals"),
    # workload: prefix, arrivals, peak, predictability
    ("workload.prefix.hitRate", 1.2, "workload.prefix.hitRate", "less than or equal to 1"),
    ("workload.prefix.hitRate", -0.1, "workload.prefix.hitRate", "greater than or equal to 0"),
    ("workload.prefix.sharedTokens", -1, "workload.prefix.sharedTokens", "greater than or eq"),
    ("workload.prefix.sharedTokens", 6000, "workload.prefix.sharedTokens", "mean prompt"),
    ("workload.arrivals.requestsPerSecond", 0, "workload.arrivals.requestsPerSecond",
     "greater than 0"),
    ("workload.arrivals", {"kind": "gamma", "requestsPerSecond": 1, "cv": 0},
     "workload.arrivals.cv", "greater than 0"),
    ("workload.arrivals", {"kind": "trace", "path": "no/such/trace.csv"},
     "workload.arrivals.path", "not readable"),
    ("workload.peakFactor", 0.5, "workload.peakFactor", "greater than or equal to 1"),
    ("workload.outputPredictability", 2, "workload.outputPredictability", "less than or equal"),
    # slo
    ("slo.ttftMs.p50", 0, "slo.ttftMs.p50", "greater than 0"),
    ("slo.ttftMs.p90", 300, "slo.ttftMs.p90", "p50 (500 ms) must not exceed p90"),
    ("slo.ttftMs.p99", 900, "slo.ttftMs.p99", "p90 (1000 ms) must not exceed p99"),
    ("slo.tpotMs", {}, "slo.tpotMs", "at least one of p50, p90, p99"),
    ("slo.endToEndMs.p99", 1500, "slo.endToEndMs.p99", "below ttftMs.p99"),
    ("slo.minTokensPerSecondPerUser", -5, "slo.minTokensPerSecondPerUser", "greater than 0"),
    ("slo.qualityFloor", 101, "slo.qualityFloor", "less than or equal to 100"),
    ("slo.qualityFloor", 99, "slo.qualityFloor", "no candidate reaches the floor"),
    ("slo.maxCostPerHour", 0, "slo.maxCostPerHour", "greater than 0"),
    # hardware
    ("hardware.gpus[0].gpu", "h900", "hardware.gpus[0].gpu", "known: a100_sxm"),
    ("hardware.gpus[0].count", 0, "hardware.gpus[0].count", "greater than or equal to 1"),
    ("hardware.gpus[0].pricePerGpuHour", -2, "hardware.gpus[0].pricePerGpuHour",
     "greater than 0"),
    ("hardware.gpus[0].gpusPerNode", 0, "hardware.gpus[0].gpusPerNode", "greater than or eq"),
    ("hardware.gpus[0].resourceName", "gpu", "hardware.gpus[0].resourceName",
     "<domain>/<name>"),
    ("hardware.gpus[0].nodeSelector", {"bad key!": "x"}, "hardware.gpus[0].nodeSelector",
     "not a valid label key"),
    ("hardware.gpus[1].gpu", "h100", "hardware.gpus[1].gpu", "listed twice"),
    ("hardware.gpus", [], "hardware.gpus", "at least 1 item"),
    ("hardware.gpus[1].tolerations[0].operator", "Maybe",
     "hardware.gpus[1].tolerations[0].operator", "'Equal' or 'Exists'"),
    ("hardware.gpus[1].tolerations[0].value", "x", "hardware.gpus[1].tolerations[0].value",
     "Exists takes no value"),
    ("hardware.gpus[1].tolerations[0].effect", "NoRun",
     "hardware.gpus[1].tolerations[0].effect", "'NoSchedule'"),
    ("hardware.gpus[1].tolerations[0].tolerationSeconds", 30,
     "hardware.gpus[1].tolerations[0].tolerationSeconds", "only to effect NoExecute"),
    ("hardware.gpus[1].tolerations[0]", {"operator": "Equal", "value": "x"},
     "hardware.gpus[1].tolerations[0].key", "Equal needs a key"),
    # models
    ("model.id", "acme/NoSuchModel-7B", "model.id", "config.json"),
    ("model.quality", {"score": 120, "source": "x"}, "model.quality.score", "less than or eq"),
    ("model.quality", {"score": 70, "source": ""}, "model.quality.source", "at least 1"),
    ("model", {"id": "Qwen/Qwen2.5-Coder-14B-Instruct"}, "model.quality",
     "no bundled MMLU-Pro score"),
    ("model", DELETE, "model", "give model (one) or models"),
    ("models", [{"id": "deepseek-ai/DeepSeek-V3"}], "models", "not both"),
    # objective and bounds
    ("objective", "cheapest", "objective", "'min_cost', 'max_throughput'"),
    ("bounds.gpuTypes", ["h100_sxm", "b200"], "bounds.gpuTypes[1]", "not in the hardware pool"),
    ("bounds.gpuTypes", ["h900"], "bounds.gpuTypes[0]", "unknown GPU"),
    ("bounds.quantizations", ["fp7"], "bounds.quantizations[0]", "unknown quantization"),
    ("bounds.quantizations", ["nvfp4"], "bounds.quantizations[0]", "no allowed GPU"),
    ("bounds.quantizations", ["fp8", "fp8"], "bounds.quantizations", "twice"),
    ("bounds.kvDtypes", ["fp4"], "bounds.kvDtypes[0]", "'bf16' or 'fp8'"),
    ("bounds.speculation", ["medusa"], "bounds.speculation[0]", "'eagle3'"),
    ("bounds.engines", ["trtllm"], "bounds.engines[0]", "'vllm' or 'sglang'"),
    ("bounds.maxTensorParallel", 0, "bounds.maxTensorParallel", "greater than or equal to 1"),
    ("bounds.maxPipelineParallel", 0, "bounds.maxPipelineParallel", "greater than or equal"),
    ("bounds.maxReplicas", 0, "bounds.maxReplicas", "greater than or equal to 1"),
    ("bounds.allowDisaggregation", "sometimes", "bounds.allowDisaggregation", "valid boolean"),
    ("apiVersion", "v1", "apiVersion", "'trilemma.dev/v1alpha1'"),
    ("kind", "Deployment", "kind", "'OptimizedEndpoint'"),
]


@pytest.mark.parametrize(("key", "bad", "path", "rule"), CASES,
                         ids=[f"{c[0]}={c[1]!r}"[:60] for c in CASES])
def test_each_rule_rejects_a_bad_value_naming_path_value_and_rule(key, bad, path, rule):
    line = first_problem(with_(base_document(), key, bad))
    assert line.startswith(f"{path} = "), line
    assert rule in line, line
    shown = line.removeprefix(f"{path} = ").split(": ", 1)[0]
    if bad is DELETE:
        assert shown == "(missing)", line
    elif not isinstance(bad, (dict, list)):
        assert str(bad) in shown, line  # 4000 may show as 4000.0, "h100" as 'h100_sxm'



def test_a_lognormal_whose_p90_is_below_its_mean_is_rejected():
    doc = with_(base_document(), "workload.promptTokens", {"kind": "lognormal", "mean": 5000,
                                                           "p90": 4000})
    assert first_problem(doc) == (
        "workload.promptTokens.p90 = 4000.0: p90 must exceed the mean (5000); use kind: fixed "
        "for a constant length")


@pytest.mark.parametrize("rate", [-0.01, 1.01, 7])
def test_a_hit_rate_outside_zero_to_one_is_rejected(rate):
    line = first_problem(with_(base_document(), "workload.prefix.hitRate", rate))
    assert line.startswith(f"workload.prefix.hitRate = {rate!r}: Input should be")


def test_an_unknown_gpu_key_is_rejected_listing_the_known_keys():
    line = first_problem(with_(base_document(), "hardware.gpus[0].gpu", "h900"))
    for key in ("a100_sxm", "h100_sxm", "h200_sxm", "b200_sxm", "mi300x", "l40s"):
        assert key in line


@pytest.mark.parametrize(("where", "key"), [
    ("", "modle"),
    ("workload", "promptTokenz"),
    ("workload.promptTokens", "median"),
    ("workload.prefix", "hits"),
    ("workload.arrivals", "burstiness"),
    ("slo", "ttftP99"),
    ("slo.ttftMs", "p95"),
    ("hardware", "nodes"),
    ("hardware.gpus[0]", "memory"),
    ("hardware.gpus[1].tolerations[0]", "seconds"),
    ("model", "revision"),
    ("bounds", "maxExpertParallel"),
])
def test_unknown_keys_are_rejected_at_every_level(where, key):
    doc = base_document()
    path = f"{where}.{key}" if where else key
    line = first_problem(with_(doc, path, 1))
    assert line.startswith(f"{path} = 1: unknown key"), line


def test_an_unknown_key_message_lists_the_keys_allowed_there():
    line = first_problem(with_(base_document(), "workload.promptTokens.median", 1))
    assert "allowed here: kind, mean, p90" in line


def test_every_problem_is_reported_not_just_the_first():
    doc = with_(base_document(), "slo.maxCostPerHour", 0)
    doc = with_(doc, "hardware.gpus[0].count", 0)
    with pytest.raises(spec.SpecError) as caught:
        spec.parse_spec(doc)
    err = caught.value
    assert len(err.problems) == 2
    assert isinstance(err, InputError)
    assert err.field == "slo.maxCostPerHour" and err.value == 0
    assert "and 1 more problems" in err.why


def test_a_snake_case_document_is_reported_in_snake_case():
    doc = {"model": {"id": "deepseek-ai/DeepSeek-V3"},
           "workload": {"prompt_tokens": {"kind": "fixed", "value": 100},
                        "output_tokens": {"kind": "fixed", "value": 10},
                        "prefix": {"shared_tokens": 500, "hit_rate": 1.0},
                        "arrivals": {"kind": "poisson", "requests_per_second": 1}},
           "hardware": {"gpus": [{"gpu": "h100_sxm", "count": 8}]}}
    assert first_problem(doc).startswith("workload.prefix.shared_tokens = 500: ")
