"""The operator's per-endpoint gauges: set from the status, one configuration series per
endpoint (its hash changes at each new configuration), all removed with the endpoint."""

from __future__ import annotations

from trilemma.operator.metrics import EndpointFigures, OperatorMetrics

KEY = "team/chat"
LABELS = {"namespace": "team", "name": "chat"}


def status(hash_: str = "abc123", replicas: int = 2) -> dict[str, object]:
    return {"costPerHour": 7.5,
            "predictions": {"ttftP90Ms": 120.0, "tpotP90Ms": 25.0, "capacityRps": 9.5,
                            "costPerHour": 7.5, "costPerMillionTokens": 1.0},
            "activeConfiguration": {"hash": hash_, "summary": f"{replicas}x [fp8 TP1]",
                                    "replicas": replicas}}


def value(m: OperatorMetrics, name: str, labels: dict[str, str] = LABELS) -> float | None:
    return m.registry.get_sample_value(name, labels)


def info_series(m: OperatorMetrics) -> list[dict[str, str]]:
    (family,) = [f for f in m.registry.collect()
                 if f.name == "trilemma_endpoint_configuration_info"]
    return [s.labels for s in family.samples]


def test_the_gauges_show_the_active_plans_predictions_in_seconds():
    m = OperatorMetrics()
    m.endpoint_status(KEY, status())
    assert value(m, "trilemma_endpoint_predicted_cost_dollars_per_hour") == 7.5
    assert value(m, "trilemma_endpoint_predicted_ttft_p90_seconds") == 0.12
    assert value(m, "trilemma_endpoint_predicted_tpot_p90_seconds") == 0.025
    assert value(m, "trilemma_endpoint_predicted_capacity_requests_per_second") == 9.5
    assert value(m, "trilemma_endpoint_replicas") == 2
    assert info_series(m) == [{**LABELS, "hash": "abc123", "summary": "2x [fp8 TP1]"}]


def test_a_new_configuration_replaces_the_old_series():
    m = OperatorMetrics()
    m.endpoint_status(KEY, status("abc123", 2))
    m.endpoint_status(KEY, status("abc123", 2))
    m.endpoint_status(KEY, status("def456", 3))
    assert info_series(m) == [{**LABELS, "hash": "def456", "summary": "3x [fp8 TP1]"}]
    assert value(m, "trilemma_endpoint_replicas") == 3


def test_a_status_without_a_plan_removes_the_series():
    m = OperatorMetrics()
    m.endpoint_status(KEY, status())
    m.endpoint_status(KEY, {"phase": "Failed"})
    assert value(m, "trilemma_endpoint_predicted_ttft_p90_seconds") is None
    assert value(m, "trilemma_endpoint_predicted_cost_dollars_per_hour") is None
    assert info_series(m) == []


def test_a_deleted_endpoint_leaves_no_series():
    m = OperatorMetrics()
    m.endpoint_status(KEY, status())
    m.endpoint_status("team/other", status("fff000"))
    m.forget(KEY)
    for name in ("trilemma_endpoint_predicted_cost_dollars_per_hour",
                 "trilemma_endpoint_predicted_ttft_p90_seconds",
                 "trilemma_endpoint_predicted_tpot_p90_seconds",
                 "trilemma_endpoint_predicted_capacity_requests_per_second",
                 "trilemma_endpoint_replicas"):
        assert value(m, name) is None, name
        assert value(m, name, {"namespace": "team", "name": "other"}) is not None, name
    assert [s["name"] for s in info_series(m)] == ["other"]
    m.forget(KEY)  # twice, or never set: no error


def test_figures_ignore_what_is_not_a_number():
    figures = EndpointFigures.from_status({"costPerHour": True, "predictions": {
        "ttftP90Ms": "fast"}, "activeConfiguration": {"replicas": 1.5, "hash": 3}})
    assert figures == EndpointFigures()
