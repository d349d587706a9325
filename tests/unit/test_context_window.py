"""Requests longer than a model's context window are never planned for it (issue: a
Qwen3-32B plan for 100k-token prompts rendered --max-model-len 40960, which refuses them)."""

from __future__ import annotations

import copy
from typing import Any

import pydantic
import pytest

from trilemma.optimizer.search import SearchSettings, plan
from trilemma.optimizer.spec import PlanRequest
from trilemma.optimizer.spec.loading import spec_error_to_input_error

LONG: dict[str, Any] = {
    "workload": {"promptTokens": {"kind": "lognormal", "mean": 100000, "p90": 110000},
                 "outputTokens": {"kind": "lognormal", "mean": 400, "p90": 800},
                 "arrivals": {"kind": "poisson", "requestsPerSecond": 0.5}},
    "hardware": {"gpus": [{"gpu": "h100_sxm", "count": 16}]},
    "bounds": {"allowDisaggregation": False, "engines": ["vllm"]},
}


def request(**changes: Any) -> dict[str, Any]:
    raw = copy.deepcopy(LONG)
    raw.update(changes)
    return raw


def test_a_workload_beyond_every_candidates_window_is_refused_naming_windows_and_share():
    raw = request(model={"id": "Qwen/Qwen3-32B"})
    with pytest.raises(pydantic.ValidationError) as caught:
        PlanRequest.model_validate(raw)
    err = spec_error_to_input_error(caught.value, raw)
    text = str(err)
    assert "workload.promptTokens" in text
    assert "Qwen/Qwen3-32B: 40,960 tokens" in text
    assert "100.0% of requests longer" in text
    assert "YaRN" in text


def test_the_share_counts_only_the_requests_that_do_not_fit():
    # Prompts around the window: some fit, more than 1% do not.
    raw = request(model={"id": "Qwen/Qwen3-32B"}, workload={
        **LONG["workload"], "promptTokens": {"kind": "lognormal", "mean": 30000, "p90": 40000}})
    with pytest.raises(pydantic.ValidationError) as caught:
        PlanRequest.model_validate(raw)
    share = str(caught.value).split("40,960 tokens, ")[1].split("%")[0]
    assert 1.0 < float(share) < 50.0


def test_requests_within_the_window_are_planned_as_before():
    PlanRequest.model_validate(request(model={"id": "meta-llama/Llama-3.1-8B"}))


def test_a_candidate_whose_window_is_too_short_is_dropped_from_the_search():
    req = PlanRequest.model_validate(request(
        models=[{"id": "Qwen/Qwen3-32B"}, {"id": "meta-llama/Llama-3.1-8B"}]))
    result = plan(req, settings=SearchSettings(workers=1, simulate_top_k=1, simulate_front=1,
                                               simulate_requests=200))
    assert result.recommended.config.model == "meta-llama/Llama-3.1-8B"
    assert {c.config.model for c in result.front} == {"meta-llama/Llama-3.1-8B"}
    assert result.counts.pruned["context"] > 0
    assert result.recommended.config.worker.max_model_len >= req.longest_request_tokens()
