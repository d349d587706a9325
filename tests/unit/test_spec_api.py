"""The spec package's public names, pinned: growing the API is a decision, not an accident."""

from __future__ import annotations

from trilemma.optimizer import spec

PUBLIC = {
    "API_VERSION", "KIND", "Arrivals", "Engine", "FixedLengths", "GammaArrivals", "GpuGroup",
    "HardwarePool", "HistogramLengths", "LatencyTarget", "LengthDistribution",
    "LognormalLengths", "MAX_P90_OVER_MEAN", "ModelChoice", "Objective", "PlanRequest",
    "PoissonArrivals", "PrefixReuse", "QualityScore", "RequestSample", "SearchBounds", "Slo",
    "SpecError", "SpecModel",
    "TaintEffect", "Toleration", "TolerationOperator", "Trace", "TraceArrivals", "Workload",
    "base_quality", "describe", "load_spec", "load_trace", "parse_spec", "quality",
    "quality_table", "rule_error", "spec_error_to_input_error", "spec_json_schema",
}


def test_the_facade_exports_exactly_the_supported_names():
    assert set(spec.__all__) == PUBLIC
    assert all(hasattr(spec, name) for name in PUBLIC)


def test_the_engine_enum_matches_the_perf_layers():
    from trilemma.optimizer.perf.engine import Engine as PerfEngine

    assert [e.value for e in spec.Engine] == [e.value for e in PerfEngine]


def test_describe_lists_each_problem_as_path_value_rule():
    import pydantic

    raw = {"gpus": [{"gpu": "h100", "count": 0}]}
    try:
        spec.HardwarePool.model_validate(raw)
    except pydantic.ValidationError as err:
        assert spec.describe(err, raw) == [
            "gpus[0].count = 0: Input should be greater than or equal to 1"]
    else:  # pragma: no cover - the count is invalid
        raise AssertionError("expected a validation error")
