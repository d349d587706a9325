"""The operator-owned scaler's decision: pure, so it is tested without a clock or Prometheus.

Each check turns the observed rate into a recommended count (rate over the per-replica
capacity at the SLO, at the spec's target utilization), then stabilizes it the way the
Kubernetes HPA does: scale up to the lowest count recommended over the up window (0 s by
default: at once), down to the highest recommended over the down window (300 s: a replica
costs minutes of model loading to get back, so one quiet minute must not remove it).

The history is kept as runs (the time a recommendation started, its count), written only
when the count changes: a steady endpoint costs no status write per check, and a run still
counts as recommended until the next one starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trilemma.operator.endpoint_status import MAX_RECOMMENDATIONS
from trilemma.operator.replicas import bounded
from trilemma.operator.resources import ReplicaPolicy


@dataclass(frozen=True)
class Reading:
    """What one check saw: finished requests/s over the window, and requests waiting in the
    engines' queues (summed over replicas, averaged over the window)."""

    rate_rps: float
    waiting: float


@dataclass(frozen=True)
class Run:
    """From `since` (unix seconds) until the next run starts, the checks recommended `count`."""

    since: float
    count: int


def recommend(policy: ReplicaPolicy, reading: Reading, *, capacity_rps: float, current: int,
              room: int) -> int:
    """The count this reading asks for, within minReplicas..maxReplicas and the pool's room.

    Finished requests undercount demand once replicas saturate (they finish at capacity
    however many arrive), so a standing queue of a request or more per replica asks for one
    replica more than the current count whatever the rate says."""
    if capacity_rps <= 0:
        return bounded(policy, current)
    n = math.ceil(reading.rate_rps / (capacity_rps * policy.target_utilization) - 1e-9)
    if current > 0 and reading.waiting >= current:
        n = max(n, current + 1)
    return min(bounded(policy, n), max(room, policy.min_replicas))


def record(history: list[Run], now: float, count: int, *, keep_s: float) -> list[Run]:
    """`history` with this check's recommendation: a new run only when the count changes;
    runs that ended more than `keep_s` ago are dropped (the longest window looks no further),
    and at most MAX_RECOMMENDATIONS are kept."""
    runs = list(history)
    if not runs or runs[-1].count != count:
        runs.append(Run(since=now, count=count))
    # A run ends where the next begins; the last one is still going.
    ends = [r.since for r in runs[1:]] + [now]
    runs = [r for r, end in zip(runs, ends, strict=True) if end >= now - keep_s]
    return runs[-MAX_RECOMMENDATIONS:]


def _within(history: list[Run], now: float, window_s: float) -> list[int]:
    """Counts recommended within the last `window_s`: a run counts until the next began (its
    last check is somewhere before that), the current run always."""
    ends = [r.since for r in history[1:]]
    return [r.count for r, end in zip(history, ends, strict=False) if end > now - window_s
            ] + [history[-1].count] if history else []


def stabilize(policy: ReplicaPolicy, history: list[Run], now: float, current: int) -> int:
    """The count to run now: `current` moved to the stabilized bounds of the history (which
    holds at least this check's recommendation)."""
    up = _within(history, now, policy.scale_up_stabilization_seconds)
    down = _within(history, now, policy.scale_down_stabilization_seconds)
    desired = current
    if up and desired < min(up):
        desired = min(up)
    if down and desired > max(down):
        desired = max(down)
    return desired
