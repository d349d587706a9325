"""The retune state machine and what it reads: drift against the plan, SLO violations, the
policy (persistence, hysteresis, cooldown, holds, failed workloads), its state's status form,
and the history of its decisions. Acceptance of a new plan: test_acceptance.py."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from tests.support.observations import NOW, observed
from tests.unit.test_estimator import BASE as BASE_WORKLOAD
from trilemma.operator import drift, estimator, retune, retune_history
from trilemma.operator.acceptance import Acceptance
from trilemma.operator.drift import WorkloadSummary
from trilemma.operator.estimator import LatencyStats, MetricsReason, ObservedWorkload
from trilemma.operator.resources import DriftThresholds, Retune, to_wire
from trilemma.operator.retune import Action, RetuneState, Why
from trilemma.optimizer.search import RequestDigest, WorkloadDigest
from trilemma.optimizer.spec import Slo

THRESHOLDS = DriftThresholds()
# A window as long as the check interval: two drifted checks re-plan (see
# test_a_long_window_needs_the_drift_to_last_a_whole_window for the general rule).
SPEC = Retune(enabled=True, interval_seconds=300, window_seconds=300, cooldown_seconds=1800,
              min_improvement=0.1)
# The plan was made for 10 req/s mean at a peak factor of 2: a design rate of 20.
REQUEST = RequestDigest(
    models=["m"], workload=WorkloadDigest(prompt_tokens_mean=1000.0, output_tokens_mean=200.0,
                                          cached_tokens_mean=300.0, predictability=0.5),
    design_rate_rps=20.0, slo={}, pool={}, allow_disaggregation=False)
PLANNED = WorkloadSummary.of_request(REQUEST, peak_factor=2.0)


def check(state: RetuneState, obs: ObservedWorkload, *, violations: list[str] | None = None,
          rolling_out: bool = False, basis: str = "", spec: Retune = SPEC,
          planned: WorkloadSummary = PLANNED,
          serving_since: float | None = None) -> retune.Decision:
    return retune.decide(state, retune.Check(
        now=obs.observed_at, observed=obs, availability=obs.availability.reason,
        planned=planned, violations=tuple(violations or ()), rolling_out=rolling_out,
        basis=basis, serving_since=serving_since), spec)


# ---- summaries and drift --------------------------------------------------------------------


def test_plan_summary_compares_mean_rates_by_dividing_out_the_peak_factor() -> None:
    assert PLANNED.rate_rps == pytest.approx(10.0)
    assert PLANNED.prefix_share == pytest.approx(0.3)
    # The plan's headroom for peaks is not drift: the mean it was sized from is observed.
    assert not drift.drift(PLANNED, observed(rate=10.0), THRESHOLDS).exceeded


def test_drift_reason_names_the_figure_its_change_and_the_threshold() -> None:
    d = drift.drift(PLANNED, observed(prompt=4120.0), THRESHOLDS)
    assert d.exceeded == (drift.Dimension.PROMPT,)
    assert d.reason == "prompt length +312% (1000 -> 4120 tokens) exceeds 30%"
    assert d.figures()["promptTokensChange"] == pytest.approx(3.12)


def test_drift_reason_lists_every_exceeded_figure_largest_first() -> None:
    d = drift.drift(PLANNED, observed(rate=25.0, output=100.0, prefix=0.05), THRESHOLDS)
    assert set(d.exceeded) == {drift.Dimension.RATE, drift.Dimension.OUTPUT,
                               drift.Dimension.PREFIX}
    parts = d.reason.split("; ")
    assert parts[0].startswith("request rate +150% (10 -> 25 req/s)")
    assert "prefix hit share -25 points (30% -> 5%) exceeds 15 points" in parts


def test_refused_requests_are_drift_a_plan_never_expects() -> None:
    # 0.5 req/s refused beside 9.5 served: 5 % of the demand over a 2-point threshold.
    obs = dataclasses.replace(observed(rate=9.5), refused_rps=0.5)
    assert obs.refused_share == pytest.approx(0.05)
    d = drift.drift(PLANNED, obs, THRESHOLDS)
    assert d.exceeded == (drift.Dimension.REFUSED,)
    assert "refused share +5 points (0% -> 5%) exceeds 2 points" in d.reason
    # None refused, or an engine that does not count refusals: no drift, and no new name.
    assert not drift.drift(PLANNED, dataclasses.replace(obs, refused_rps=0.0),
                           THRESHOLDS).exceeded
    assert not drift.drift(PLANNED, observed(rate=10.0), THRESHOLDS).exceeded
    calm = WorkloadSummary.of_observed(observed(rate=10.0))
    assert calm.digest(THRESHOLDS) == dataclasses.replace(
        calm, refused_share=0.0).digest(THRESHOLDS)
    assert calm.digest(THRESHOLDS) != WorkloadSummary.of_observed(obs).digest(THRESHOLDS)
    # A re-plan serves the refused demand too.
    assert estimator.to_workload_spec(obs, base=BASE_WORKLOAD).arrivals.requests_per_second == (
        pytest.approx(10.0))


@pytest.mark.parametrize(("changes", "exceeded"), [
    ({"rate": 12.9}, ()),
    ({"rate": 13.1}, (drift.Dimension.RATE,)),
    ({"rate": 6.9}, (drift.Dimension.RATE,)),      # drops count as much as rises
    ({"output": 259.0}, ()),
    ({"output": 261.0}, (drift.Dimension.OUTPUT,)),
    ({"prefix": 0.44}, ()),                          # prefix share: absolute points
    ({"prefix": 0.46}, (drift.Dimension.PREFIX,)),
    ({"prefix": None}, ()),                          # not exported: unknown, never drift
])
def test_each_figure_drifts_exactly_past_its_threshold(changes: dict, exceeded: tuple) -> None:
    assert drift.drift(PLANNED, observed(**changes), THRESHOLDS).exceeded == exceeded


def test_thresholds_come_from_the_spec() -> None:
    loose = DriftThresholds(rate=1.0)
    assert not drift.drift(PLANNED, observed(rate=19.0), loose).exceeded
    assert drift.drift(PLANNED, observed(rate=21.0), loose).exceeded


def test_workload_digest_is_stable_under_noise_and_changes_with_drift() -> None:
    a = WorkloadSummary(rate_rps=10.0, prompt_tokens=1000.0, output_tokens=200.0,
                        prefix_share=0.3)
    b = dataclasses.replace(a, rate_rps=10.2, prompt_tokens=1010.0)
    c = dataclasses.replace(a, prompt_tokens=4000.0)
    assert a.digest(THRESHOLDS) == b.digest(THRESHOLDS) != c.digest(THRESHOLDS)


# ---- SLO violations ---------------------------------------------------------------------------


SLO = Slo.model_validate({"ttftMs": {"p90": 1500}, "tpotMs": {"p50": 40, "p90": 60},
                          "minTokensPerSecondPerUser": 20})


def test_observed_ttft_and_itl_over_their_targets_are_violations() -> None:
    obs = observed(ttft=LatencyStats(p90=2140.0), itl=LatencyStats(p50=30.0, p90=75.0))
    v = retune.slo_violations(obs, SLO)
    assert v == ["TTFT p90 2140 ms exceeds the p90 target 1500 ms (+43%)",
                 "ITL p90 75 ms exceeds the TPOT p90 target 60 ms (+25%)"]


def test_per_user_speed_is_a_median_itl_bound() -> None:
    obs = observed(itl=LatencyStats(p50=55.0, p90=58.0))  # 20 tokens/s needs 50 ms
    v = retune.slo_violations(obs, SLO)
    assert len(v) == 2 and all("ITL p50 55 ms" in x for x in v)


def test_latencies_within_target_or_its_bucket_tolerance_are_not_violations() -> None:
    obs = observed(ttft=LatencyStats(p90=1550.0), itl=LatencyStats(p50=20.0, p90=61.0))
    assert retune.slo_violations(obs, SLO) == []


def test_too_few_requests_prove_no_violation() -> None:
    obs = observed(samples=10, ttft=LatencyStats(p90=9000.0))
    assert retune.slo_violations(obs, SLO) == []
    assert retune.slo_violations(obs, SLO, min_samples=5) != []


# ---- the policy ---------------------------------------------------------------------------


def run(observations: list[ObservedWorkload], state: RetuneState | None = None,
        **kw: object) -> list[retune.Decision]:
    state = state or RetuneState()
    out = []
    for obs in observations:
        d = check(state, obs, **kw)  # type: ignore[arg-type]
        state = d.state
        out.append(d)
    return out


def every(n: int, **kw: object) -> list[ObservedWorkload]:
    return [observed(at=NOW + 300 * i, **kw) for i in range(n)]  # type: ignore[arg-type]


def test_drift_replans_only_on_the_second_consecutive_check() -> None:
    first, second = run(every(2, prompt=4120.0))
    assert (first.action, first.why) == (Action.NO_CHANGE, Why.PENDING)
    assert "(1 of 2 checks)" in first.message
    assert (second.action, second.why) == (Action.REPLAN, Why.DRIFT)
    assert second.message.startswith("prompt length +312%")
    assert second.workload is not None and second.workload.prompt_tokens == 4120.0
    # A re-plan starts a new episode and remembers the workload it was for.
    assert second.state.drift_checks == 0
    assert second.state.last_replan == NOW + 300
    assert second.state.last_replan_workload == second.workload.digest(THRESHOLDS)


def test_noisy_steady_traffic_within_thresholds_never_replans() -> None:
    rng = np.random.default_rng(7)
    obs = [observed(at=NOW + 300 * i, rate=10.0 * (1 + rng.uniform(-0.1, 0.1)),
                    prompt=1000.0 * (1 + rng.uniform(-0.1, 0.1)),
                    output=200.0 * (1 + rng.uniform(-0.1, 0.1)),
                    prefix=0.3 + rng.uniform(-0.05, 0.05)) for i in range(50)]
    decisions = run(obs)
    assert {d.action for d in decisions} == {Action.NO_CHANGE}
    assert {d.why for d in decisions} == {Why.WITHIN_THRESHOLDS}
    assert all(d.state.drift_checks == 0 for d in decisions)


def test_isolated_spikes_separated_by_calm_checks_never_replan() -> None:
    obs = [observed(at=NOW + 300 * i, rate=20.0 if i % 2 else 10.5) for i in range(50)]
    assert Action.REPLAN not in {d.action for d in run(obs)}


def test_a_drift_hovering_at_its_threshold_is_one_episode() -> None:
    # Over (+40%), back inside but above the exit band (+20% = 0.67 of 30%), over again: the
    # count held in between, so the second excursion re-plans.
    decisions = run([observed(at=NOW, rate=14.0), observed(at=NOW + 300, rate=12.0),
                     observed(at=NOW + 600, rate=14.0)])
    assert [d.state.drift_checks for d in decisions[:2]] == [1, 1]
    assert decisions[2].action is Action.REPLAN


def test_a_drift_that_calms_below_the_exit_band_ends_its_episode() -> None:
    decisions = run([observed(at=NOW, rate=14.0), observed(at=NOW + 300, rate=11.0),
                     observed(at=NOW + 600, rate=14.0)])
    assert decisions[1].state.drift_checks == 0
    assert decisions[2].action is Action.NO_CHANGE and decisions[2].why is Why.PENDING


def test_an_slo_violation_replans_without_any_drift() -> None:
    first, second = run(every(2), violations=["TTFT p90 2140 ms exceeds ..."])
    assert first.why is Why.PENDING
    assert (second.action, second.why) == (Action.REPLAN, Why.SLO_VIOLATION)
    assert "TTFT p90 2140 ms" in second.message


def test_violations_from_a_window_that_began_before_the_last_rollout_are_ignored() -> None:
    # Rolled out 5 minutes before the first check: the 15-minute windows of the first two
    # checks saw the old configuration; from the third on they see only the new one.
    no_cooldown = Retune(enabled=True, interval_seconds=300, cooldown_seconds=0)
    state = RetuneState(last_rollout=NOW - 300)
    decisions = run(every(4), state, violations=["TTFT p90 too high"], spec=no_cooldown)
    assert [d.state.violation_checks for d in decisions[:3]] == [0, 0, 1]
    assert "not judged" in decisions[0].message
    assert [d.action for d in decisions] == [Action.NO_CHANGE] * 3 + [Action.REPLAN]


def test_cooldown_holds_a_due_replan_until_it_has_passed() -> None:
    state = RetuneState(last_rollout=NOW - 600)
    decisions = run([observed(at=NOW + 300 * i, prompt=4120.0) for i in range(6)], state)
    # The first window (900 s) began before the rollout: not judged. The next two count the
    # drift; the second would re-plan but the cooldown holds it.
    assert decisions[2].action is Action.HOLD and decisions[2].why is Why.COOLDOWN
    assert "cooldown" in decisions[2].message
    # The cooldown ends 1800 s after the rollout (NOW + 1200): the drift, still counted,
    # re-plans at the first check after it.
    assert [d.action for d in decisions] == [Action.NO_CHANGE, Action.NO_CHANGE, Action.HOLD,
                                             Action.HOLD, Action.REPLAN, Action.NO_CHANGE]


def test_drift_in_a_window_that_began_before_the_first_deployment_is_not_counted() -> None:
    # The endpoint started serving 100 s ago; the 900 s window mostly shows no traffic.
    d = check(RetuneState(), observed(prompt=4120.0), serving_since=NOW - 100)
    assert d.action is Action.NO_CHANGE and d.state.drift_checks == 0
    assert "not judged" in d.message


def test_a_rollout_in_flight_holds_and_leaves_the_counts_alone() -> None:
    state = RetuneState(drift_checks=1)
    d = check(state, observed(prompt=4120.0), rolling_out=True)
    assert (d.action, d.why) == (Action.HOLD, Why.ROLLOUT_IN_FLIGHT)
    assert d.state.drift_checks == 1 and d.state.last_check == NOW


@pytest.mark.parametrize(("reason", "why"), [
    (MetricsReason.MISSING, Why.METRICS_MISSING),
    (MetricsReason.STALE, Why.METRICS_STALE),
    (MetricsReason.PROMETHEUS_ERROR, Why.PROMETHEUS_ERROR),
])
def test_unavailable_metrics_hold_with_the_conditions_reason(reason: MetricsReason,
                                                             why: Why) -> None:
    state = RetuneState(drift_checks=1)
    d = check(state, observed(prompt=4120.0, reason=reason))
    assert (d.action, d.why) == (Action.HOLD, why)
    assert d.message == f"{reason.value} (test)"
    assert d.state.drift_checks == 1


def test_no_observation_at_all_holds_with_the_given_availability() -> None:
    d = retune.decide(RetuneState(), retune.Check(now=NOW, observed=None,
                                                  availability="PrometheusError"), SPEC)
    assert (d.action, d.why) == (Action.HOLD, Why.PROMETHEUS_ERROR)


def test_too_few_requests_hold() -> None:
    d = check(RetuneState(drift_checks=1), observed(prompt=4120.0, samples=20))
    assert (d.action, d.why) == (Action.HOLD, Why.NOT_ENOUGH_SAMPLES)
    assert d.state.drift_checks == 1


def test_checks_before_the_interval_or_with_retune_disabled_change_nothing() -> None:
    state = RetuneState(last_check=NOW - 100, drift_checks=1)
    d = check(state, observed(prompt=4120.0))
    assert (d.action, d.why, d.state) == (Action.HOLD, Why.NOT_DUE, state)
    off = check(RetuneState(), observed(prompt=4120.0), spec=Retune(enabled=False))
    assert (off.action, off.why, off.state) == (Action.HOLD, Why.DISABLED, RetuneState())
    # A timer firing a few seconds early is still on time.
    assert retune.due(RetuneState(last_check=NOW - 295), NOW, SPEC)


def test_a_workload_that_failed_is_not_replanned_again() -> None:
    drifted = observed(prompt=4120.0)
    workload = WorkloadSummary.of_observed(drifted)
    state = retune.record_failure(RetuneState(drift_checks=1), NOW - 600, workload,
                                  "no configuration beats the running one by 10%",
                                  thresholds=THRESHOLDS, basis="gen3")
    # The same workload, a little noisier: held.
    d = check(state, observed(prompt=4300.0, rate=10.5), basis="gen3")
    assert (d.action, d.why) == (Action.HOLD, Why.ALREADY_FAILED)
    assert "no configuration beats" in d.message
    # A new basis (spec generation, calibration) may decide differently: re-planned.
    assert check(state, drifted, basis="gen4").action is Action.REPLAN
    # So is a workload that moved on, and the same one once the record expires.
    assert check(state, observed(prompt=8000.0), basis="gen3").action is Action.REPLAN
    later = observed(prompt=4120.0, at=NOW + retune.POLICY.failed_ttl_s)
    assert check(state, later, basis="gen3").action is Action.REPLAN


def test_failure_records_replace_their_own_workload_and_stay_few() -> None:
    state = RetuneState()
    for i in range(8):
        w = WorkloadSummary(rate_rps=10.0 * 2 ** i, prompt_tokens=1000.0, output_tokens=200.0)
        state = retune.record_failure(state, NOW + i, w, f"fail {i}", thresholds=THRESHOLDS)
    state = retune.record_failure(state, NOW + 9, w, "again", thresholds=THRESHOLDS)
    assert len(state.failed) == retune.POLICY.max_failed
    assert [f.reason for f in state.failed][-2:] == ["fail 6", "again"]


def test_rolled_out_starts_the_cooldown() -> None:
    state = retune.rolled_out(RetuneState(drift_checks=2, violation_checks=1), NOW)
    assert (state.last_rollout, state.drift_checks, state.violation_checks) == (NOW, 0, 0)


def test_state_survives_its_status_form() -> None:
    w = WorkloadSummary(rate_rps=12.5, prompt_tokens=4120.0, output_tokens=200.0,
                        prefix_share=None)
    state = RetuneState(last_check=NOW, drift_checks=1, violation_checks=2,
                        last_replan=NOW - 900, last_replan_workload="abc",
                        last_rollout=NOW - 1800,
                        failed=(retune.Failure(workload=w, digest=w.digest(THRESHOLDS),
                                               time=NOW - 60, reason="why", basis="b"),))
    wire = to_wire(state.to_status())
    assert wire["lastCheckTime"] == "2023-11-14T22:13:20Z"
    assert wire["failed"][0]["figures"] == {"rateRps": 12.5, "promptTokens": 4120.0,
                                            "outputTokens": 200.0}
    assert RetuneState.from_status(wire) == state
    assert RetuneState.from_status(None) == RetuneState()


# ---- history ----------------------------------------------------------------------------------


def test_history_keeps_the_newest_entries_and_folds_repeated_holds() -> None:
    entries: list[retune_history.RetuneHistoryEntry] = []
    for i in range(12):
        event = retune_history.RetuneEvent(time=NOW + i, action=retune_history.Step.REPLAN,
                                   reason=f"drift {i}", cause="WorkloadDrift",
                                   from_hash="aaaa")
        entries = retune_history.append(entries, event)
    history = [to_wire(e) for e in entries]
    assert len(history) == 10 and history[-1]["reason"] == "drift 11"
    assert history[0]["time"] == "2023-11-14T22:13:22Z"
    hold = check(RetuneState(last_rollout=NOW - 1200, drift_checks=1), observed(prompt=4120.0))
    for t in (NOW, NOW + 300):
        # The wire form read back from status is accepted as well as the models.
        history = [to_wire(e) for e in retune_history.append(
            history, retune_history.RetuneEvent.of_decision(hold, t))]
    assert len(history) == 10
    assert history[-1]["action"] == "Hold" and history[-1]["cause"] == "Cooldown"
    assert history[-2]["reason"] == "drift 11"
    assert history[-1]["figures"]["promptTokensChange"] == pytest.approx(3.12)


def test_an_acceptance_becomes_a_history_entry_with_its_figures() -> None:
    acc = Acceptance(roll_out=True, reason="cheaper", improvement=0.5, current_hash="aaaa",
                     candidate_hash="bbbb", figures={"improvement": 0.5})
    entry = to_wire(retune_history.RetuneEvent.of_acceptance(acc, NOW).to_status())
    assert entry["action"] == "RollOut" and (entry["fromHash"], entry["toHash"]) == (
        "aaaa", "bbbb")
    assert entry["figures"]["improvement"] == 0.5


def test_a_long_window_needs_the_drift_to_last_a_whole_window() -> None:
    # 30 s windows read every 10 s: a shift shows in the window gradually; re-planning on the
    # second check would plan for a mix of the old and the new traffic.
    spec = Retune(enabled=True, interval_seconds=10, window_seconds=30, cooldown_seconds=0)
    assert retune.drift_checks_needed(spec) == 4
    assert retune.drift_checks_needed(SPEC) == 2
    decisions = run([observed(at=NOW + 10 * i, prompt=4120.0) for i in range(5)],
                    RetuneState(), spec=spec)
    assert [d.action for d in decisions] == [Action.NO_CHANGE] * 3 + [Action.REPLAN,
                                                                      Action.NO_CHANGE]
    assert "(3 of 4 checks)" in decisions[2].message

