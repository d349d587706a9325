"""An OptimizedEndpoint's health in kstatus's terms: the Reconciling and Stalled conditions.

kstatus (sigs.k8s.io/cli-utils/pkg/kstatus), which Flux's kustomize-controller, kpt and the
cli-utils applier use for health checks, reads a custom resource without custom code from
`status.observedGeneration` (behind `metadata.generation`: still in progress) and two
"abnormal-true" conditions: `Reconciling` True while the controller works towards the spec,
`Stalled` True when it cannot get there without a spec change or outside help. Neither True
(and the generation observed) means Current.

Both are derived here, in one pure function of the rest of status (phase, rollout, the step
conditions), and rewritten by every status write (`Endpoint.commit`): no writer sets them by
hand, so they cannot disagree with the phase they summarize. At most one of them is present,
and only while True (as Flux's own controllers write them): kstatus reports the first True one
it meets, and Stalled, when both could be said, is the one to act on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from trilemma.operator import status
from trilemma.operator.resources import (
    Condition,
    ConditionType,
    EndpointPhase,
    OptimizedEndpointStatus,
    RolloutState,
)

Obj = dict[str, Any]

# The conditions an Outcome (phase Failed or Infeasible) sets False, in the order a reconcile
# meets them: the first False one names why the endpoint stalled.
_STEPS = (ConditionType.VALIDATED, ConditionType.OPTIMIZED, ConditionType.DEPLOYED)
RECOMMEND_ONLY = "RecommendOnly"


@dataclass(frozen=True)
class Verdict:
    """The derived condition that holds (status True), and why."""

    kind: ConditionType
    reason: str
    message: str


def _condition(st: OptimizedEndpointStatus, kind: ConditionType) -> Condition | None:
    return next((c for c in st.conditions if c.type is kind), None)


def _stalled(st: OptimizedEndpointStatus) -> tuple[str, str] | None:
    """(reason, message) when the operator cannot reach the spec by itself."""
    if st.phase in (EndpointPhase.FAILED, EndpointPhase.INFEASIBLE):
        failed = next((c for k in _STEPS if (c := _condition(st, k)) and c.status == "False"),
                      None)
        return (failed.reason if failed else st.phase.value), st.message
    rollout, active = st.rollout, st.active_configuration
    # Rolled back: the old configuration serves, and the spec's (still the active plan) failed
    # to become available. Retrying it would fail the same way (reconcile keeps it failed),
    # so only a spec change or a fix outside (quota, nodes, image) moves it on.
    if (rollout is not None and rollout.state is RolloutState.FAILED
            and rollout.from_hash is not None and st.serving_hash == rollout.from_hash
            and active is not None and active.hash == rollout.to_hash):
        return "RolledBack", st.message or rollout.message
    return None


def _reconciling(st: OptimizedEndpointStatus) -> tuple[str, str] | None:
    """(reason, message) while the operator is still working towards the spec."""
    rollout = st.rollout
    if rollout is not None and rollout.state is RolloutState.PROGRESSING:
        return ("RollingOut" if rollout.from_hash else "Deploying"), st.message
    if st.phase is EndpointPhase.PENDING:
        deployed = _condition(st, ConditionType.DEPLOYED)
        if deployed is not None and deployed.reason == RECOMMEND_ONLY:
            return None  # autoApply false: the plan (in status and its ConfigMap) is the goal
        return "Pending", st.message or "not reconciled yet"
    if st.phase in (EndpointPhase.OPTIMIZING, EndpointPhase.DEPLOYING):
        return st.phase.value, st.message
    ready = _condition(st, ConditionType.READY)
    if ready is not None and ready.status != "True":
        # Phase Ready, but the last check of the serving configuration did not confirm it
        # (a failed resync): the operator retries at the next one.
        return ready.reason, ready.message
    return None


def kstatus_verdict(st: OptimizedEndpointStatus) -> Verdict | None:
    """The kstatus condition that holds for a status (Stalled first), or None: settled."""
    stalled = _stalled(st)
    if stalled is not None:
        return Verdict(ConditionType.STALLED, *stalled)
    reconciling = _reconciling(st)
    if reconciling is not None:
        return Verdict(ConditionType.RECONCILING, *reconciling)
    return None


def with_kstatus(wire: Obj, *, generation: int | None, now: str) -> list[Obj]:
    """The conditions of a status (wire form) with Reconciling and Stalled made to agree with
    the rest of it: the one that holds set True (its lastTransitionTime kept while it holds),
    the other absent. Absent rather than False, as Flux's own controllers do: kstatus reads
    both the same, and tools (and tests) that list an object's False conditions as its
    problems would list these too."""
    derived = {ConditionType.RECONCILING.value, ConditionType.STALLED.value}
    verdict = kstatus_verdict(OptimizedEndpointStatus.model_validate(wire))
    conditions: list[Obj] = list(wire.get("conditions") or [])
    kept = [c for c in conditions if c.get("type") not in derived or (
        verdict is not None and c.get("type") == verdict.kind.value)]
    if verdict is None:
        return kept
    return status.set_condition(kept, verdict.kind, True, verdict.reason, verdict.message,
                                generation=generation, now=now)
