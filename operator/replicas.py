"""How many replicas of the planned configuration to deploy: pure, so it is tested without I/O.

The plan decides the configuration and a count sized for the planned rate; between re-plans
the count moves, and exactly one writer decides it (spec.replicas.owner):

- `operator`: the operator's scaler (autoscale.py decides, scaler.py reads Prometheus) writes
  its `desiredReplicas` into status.scaling; this module deploys that.
- `external`: kubectl scale, an HPA or KEDA write spec.replicas.count through the scale
  subresource; this module deploys that, and the operator never writes it.

A re-plan that changes the layout (a new configuration hash) carries the count over, scaled
by per-replica capacity: 4 replicas of 10 req/s become 2 of 20 req/s, not 4 of 20 (the writer
then adjusts). For a disaggregated plan a "replica" is one decode worker with its share of
prefill workers, so both pools move in the plan's ratio.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from trilemma.operator.endpoint_status import ScalingStatus
from trilemma.operator.resources import ReplicaOwner, ReplicaPolicy
from trilemma.optimizer.search import Choice, ServingConfig


def unit_capacity(choice: Choice) -> float:
    """Requests/s one replica of the plan's configuration sustains within the SLO."""
    return choice.prediction.capacity_rps / max(choice.config.replicas, 1)


def scaled(config: ServingConfig, count: int) -> ServingConfig:
    """`config` with `count` replicas; a disaggregated plan's prefill pool keeps its ratio to
    the decode pool (rounded up: prefill short-changed is TTFT lost), at least one while any
    decode worker runs. A mixed plan's other GPU types keep theirs to its own worker's the
    same way: its "replica" is one of its worker's with its share of the other types'."""
    if config.mixed:
        return dataclasses.replace(config, replicas=count, mixed=tuple(
            dataclasses.replace(p, replicas=_share(count, p.replicas, config.replicas))
            for p in config.mixed))
    if config.prefill is None or config.prefill_replicas < 1:
        return dataclasses.replace(config, replicas=count)
    prefill = _share(count, config.prefill_replicas, config.replicas)
    return dataclasses.replace(config, replicas=count, prefill_replicas=prefill)


def _share(count: int, part: int, whole: int) -> int:
    """`part` per `whole` at `count`: rounded up, at least one while count is not 0."""
    return 0 if count == 0 else max(1, math.ceil(count * part / max(whole, 1) - 1e-9))


def carried(count: int, old_capacity: float, new_capacity: float) -> int:
    """`count` replicas of `old_capacity` req/s each, as replicas of `new_capacity`: the same
    capacity, rounded up; never 0 unless it was 0."""
    if count <= 0 or new_capacity <= 0 or old_capacity <= 0:
        return count
    return max(1, math.ceil(count * old_capacity / new_capacity - 1e-9))


@dataclass(frozen=True)
class Count:
    """The count to deploy, and the sentence status.scaling.message gives for it."""

    replicas: int
    why: str


def decide(policy: ReplicaPolicy, *, plan_replicas: int, layout_hash: str, capacity: float,
           prior: ScalingStatus | None) -> Count:
    """The replicas to deploy for a configuration of `layout_hash` whose replicas carry
    `capacity` req/s each; `prior` is status.scaling as last written (None: never)."""
    same = prior is not None and prior.layout_hash == layout_hash
    moved = prior is not None and not same and prior.replicas > 0

    def carry() -> Count:
        assert prior is not None
        n = carried(prior.replicas, prior.replica_capacity_rps, capacity)
        return Count(n, f"carried over from {prior.replicas} replicas of configuration "
                        f"{prior.layout_hash} ({prior.replica_capacity_rps:g} req/s each) to "
                        f"{n} of {capacity:.3g} req/s")

    if policy.owner is ReplicaOwner.EXTERNAL:
        count = policy.count
        if count is not None and not (moved and prior is not None
                                      and prior.spec_count == count):
            return Count(count, f"replicas.count={count} (owner external)")
        # The writer has not spoken since the layout changed (or never): keep what runs.
        if moved:
            return carry()
        if same and prior is not None:
            return Count(prior.replicas, prior.message)
        return Count(plan_replicas, f"the plan's {plan_replicas} (owner external, "
                                    "replicas.count unset)")
    if same and prior is not None and prior.desired_replicas is not None:
        n = bounded(policy, prior.desired_replicas)
        return Count(n, f"{n} from the observed rate (owner operator)")
    if moved:
        c = carry()
        return Count(bounded(policy, c.replicas), c.why)
    n = bounded(policy, plan_replicas)
    return Count(n, f"the plan's {plan_replicas}" + (
        f", within minReplicas..maxReplicas: {n}" if n != plan_replicas else ""))


def bounded(policy: ReplicaPolicy, n: int) -> int:
    """`n` within the spec's minReplicas..maxReplicas (the pool's room is checked later)."""
    top = policy.max_replicas if policy.max_replicas is not None else n
    return max(policy.min_replicas, min(n, top))
