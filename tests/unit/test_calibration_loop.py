"""Closed-loop calibration: correction factors from predicted vs observed p90 latencies, and
the tightened SLO the next plan is searched against."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.support.small_plan import SETTINGS, small_request
from trilemma.operator import calibration
from trilemma.operator.calibration import Calibration, Factor
from trilemma.operator.estimator import (
    Availability,
    LatencyStats,
    LengthStats,
    MetricsReason,
    ObservedWorkload,
)
from trilemma.operator.resources import to_wire
from trilemma.optimizer.catalog.engines import Engine
from trilemma.optimizer.search import Prediction, planning
from trilemma.optimizer.spec import Slo

NOW = 1_700_000_000.0
PREDICTED = Prediction(ttft_p50_ms=150.0, ttft_p90_ms=200.0, tpot_p50_ms=20.0, tpot_p90_ms=25.0,
                       e2e_p99_ms=6000.0, capacity_rps=5.0, cost_per_hour=10.0,
                       cost_per_mtok=1.0, quality=None)


def observed(ttft: float | None, itl: float | None, *, samples: float = 5000.0,
             at: float = NOW, reason: MetricsReason = MetricsReason.AVAILABLE
             ) -> ObservedWorkload:
    return ObservedWorkload(
        engine=Engine.VLLM, window_s=900, observed_at=at,
        availability=Availability(reason=reason, message=""), rate_rps=5.0,
        prompt_tokens=LengthStats(mean=1000.0), output_tokens=LengthStats(mean=200.0),
        ttft_ms=LatencyStats(p90=ttft), itl_ms=LatencyStats(p90=itl), samples=samples)


def feed(cal: Calibration, ratios: list[tuple[float, float]], **kw: object) -> Calibration:
    for i, (rt, rp) in enumerate(ratios):
        obs = observed(PREDICTED.ttft_p90_ms * rt, PREDICTED.tpot_p90_ms * rp,
                       at=NOW + 300 * i)
        cal = calibration.update(cal, predicted=PREDICTED, observed=obs, **kw)  # type: ignore[arg-type]
    return cal


def test_factors_converge_on_a_steady_bias_despite_noise() -> None:
    rng = np.random.default_rng(3)
    noise = rng.uniform(0.9, 1.1, size=(30, 2))
    cal = feed(Calibration(), [(1.3 * a, 1.0 * b) for a, b in noise])
    assert cal.ttft.value == pytest.approx(1.3, rel=0.05)
    assert cal.tpot.value == pytest.approx(1.0, rel=0.05)
    # The applied factor trails the value by at most one step of 0.05.
    assert abs(cal.factors()[0] - cal.ttft.value) <= 0.05 + 1e-9
    assert cal.factors()[1] == 1.0
    assert cal.ttft.pairs == 30


def test_the_first_windows_are_their_own_average_not_pulled_to_one() -> None:
    cal = feed(Calibration(), [(1.3, 1.3)] * 3)
    assert cal.ttft.value == pytest.approx(1.3)
    # A later change of bias moves the factor gradually, most of the way in a few windows.
    moved = feed(cal, [(2.0, 1.3)] * 4)
    assert 1.6 < moved.ttft.value < 2.0


def test_no_factor_applies_before_the_minimum_windows() -> None:
    cal = feed(Calibration(), [(1.5, 1.5)] * 2)
    assert cal.ttft.value == pytest.approx(1.5)
    assert cal.factors() == (1.0, 1.0)
    assert feed(cal, [(1.5, 1.5)]).factors() == (1.5, 1.5)


def test_ratios_and_factors_are_clamped() -> None:
    cal = feed(Calibration(), [(10.0, 0.1)] * 5)
    assert (cal.ttft.value, cal.tpot.value) == (pytest.approx(3.0), pytest.approx(0.5))
    assert cal.ttft.last_ratio == pytest.approx(10.0)  # the raw ratio is still reported


def test_applied_factors_move_in_steps_and_ignore_tiny_biases() -> None:
    assert feed(Calibration(), [(1.03, 0.97)] * 5).factors() == (1.0, 1.0)
    assert feed(Calibration(), [(1.27, 0.93)] * 5).factors() == (1.25, 0.95)


def test_noise_at_a_steps_edge_does_not_flip_the_applied_factor() -> None:
    cal = feed(Calibration(), [(1.3, 1.0)] * 5)
    assert cal.factors() == (1.3, 1.0)
    seen = set()
    for r in [1.27, 1.34, 1.26, 1.33, 1.35, 1.25, 1.32] * 3:
        cal = feed(cal, [(r, 1.0)])
        seen.add(cal.factors())
    assert seen == {(1.3, 1.0)}
    # A real change of bias does move it, to within a step of the smoothed value.
    moved = feed(cal, [(1.6, 1.0)] * 5)
    assert moved.factors()[0] >= 1.45 and abs(moved.factors()[0] - moved.ttft.value) <= 0.05


@pytest.mark.parametrize("obs", [
    observed(400.0, 50.0, samples=50),                              # too few requests
    observed(400.0, 50.0, reason=MetricsReason.STALE),               # not available
    observed(None, None),                                             # nothing to compare
])
def test_untrustworthy_windows_leave_the_calibration_unchanged(obs: ObservedWorkload) -> None:
    cal = feed(Calibration(), [(1.2, 1.2)] * 3)
    assert calibration.update(cal, predicted=PREDICTED, observed=obs) == cal


def test_a_window_that_began_before_the_configuration_served_is_skipped() -> None:
    obs = observed(400.0, 50.0, at=NOW)
    before = calibration.update(Calibration(), predicted=PREDICTED, observed=obs,
                                serving_since=NOW - 600)
    assert before == Calibration()
    after = calibration.update(Calibration(), predicted=PREDICTED, observed=obs,
                               serving_since=NOW - 900, config_hash="abcd1234")
    assert after.ttft.pairs == 1 and after.config_hash == "abcd1234"
    assert after.updated == NOW


def test_ttft_and_tpot_update_independently() -> None:
    cal = calibration.update(Calibration(), predicted=PREDICTED, observed=observed(300.0, None))
    assert (cal.ttft.pairs, cal.tpot.pairs) == (1, 0)
    assert cal.ttft.value == pytest.approx(1.5)


def test_calibration_survives_its_status_form() -> None:
    cal = feed(Calibration(), [(1.3, 1.1)] * 4, config_hash="abcd1234")
    wire = to_wire(cal.to_status())
    assert wire["configHash"] == "abcd1234" and wire["ttft"]["pairs"] == 4
    assert set(wire) == {"ttft", "tpot", "updated", "configHash"}
    back = Calibration.from_status(wire)
    assert back.factors() == cal.factors() and back.updated == cal.updated
    assert back.ttft.value == pytest.approx(cal.ttft.value, rel=1e-3)
    assert Calibration.from_status(None) == Calibration()
    # Continuing from the status form gives the same factor as continuing in memory.
    assert feed(back, [(1.3, 1.1)]).ttft.value == pytest.approx(
        feed(cal, [(1.3, 1.1)]).ttft.value, rel=1e-3)


def test_key_changes_only_with_the_applied_factors() -> None:
    a = Calibration(ttft=Factor(value=1.31, pairs=5, applied=1.3))
    b = Calibration(ttft=Factor(value=1.27, pairs=9, applied=1.3))
    c = Calibration(ttft=Factor(value=1.5, pairs=5, applied=1.5))
    assert a.key() == b.key() == "ttft1.30-tpot1.00" != c.key()


# ---- the SLO to plan against ------------------------------------------------------------------


def biased(ttft: float, tpot: float) -> Calibration:
    return Calibration(ttft=Factor(value=ttft, pairs=5, applied=ttft),
                       tpot=Factor(value=tpot, pairs=5, applied=tpot))


def test_latency_targets_are_divided_by_their_factor() -> None:
    slo = Slo.model_validate({"ttftMs": {"p50": 500, "p90": 1300}, "tpotMs": {"p90": 65},
                              "minTokensPerSecondPerUser": 20, "qualityFloor": 40,
                              "maxCostPerHour": 50})
    out = calibration.apply(slo, biased(1.3, 1.3))
    assert out.ttft_ms is not None and out.tpot_ms is not None
    assert (out.ttft_ms.p50, out.ttft_ms.p90) == (pytest.approx(500 / 1.3), pytest.approx(1000))
    assert out.tpot_ms.p90 == pytest.approx(50.0)
    assert out.min_tokens_per_second_per_user == pytest.approx(26.0)  # 50 -> 38.5 ms median
    assert (out.quality_floor, out.max_cost_per_hour) == (40, 50)


def test_end_to_end_bounds_take_the_larger_factor_but_stay_above_ttft() -> None:
    slo = Slo.model_validate({"ttftMs": {"p90": 1000}, "endToEndMs": {"p90": 1000, "p99": 9000}})
    out = calibration.apply(slo, biased(1.0, 2.0))
    assert out.end_to_end_ms is not None
    assert out.end_to_end_ms.p99 == pytest.approx(4500.0)
    assert out.end_to_end_ms.p90 == pytest.approx(1000.0)  # not below ttftMs.p90


def test_unit_factors_leave_the_slo_as_it_is() -> None:
    slo = Slo.model_validate({"ttftMs": {"p90": 1000}})
    assert calibration.apply(slo, Calibration()) is slo
    assert calibration.apply(slo, feed(Calibration(), [(1.02, 0.98)] * 5)) is slo


def test_corrected_predictions_scale_latencies_only() -> None:
    out = calibration.corrected(dataclasses.replace(PREDICTED, cost_per_hour=3.0),
                                biased(1.3, 1.0))
    assert (out.ttft_p50_ms, out.ttft_p90_ms) == (pytest.approx(195.0), pytest.approx(260.0))
    assert (out.tpot_p50_ms, out.tpot_p90_ms, out.cost_per_hour) == (20.0, 25.0, 3.0)
    assert dataclasses.replace(out, ttft_p50_ms=150.0, ttft_p90_ms=200.0,
                               cost_per_hour=10.0) == PREDICTED


def test_a_plan_against_the_tightened_slo_meets_the_real_one_once_corrected() -> None:
    request = small_request()
    cal = biased(3.0, 3.0)  # the endpoint runs 3x slower than the model predicts
    naive = planning.plan(request, settings=SETTINGS).recommended
    tight = request.model_copy(update={"slo": calibration.apply(request.slo, cal)})
    plan = planning.plan(tight, settings=SETTINGS).recommended
    real = calibration.corrected(plan.prediction, cal)
    # The uncorrected plan's pick would be too slow in reality; the calibrated one is not
    # (within the 2% the search itself allows a sampled percentile).
    assert calibration.corrected(naive.prediction, cal).tpot_p90_ms > 60.0
    assert real.tpot_p90_ms <= 60.0 * 1.02 and real.ttft_p90_ms <= 2000.0 * 1.02
    assert plan.config.config_hash() != naive.config.config_hash()
