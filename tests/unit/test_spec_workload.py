"""Workloads: cached tokens, design rate, request sampling, arrival processes and traces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydantic
import pytest

from trilemma.optimizer import spec
from trilemma.optimizer.errors import InputError


def workload(**changes) -> spec.Workload:
    raw = {
        "promptTokens": {"kind": "fixed", "value": 5000},
        "outputTokens": {"kind": "fixed", "value": 500},
        "prefix": {"sharedTokens": 1500, "hitRate": 0.8},
        "arrivals": {"kind": "poisson", "requestsPerSecond": 4},
        "peakFactor": 1.5,
    }
    raw.update(changes)
    return spec.Workload.model_validate({k: v for k, v in raw.items() if v is not None})


def test_expected_cached_tokens_is_hit_rate_times_the_covered_prefix():
    assert workload().expected_cached_tokens() == pytest.approx(0.8 * 1500)
    assert workload().expected_uncached_prompt_tokens() == pytest.approx(5000 - 1200)


def test_a_prefix_cannot_cover_more_than_a_short_prompt():
    w = workload(promptTokens={"kind": "histogram", "values": [1000, 9000], "weights": [1, 1]},
                 prefix={"sharedTokens": 2000, "hitRate": 1.0})
    assert w.expected_cached_tokens() == pytest.approx(0.5 * 1000 + 0.5 * 2000)


def test_no_prefix_means_nothing_cached():
    assert workload(prefix=None).expected_cached_tokens() == 0


def test_the_design_rate_is_the_mean_rate_times_the_peak_factor():
    w = workload()
    assert w.mean_rate() == 4
    assert w.design_rate() == pytest.approx(6)


def test_request_samples_are_deterministic_and_match_the_expected_cache_hits():
    w = workload(promptTokens={"kind": "lognormal", "mean": 5000, "p90": 9000})
    a = w.sample(20_000, np.random.default_rng(11))
    b = w.sample(20_000, np.random.default_rng(11))
    for field in ("prompt_tokens", "output_tokens", "cached_tokens"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert (a.cached_tokens <= a.prompt_tokens).all()
    assert a.cached_tokens.mean() == pytest.approx(w.expected_cached_tokens(), rel=0.03)


@pytest.mark.parametrize("cv", [0.5, 1.0, 3.0])
def test_gamma_gaps_have_the_requested_rate_and_burstiness(cv):
    arrivals = spec.GammaArrivals(kind="gamma", requests_per_second=10, cv=cv)
    gaps = arrivals.sample_gaps(50_000, np.random.default_rng(5))
    assert gaps.mean() == pytest.approx(0.1, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.05)


def test_poisson_gaps_are_exponential_at_the_rate():
    gaps = spec.PoissonArrivals(kind="poisson", requests_per_second=4).sample_gaps(
        50_000, np.random.default_rng(6))
    assert gaps.mean() == pytest.approx(0.25, rel=0.02)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.03)


# --- traces ------------------------------------------------------------------------------

TRACE = "timestamp,prompt,output,prefix\n0,1000,100,800\n1,3000,50,800\n4,1000,80,0\n"


def trace_workload(tmp_path: Path, text: str = TRACE, **extra) -> spec.Workload:
    (tmp_path / "trace.csv").write_text(text)
    raw = {"arrivals": {"kind": "trace", "path": "trace.csv"}, **extra}
    return spec.Workload.model_validate(raw, context={"base_dir": tmp_path})


def test_a_trace_gives_rate_lengths_and_cache_hits(tmp_path):
    w = trace_workload(tmp_path)
    assert w.mean_rate() == pytest.approx(2 / 4)
    assert w.prompt_distribution().mean_tokens() == pytest.approx(5000 / 3)
    assert w.output_distribution().p50_tokens() == 80
    assert w.expected_cached_tokens() == pytest.approx(1600 / 3)


def test_a_trace_is_resampled_by_row(tmp_path):
    s = trace_workload(tmp_path).sample(500, np.random.default_rng(0))
    rows = {(1000, 100, 800), (3000, 50, 800), (1000, 80, 0)}
    assert set(zip(s.prompt_tokens.tolist(), s.output_tokens.tolist(),
                   s.cached_tokens.tolist(), strict=True)) == rows


def test_a_trace_without_a_prefix_column_caches_nothing(tmp_path):
    w = trace_workload(tmp_path, "timestamp,prompt,output\n0,10,1\n2,20,2\n")
    assert w.expected_cached_tokens() == 0


@pytest.mark.parametrize("key", ["promptTokens", "outputTokens", "prefix"])
def test_a_trace_and_synthetic_lengths_together_are_rejected(tmp_path, key):
    extra = {"prefix": {"sharedTokens": 10, "hitRate": 1}} if key == "prefix" else {
        key: {"kind": "fixed", "value": 10}}
    with pytest.raises(pydantic.ValidationError, match=f"a trace gives {key} per request"):
        trace_workload(tmp_path, **extra)


@pytest.mark.parametrize(("text", "where", "why"), [
    ("time,prompt,output\n0,1,1\n1,1,1\n", "", "header must be timestamp,prompt,output"),
    ("timestamp,prompt,output\n0,1,1\n", "", "at least 2 requests"),
    ("timestamp,prompt,output\n0,1,1\n2,0,1\n", ":3", "prompt must be >= 1"),
    ("timestamp,prompt,output\n0,1,1\n2,1.5,1\n", ":3", "whole number"),
    ("timestamp,prompt,output\n0,1,1\n2,1\n", ":3", "expected 3 columns"),
    ("timestamp,prompt,output\n5,1,1\n2,1,1\n", ":3", "must not decrease"),
    ("timestamp,prompt,output\n1,1,1\n1,1,1\n", "", "all timestamps equal"),
    ("timestamp,prompt,output,prefix\n0,10,1,11\n1,10,1,0\n", ":2", "prefix must not exceed"),
    ("timestamp,prompt,output\n0,1,1\nnan,1,1\n", ":3", "must be finite"),
])
def test_a_bad_trace_is_an_input_error_naming_file_and_line(tmp_path, text, where, why):
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(InputError) as caught:
        spec.load_trace(path)
    assert caught.value.field == f"{path.resolve()}{where}"
    assert why in caught.value.why
