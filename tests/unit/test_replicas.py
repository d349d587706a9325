"""The replica count: who decides it (replicas.py), the operator-owned scaler's decision
(autoscale.py), and the spec's rules for it. Pure: no clock, no cluster, no Prometheus."""

from __future__ import annotations

import pydantic
import pytest

from trilemma.operator import autoscale, replicas
from trilemma.operator.endpoint import spec_digest
from trilemma.operator.endpoint_status import MAX_RECOMMENDATIONS, ScalingStatus
from trilemma.operator.resources import ReplicaOwner, ReplicaPolicy
from trilemma.operator.scale import count_changed
from trilemma.optimizer.catalog import Engine
from trilemma.optimizer.search import ServingConfig, WorkerConfig

OPERATOR = ReplicaPolicy()
EXTERNAL = ReplicaPolicy(owner=ReplicaOwner.EXTERNAL)


def _prior(*, layout: str = "aaaa1111", replicas: int = 4, capacity: float = 10.0,
           spec_count: int | None = None, desired: int | None = None) -> ScalingStatus:
    return ScalingStatus(owner="operator", replicas=replicas, layout_hash=layout,
                         replica_capacity_rps=capacity, spec_count=spec_count,
                         desired_replicas=desired, message="before")


def test_capacity_is_carried_over_when_the_layout_changes() -> None:
    # 4 replicas of 10 req/s are 40 req/s: as replicas of 25 req/s, 2 (rounded up, not 1.6).
    assert replicas.carried(4, 10.0, 25.0) == 2
    assert replicas.carried(4, 10.0, 10.0) == 4
    assert replicas.carried(1, 10.0, 1000.0) == 1  # never scaled to zero by a re-plan
    assert replicas.carried(0, 10.0, 5.0) == 0  # ...nor up from zero
    got = replicas.decide(OPERATOR, plan_replicas=1, layout_hash="bbbb2222", capacity=20.0,
                          prior=_prior())
    assert got.replicas == 2 and "carried over from 4" in got.why


def test_external_owner_follows_the_count_and_nothing_else() -> None:
    policy = EXTERNAL.model_copy(update={"count": 7})
    got = replicas.decide(policy, plan_replicas=2, layout_hash="aaaa1111", capacity=10.0,
                          prior=_prior(desired=3))
    assert got.replicas == 7
    # Unset: the plan's count (nothing to follow yet).
    got = replicas.decide(EXTERNAL, plan_replicas=2, layout_hash="aaaa1111", capacity=10.0,
                          prior=None)
    assert got.replicas == 2 and "unset" in got.why
    # Zero is the writer's to ask for (KEDA scales to zero).
    zero = EXTERNAL.model_copy(update={"count": 0})
    assert replicas.decide(zero, plan_replicas=2, layout_hash="a", capacity=1.0,
                           prior=None).replicas == 0


def test_after_a_replan_the_external_count_is_carried_until_its_writer_speaks_again() -> None:
    policy = EXTERNAL.model_copy(update={"count": 4})
    before = _prior(spec_count=4, replicas=4, capacity=10.0)
    carried = replicas.decide(policy, plan_replicas=1, layout_hash="new00000", capacity=40.0,
                              prior=before)
    assert carried.replicas == 1
    # The HPA writes a new count: it is followed as written.
    after = _prior(layout="new00000", spec_count=4, replicas=1, capacity=40.0)
    spoke = policy.model_copy(update={"count": 3})
    assert replicas.decide(spoke, plan_replicas=1, layout_hash="new00000", capacity=40.0,
                           prior=after).replicas == 3


def test_operator_owner_deploys_the_scalers_count_within_the_spec_range() -> None:
    policy = ReplicaPolicy(min_replicas=2, max_replicas=5)
    got = replicas.decide(policy, plan_replicas=1, layout_hash="aaaa1111", capacity=10.0,
                          prior=_prior(desired=9))
    assert got.replicas == 5
    # No scaler reading yet: the plan's count, raised to minReplicas.
    got = replicas.decide(policy, plan_replicas=1, layout_hash="aaaa1111", capacity=10.0,
                          prior=None)
    assert got.replicas == 2 and "minReplicas" in got.why


def test_a_disaggregated_replica_keeps_the_plans_prefill_ratio() -> None:
    worker = WorkerConfig(gpu="h100_sxm", tp=2)
    config = ServingConfig(model="m", engine=Engine.VLLM, mode="disaggregated", worker=worker,
                           replicas=2, prefill=WorkerConfig(gpu="h100_sxm", tp=1),
                           prefill_replicas=1)
    assert (replicas.scaled(config, 4).replicas, replicas.scaled(config, 4).prefill_replicas
            ) == (4, 2)
    assert replicas.scaled(config, 1).prefill_replicas == 1  # never a decode pool alone
    assert replicas.scaled(config, 0).prefill_replicas == 0
    assert replicas.scaled(config, 3).prefill_replicas == 2  # rounded up


def test_the_spec_refuses_a_range_upside_down() -> None:
    with pytest.raises(pydantic.ValidationError, match="maxReplicas"):
        ReplicaPolicy.model_validate({"minReplicas": 4, "maxReplicas": 2})
    with pytest.raises(pydantic.ValidationError):
        ReplicaPolicy.model_validate({"count": 100000})


def test_the_count_is_left_out_of_the_spec_digest_but_a_changed_count_is_seen() -> None:
    base = {"spec": {"replicas": {"owner": "external", "count": 2}, "objective": "min_cost"}}
    moved = {"spec": {"replicas": {"owner": "external", "count": 5}, "objective": "min_cost"}}
    assert spec_digest(base) == spec_digest(moved)
    assert spec_digest(base) != spec_digest({"spec": {"replicas": {"owner": "operator"},
                                                      "objective": "min_cost"}})
    deployed = {**moved, "status": {"scaling": {"owner": "external", "specCount": 2}}}
    assert count_changed(deployed)
    caught_up = {**moved, "status": {"scaling": {"owner": "external", "specCount": 5}}}
    assert not count_changed(caught_up)
    # Owner operator: an HPA's write to count changes nothing.
    ignored = {"spec": {"replicas": {"count": 9}}, "status": {"scaling": {"specCount": None}}}
    assert not count_changed(ignored)


# ---- the operator-owned scaler --------------------------------------------------------------


def _reading(rate: float, waiting: float = 0.0) -> autoscale.Reading:
    return autoscale.Reading(rate_rps=rate, waiting=waiting)


def test_recommendation_divides_the_rate_by_capacity_at_the_target_utilization() -> None:
    policy = ReplicaPolicy(target_utilization=0.8)
    # 33 req/s over 10 req/s at 80 %: 4.125 -> 5 replicas.
    assert autoscale.recommend(policy, _reading(33.0), capacity_rps=10.0, current=2,
                               room=20) == 5
    assert autoscale.recommend(policy, _reading(0.0), capacity_rps=10.0, current=3,
                               room=20) == 1  # minReplicas
    assert autoscale.recommend(policy, _reading(330.0), capacity_rps=10.0, current=3,
                               room=6) == 6  # the pool's room


def test_a_standing_queue_asks_for_one_more_than_a_saturated_rate_shows() -> None:
    # Saturated replicas finish at capacity: the rate alone would keep 3.
    policy = ReplicaPolicy(target_utilization=1.0)
    assert autoscale.recommend(policy, _reading(30.0, waiting=1.0), capacity_rps=10.0,
                               current=3, room=10) == 3
    assert autoscale.recommend(policy, _reading(30.0, waiting=6.0), capacity_rps=10.0,
                               current=3, room=10) == 4


def _run(policy: ReplicaPolicy, steps: list[tuple[float, int]], current: int) -> list[int]:
    """Counts after each (time, recommendation), the count applied at once."""
    history: list[autoscale.Run] = []
    out = []
    keep = max(policy.scale_up_stabilization_seconds, policy.scale_down_stabilization_seconds)
    for now, wanted in steps:
        history = autoscale.record(history, now, wanted, keep_s=keep)
        current = autoscale.stabilize(policy, history, now, current)
        out.append(current)
    return out


def test_up_fast_down_slow() -> None:
    policy = ReplicaPolicy(scale_down_stabilization_seconds=300)
    # Up at once; a dip is ignored until the higher count is 300 s in the past (6 was
    # recommended until the check at 30 replaced it).
    steps = [(0, 2), (15, 6), (30, 2), (200, 2), (329, 2), (331, 2)]
    assert _run(policy, steps, current=2) == [2, 6, 6, 6, 6, 2]


def test_scale_up_window_takes_the_lowest_recent_recommendation() -> None:
    policy = ReplicaPolicy(scale_up_stabilization_seconds=60, scale_down_stabilization_seconds=0)
    steps = [(0, 2), (15, 8), (30, 8), (76, 8)]
    # At 15 and 30 the window still holds the 2 recommended until 15: no scale-up yet.
    assert _run(policy, steps, current=2) == [2, 2, 2, 8]


def test_history_only_grows_when_the_recommendation_changes_and_stays_bounded() -> None:
    history: list[autoscale.Run] = []
    for t in range(0, 300, 15):
        history = autoscale.record(history, float(t), 3, keep_s=300)
    assert history == [autoscale.Run(since=0.0, count=3)]
    for t in range(0, 10 * MAX_RECOMMENDATIONS):
        history = autoscale.record(history, 1000.0 + t, t % 2 + 1, keep_s=10_000)
    assert len(history) == MAX_RECOMMENDATIONS
    # Old runs go once they ended longer ago than the longest window.
    history = autoscale.record(history, 1_000_000.0, 5, keep_s=300)
    assert [r.count for r in history] == [history[0].count, 5]
