"""Requests longer than a model's context window are never planned for it (issue: a
Qwen3-32B plan for 100k-token prompts rendered --max-model-len 40960, which refuses them)."""

from __future__ import annotations

import copy
from typing import Any

import pydantic
import pytest

from trilemma.operator.resources import DriftThresholds
from trilemma.optimizer.catalog import load_model
from trilemma.optimizer.perf import memory
from trilemma.optimizer.perf.engine import engine_facts
from trilemma.optimizer.search import SearchSettings, plan
from trilemma.optimizer.search.space import CONTEXT_HEADROOM, enumerate_space, model_len
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
    # p99 x headroom exceeds Llama-3.1-8B's 131,072 tokens: the window is deployed.
    assert result.recommended.config.worker.max_model_len == 131072


# --- the deployed limit leaves headroom above the planned p99 (issue #13 item 5) -----------

def small_request(**workload: Any) -> PlanRequest:
    wl = {**LONG["workload"], "promptTokens": {"kind": "lognormal", "mean": 3000, "p90": 6000},
          **workload}
    return PlanRequest.model_validate(request(model={"id": "meta-llama/Llama-3.1-8B"},
                                              workload=wl))


def test_the_deployed_limit_is_p99_times_headroom_in_whole_kv_blocks_within_the_window():
    req = small_request()
    space = enumerate_space(req, SearchSettings(workers=1))
    p99 = req.longest_request_tokens()
    block = engine_facts().block_size
    assert block == 16 and space.rows
    for rows in space.rows:
        limit = rows.group.max_model_len
        assert limit is not None
        assert limit >= (p99 + rows.group.spec.k) * CONTEXT_HEADROOM
        assert limit % block == 0
        assert limit <= rows.group.arch.max_position_embeddings
        assert limit - (p99 + rows.group.spec.k) * CONTEXT_HEADROOM < block


def test_every_surviving_row_holds_one_sequence_of_the_deployed_limit():
    # vLLM refuses to start when one --max-model-len sequence's KV exceeds the cache: the
    # memory check must size for the deployed value, not the p99 it was derived from.
    space = enumerate_space(small_request(), SearchSettings(workers=1))
    for rows in space.rows:
        g = rows.group
        mem = memory.breakdown(g.arch, g.gpu, g.quant, g.kv, engine_facts(g.engine),
                               tp=rows.tp, pp=rows.pp, dp=rows.dp, seq_len=g.max_model_len,
                               max_batched_tokens=rows.max_num_batched_tokens,
                               max_num_seqs=rows.max_num_seqs)
        assert bool(mem.fits.all())


def test_a_p99_near_the_window_gets_the_window():
    arch = load_model("meta-llama/Llama-3.1-8B")
    window = arch.max_position_embeddings
    assert model_len(arch, 0.9 * window) == window
    assert model_len(arch, window) == window
    assert model_len(arch, 1000) == 1504   # 1,500 rounded up to whole 16-token blocks


def test_the_headroom_covers_a_length_shift_the_operator_replans_on():
    # A shift that crosses the operator's default drift threshold must still be served, or
    # the requests that show the drift are refused before any metric counts them.
    assert 1.0 + DriftThresholds().prompt_tokens < CONTEXT_HEADROOM


def test_the_limit_of_a_plan_is_deterministic():
    settings = SearchSettings(workers=1, simulate_top_k=1, simulate_front=1,
                              simulate_requests=200)
    first, second = plan(small_request(), settings=settings), plan(small_request(),
                                                                  settings=settings)
    a, b = first.recommended.config, second.recommended.config
    assert a.worker.max_model_len == b.worker.max_model_len
    assert a.layout_hash() == b.layout_hash()
