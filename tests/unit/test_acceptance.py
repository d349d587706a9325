"""Acceptance of a re-plan: whether its recommendation replaces the running configuration
(minimum improvement per objective, SLO misses, same configuration), the request planned for
observed traffic, and the running configuration re-predicted with the real optimizer."""

from __future__ import annotations

import pytest

from tests.support.observations import observed
from tests.support.small_plan import SETTINGS, small_request
from trilemma.operator import acceptance, drift
from trilemma.operator.drift import WorkloadSummary
from trilemma.operator.resources import DriftThresholds
from trilemma.optimizer import search
from trilemma.optimizer.search import (
    Choice,
    Counts,
    Explanation,
    Mode,
    Plan,
    Predicted,
    Prediction,
    RequestDigest,
    ServingConfig,
    WorkerConfig,
    WorkloadDigest,
    planning,
)
from trilemma.optimizer.spec import Objective

THRESHOLDS = DriftThresholds()


# ---- acceptance -------------------------------------------------------------------------------

# Two distinct configurations, by name: "aaaa" runs, "bbbb" is the re-plan's candidate.
CONFIGS = {name: ServingConfig(model="meta-llama/Llama-3.1-8B", replicas=replicas,
                               worker=WorkerConfig(gpu="h100_sxm"))
           for name, replicas in (("aaaa", 1), ("bbbb", 2))}


def summary(name: str) -> str:
    return CONFIGS[name].summary()


def choice(name: str, *, cost: float, ttft: float = 150.0, tpot: float = 25.0,
           capacity: float = 6.0, miss: str | None = None) -> Predicted:
    prediction = Prediction(ttft_p50_ms=ttft, ttft_p90_ms=ttft, tpot_p50_ms=tpot,
                            tpot_p90_ms=tpot, e2e_p99_ms=ttft + 200 * tpot,
                            capacity_rps=capacity, cost_per_hour=cost, cost_per_mtok=1.0,
                            quality=None)
    return Predicted(choice=Choice(config=CONFIGS[name], prediction=prediction), slo_miss=miss)


def plan_of(rec: Predicted) -> Plan:
    digest = RequestDigest(
        models=["m"], workload=WorkloadDigest(prompt_tokens_mean=1000.0, output_tokens_mean=201.0,
                                              cached_tokens_mean=0.0, predictability=0.5),
        design_rate_rps=1.0, slo={}, pool={}, allow_disaggregation=False)
    return Plan(request=digest,
                objective=Objective.MIN_COST, recommended=rec.choice, front=[rec.choice],
                explanation=Explanation(binding="", limits=(), runners_up=(), sensitivity=()),
                counts=Counts(enumerated=1, pruned={}, coarse_layouts=0, screened=1,
                              feasible=1, simulated=0))


@pytest.mark.parametrize(("cost", "roll_out"), [(8.9, True), (9.0, True), (9.5, False)])
def test_min_cost_rolls_out_only_for_the_minimum_improvement(cost: float,
                                                             roll_out: bool) -> None:
    acc = acceptance.accept(choice("aaaa", cost=10.0), plan_of(choice("bbbb", cost=cost)),
                        "min_cost", 0.1, False)
    assert acc.roll_out is roll_out
    assert acc.improvement == pytest.approx(1 - cost / 10.0)
    assert acc.reason.startswith(f"{summary('bbbb')} improves cost per hour by")
    assert (acc.current_hash, acc.candidate_hash) == (CONFIGS["aaaa"].config_hash(),
                                                      CONFIGS["bbbb"].config_hash())


def test_a_current_configuration_violating_the_slo_is_replaced_even_at_a_higher_cost() -> None:
    cur, new = choice("aaaa", cost=10.0), plan_of(choice("bbbb", cost=30.0))
    observed_miss = acceptance.accept(cur, new, "min_cost", 0.1, True)
    assert observed_miss.roll_out and "violates the SLO as observed" in observed_miss.reason
    predicted_miss = acceptance.accept(choice("aaaa", cost=10.0, miss="ttft p90 <= 2000 ms"), new,
                                   "min_cost", 0.1, False)
    assert predicted_miss.roll_out and "would miss ttft p90" in predicted_miss.reason
    assert not acceptance.accept(cur, new, "min_cost", 0.1, False).roll_out


def test_the_same_configuration_is_never_rolled_out_again() -> None:
    acc = acceptance.accept(choice("aaaa", cost=10.0), plan_of(choice("aaaa", cost=10.0)),
                        "min_cost", 0.0, True)
    assert not acc.roll_out and "recommends the running configuration" in acc.reason


@pytest.mark.parametrize(("objective", "new", "improvement", "roll_out"), [
    ("max_throughput", {"capacity": 7.0}, 1 / 6, True),
    ("max_throughput", {"capacity": 6.3, "cost": 5.0}, 0.05, False),  # cheaper is not the aim
    # Latency axis: 150 + 25 x 200 = 5150 ms against 150 + 20 x 200 = 4150 ms.
    ("min_latency", {"tpot": 20.0}, 1 - 4150 / 5150, True),
    # Balanced: same latency at 81% of the cost, a geometric-mean gain of 10%...
    ("balanced", {"cost": 8.1}, 0.1, True),
    # ... and half the cost bought with twice the latency gains nothing.
    ("balanced", {"cost": 5.0, "ttft": 300.0, "tpot": 50.0}, 0.0, False),
])
def test_other_objectives_compare_their_own_axis(objective: str, new: dict, improvement: float,
                                                 roll_out: bool) -> None:
    candidate = choice("bbbb", **{"cost": 10.0, **new})
    acc = acceptance.accept(choice("aaaa", cost=10.0), plan_of(candidate), objective, 0.1, False)
    assert acc.improvement == pytest.approx(improvement, abs=1e-12)
    assert acc.roll_out is roll_out


# ---- re-prediction with the real optimizer ----------------------------------------------------

@pytest.fixture(scope="module")
def small_plan() -> Plan:
    return planning.plan(small_request(), settings=SETTINGS)


def test_repredict_reproduces_the_plans_own_prediction(small_plan: Plan) -> None:
    rec = small_plan.recommended
    again = search.predict(rec.config, small_request(), requests=300)
    assert again.choice.config == rec.config and again.slo_miss is None
    for key in ("ttft_p90_ms", "tpot_p90_ms", "capacity_rps", "cost_per_hour"):
        assert getattr(again.choice.prediction, key) == pytest.approx(
            getattr(rec.prediction, key), rel=1e-9)


def test_a_configuration_overloaded_by_new_traffic_misses_and_is_replaced(
        small_plan: Plan) -> None:
    heavier = small_request(rate=16.0)
    current = search.predict(small_plan.recommended.config, heavier, requests=300)
    assert current.slo_miss is not None
    assert (current.choice.prediction.cost_per_hour
            == small_plan.recommended.prediction.cost_per_hour)
    candidate = planning.plan(heavier, settings=SETTINGS)
    acc = acceptance.accept(current, candidate, "min_cost", 0.1, False)
    assert acc.roll_out and "would miss" in acc.reason


def test_repredict_prices_a_disaggregated_configuration() -> None:
    request = small_request()
    cfg = ServingConfig.from_dict({
        "model": "meta-llama/Llama-3.1-8B", "engine": "vllm", "mode": "disaggregated",
        "worker": {"gpu": "l40s", "tp": 1, "quant": "fp8", "max_num_seqs": 64,
                   "max_num_batched_tokens": 4096},
        "replicas": 2,
        "prefill": {"gpu": "l40s", "tp": 1, "quant": "fp8", "max_num_seqs": 64,
                    "max_num_batched_tokens": 4096},
        "prefill_replicas": 1})
    assert cfg.mode is Mode.DISAGGREGATED
    out = search.predict(cfg, request, requests=300).to_dict()
    p = out["prediction"]
    assert p["cost_per_hour"] == pytest.approx(3 * 1.9512)
    assert 0 < p["capacity_rps"] < 1e6 and p["ttft_p90_ms"] > 0


def test_observed_request_plans_for_the_observed_workload() -> None:
    request = small_request(peakFactor=2.0)
    obs = observed(rate=6.0, prompt=2048.0, output=128.0, prefix=None)
    at_peak = acceptance.observed_request(request, obs)
    assert at_peak.workload.design_rate() == pytest.approx(12.0)
    assert at_peak.workload.prompt_distribution().mean_tokens() == pytest.approx(2048.0)
    assert at_peak.slo == request.slo and at_peak.hardware == request.hardware
    at_rate = acceptance.observed_request(request, obs, at_peak=False)
    assert at_rate.workload.design_rate() == pytest.approx(6.0)


def test_the_plans_own_summary_shows_no_drift_from_its_workload(small_plan: Plan) -> None:
    planned = WorkloadSummary.of_plan(small_plan, peak_factor=1.0)
    same = observed(rate=4.0, prompt=1024.0, output=256.0, prefix=0.0)
    assert drift.drift(planned, same, THRESHOLDS).level == pytest.approx(0.0)
