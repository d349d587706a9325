"""The retune state machine: should the endpoint re-plan for the traffic it sees?

Pure: no I/O, no clock. `decide(state, check, spec)` takes the previous `RetuneState` (kept
in `status.retune`), one `Check` (the time, the estimator's observation, what the running
plan was made for, observed SLO misses, whether a rollout is in flight) and the endpoint's
retune settings, and returns a `Decision`: the action, why, and the next state. The I/O
shell, closed_loop.py, gathers the check's inputs (Prometheus, the stored plan), acts on the
decision (re-plans, rolls out: acceptance.py judges the new plan) and writes the state back.

    check -> decide -> Replan? -> plan + re-predict -> acceptance.accept
        -> rolled_out / record_failure -> retune_history.append(status.retuneHistory)

Hysteresis: a drift (drift.py) or SLO miss must persist for several checks; a drift episode
ends only below the exit band; a cooldown follows each rollout; a workload whose re-plan
failed is not re-planned again for a day.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from trilemma.operator.drift import Drift, WorkloadSummary, drift, num
from trilemma.operator.estimator import MetricsReason, ObservedWorkload
from trilemma.operator.resources import DriftThresholds, Retune
from trilemma.operator.status_models import MAX_FAILED, RetuneFailure, RetuneStatus
from trilemma.optimizer.spec import Slo


@dataclass(frozen=True, kw_only=True)
class Policy:
    """The loop's fixed knobs (the CRD's `retune` holds the per-endpoint ones)."""

    # A drift or SLO miss must show in this many consecutive checks: one window's spike (a
    # batch job, a client retry storm) is not a new workload worth a search and a rollout.
    persist_checks: int = 2
    # A drift episode ends only when every figure falls below threshold x this. Between the
    # two the count neither grows nor resets (a Schmitt trigger): traffic hovering at a
    # threshold is one episode, not a flapping series of them.
    exit_band: float = 0.5
    # Requests per window before figures count: the mean length of 50 requests with a CV of
    # 1 is within +-14% (one standard error), under half the default 30% threshold.
    min_samples: int = 50
    # An observed percentile must exceed its target by this share: histogram buckets are
    # interpolated, so a percentile at the target's own bucket edge reads a few % high.
    slo_tolerance: float = 0.05
    # A workload whose re-plan failed or was rejected is not re-planned again for this long
    # (unless its basis changes): the pool and prices that decided it change slowly.
    failed_ttl_s: float = 86400.0
    max_failed: int = MAX_FAILED  # failure records kept in status (the CRD's bound)
    # A timer that fires a little early still counts as on time (Kopf timers jitter).
    due_slack: float = 0.1


POLICY = Policy()


# ---- SLO check ----------------------------------------------------------------------------


def slo_violations(observed: ObservedWorkload, slo: Slo, *,
                   min_samples: int = POLICY.min_samples,
                   tolerance: float = POLICY.slo_tolerance) -> list[str]:
    """Observed latency percentiles over their SLO targets, one sentence each.

    TTFT is compared with ttftMs; the engines export inter-token latency, not per-request
    TPOT, so tpotMs (and minTokensPerSecondPerUser, as a median bound) is checked against ITL
    at the same percentile. End-to-end bounds have no observed counterpart and are skipped.
    Fewer than `min_samples` requests prove nothing: no violations.
    """
    if observed.samples < min_samples:
        return []
    out: list[str] = []

    def check(name: str, seen: float | None, target: float, what: str) -> None:
        if seen is not None and seen > target * (1.0 + tolerance):
            out.append(f"{name} {num(seen)} ms exceeds {what} {num(target)} ms "
                       f"({seen / target - 1:+.0%})")

    for pct, target in slo.ttft_ms.items() if slo.ttft_ms else ():
        check(f"TTFT {pct}", getattr(observed.ttft_ms, pct), target, f"the {pct} target")
    for pct, target in slo.tpot_ms.items() if slo.tpot_ms else ():
        check(f"ITL {pct}", getattr(observed.itl_ms, pct), target, f"the TPOT {pct} target")
    if slo.min_tokens_per_second_per_user is not None:
        check("ITL p50", observed.itl_ms.p50, 1000.0 / slo.min_tokens_per_second_per_user,
              f"{num(slo.min_tokens_per_second_per_user)} tokens/s per user, i.e.")
    return out



# ---- state --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Failure:
    """A workload whose re-plan failed (infeasible, rolled back) or was not worth rolling out.

    `basis` names what else that outcome depended on (the spec generation, the calibration):
    a different basis may decide differently, so only the same basis blocks a retry."""

    workload: WorkloadSummary
    digest: str
    time: float
    reason: str
    basis: str = ""

    def to_status(self) -> RetuneFailure:
        return RetuneFailure(workload=self.digest, time=stamp(self.time), reason=self.reason,
                             basis=self.basis, figures=self.workload.to_status())

    @classmethod
    def from_status(cls, data: RetuneFailure) -> Failure:
        return cls(workload=WorkloadSummary.from_status(data.figures), digest=data.workload,
                   time=unix(data.time), reason=data.reason, basis=data.basis)


@dataclass(frozen=True, kw_only=True)
class RetuneState:
    """What the loop remembers between checks (`status.retune`)."""

    last_check: float | None = None
    drift_checks: int = 0  # consecutive checks of one drift episode
    violation_checks: int = 0  # consecutive checks with an SLO violation
    last_replan: float | None = None
    last_replan_workload: str | None = None  # WorkloadSummary.digest of that re-plan
    last_rollout: float | None = None
    failed: tuple[Failure, ...] = ()

    def to_status(self) -> RetuneStatus:
        return RetuneStatus(
            drift_checks=self.drift_checks, violation_checks=self.violation_checks,
            last_check_time=_stamp(self.last_check), last_replan_time=_stamp(self.last_replan),
            last_rollout_time=_stamp(self.last_rollout),
            last_replan_workload=self.last_replan_workload,
            failed=[f.to_status() for f in self.failed] or None)

    @classmethod
    def from_status(cls, data: RetuneStatus | Mapping[str, Any] | None) -> RetuneState:
        """The state from `status.retune` (its model or wire form); missing keys (a new
        endpoint) take defaults."""
        d = RetuneStatus.model_validate(data or {})
        return cls(last_check=_unix(d.last_check_time), drift_checks=d.drift_checks,
                   violation_checks=d.violation_checks, last_replan=_unix(d.last_replan_time),
                   last_replan_workload=d.last_replan_workload,
                   last_rollout=_unix(d.last_rollout_time),
                   failed=tuple(Failure.from_status(f) for f in d.failed or ()))


def drift_checks_needed(spec: Retune, policy: Policy = POLICY) -> int:
    """Consecutive drifted checks before a re-plan: `persist_checks`, and at least enough
    that the drift has lasted a whole query window. A window that still mixes the old and the
    new traffic would re-plan for a workload that exists in neither (and, the next window
    showing the rest of the shift, re-plan again)."""
    return max(policy.persist_checks,
               math.ceil(spec.window_seconds / spec.interval_seconds) + 1)


def due(state: RetuneState, now: float, spec: Retune, policy: Policy = POLICY) -> bool:
    """Whether `interval_seconds` have passed since the last check."""
    return (state.last_check is None
            or now - state.last_check >= spec.interval_seconds * (1.0 - policy.due_slack))


def rolled_out(state: RetuneState, now: float) -> RetuneState:
    """The state once a new configuration starts rolling out: the cooldown starts now."""
    return dataclasses.replace(state, last_rollout=now, drift_checks=0, violation_checks=0)


def record_failure(state: RetuneState, now: float, workload: WorkloadSummary, reason: str, *,
                   thresholds: DriftThresholds, basis: str = "",
                   policy: Policy = POLICY) -> RetuneState:
    """The state after a re-plan for `workload` failed or was rejected: that workload (within
    the drift thresholds, same basis) is not re-planned again for `policy.failed_ttl_s`."""
    digest = workload.digest(thresholds)
    kept = [f for f in state.failed if now - f.time < policy.failed_ttl_s
            and not (f.digest == digest and f.basis == basis)]
    new = Failure(workload=workload, digest=digest, time=now, reason=reason, basis=basis)
    return dataclasses.replace(state, failed=tuple([*kept, new][-policy.max_failed:]))


# ---- the periodic decision ----------------------------------------------------------------


class Action(enum.StrEnum):
    NO_CHANGE = "NoChange"
    REPLAN = "Replan"
    HOLD = "Hold"


class Why(enum.StrEnum):
    """A decision's reason, in the CamelCase Kubernetes uses for condition and event reasons."""

    WITHIN_THRESHOLDS = "WithinThresholds"
    PENDING = "Pending"  # drift or SLO miss seen, not yet for persist_checks checks
    NO_PLAN = "NoPlan"  # nothing to compare the observation with
    DRIFT = "WorkloadDrift"
    SLO_VIOLATION = "SloViolation"
    DISABLED = "RetuneDisabled"
    NOT_DUE = "NotDue"
    ROLLOUT_IN_FLIGHT = "RolloutInFlight"
    METRICS_MISSING = "MetricsMissing"
    METRICS_STALE = "MetricsStale"
    PROMETHEUS_ERROR = "PrometheusError"
    NOT_ENOUGH_SAMPLES = "NotEnoughSamples"
    COOLDOWN = "Cooldown"
    ALREADY_FAILED = "WorkloadAlreadyFailed"


_METRICS_HOLD = {MetricsReason.MISSING: Why.METRICS_MISSING,
                 MetricsReason.STALE: Why.METRICS_STALE,
                 MetricsReason.PROMETHEUS_ERROR: Why.PROMETHEUS_ERROR}


@dataclass(frozen=True, kw_only=True)
class Check:
    """One traffic check's inputs, all gathered before deciding: `decide` reads nothing else.

    `availability`: why there is no usable observation when `observed` is None (or the
    observation's own reason otherwise); `planned`: the workload the running plan was made for
    (None: no plan to compare with); `violations`: observed SLO misses (`slo_violations`);
    `basis`: what else a failed re-plan depended on (the spec digest); `serving_since`: when
    the serving configuration took the traffic (its rollout began)."""

    now: float
    observed: ObservedWorkload | None
    availability: MetricsReason | str = MetricsReason.AVAILABLE
    planned: WorkloadSummary | None = None
    violations: tuple[str, ...] = ()
    rolling_out: bool = False
    basis: str = ""
    serving_since: float | None = None


@dataclass(frozen=True, kw_only=True)
class Decision:
    action: Action
    why: Why
    message: str
    state: RetuneState  # to write back to status.retune (unchanged for NOT_DUE, DISABLED)
    workload: WorkloadSummary | None = None  # on Replan: the observed workload to plan for
    figures: dict[str, float] = field(default_factory=dict)


def decide(state: RetuneState, check: Check, spec: Retune,
           policy: Policy = POLICY) -> Decision:
    """The periodic check: re-plan, hold (and why), or nothing to do.

    Holds first: retune disabled, not due, a rollout in flight (its window mixes two
    configurations), metrics missing, stale or unreachable, too few requests. Then the counts:
    a drift over its threshold adds a check, one below threshold x exit_band ends the episode,
    one in between changes nothing; an SLO violation adds a check, none resets. Either count
    reaching `persist_checks` re-plans, unless the cooldown since the last rollout has not
    passed or the same workload (within thresholds, same `basis`) failed recently. Violations
    seen in a window that began before the last rollout describe the old configuration and
    are ignored.
    """
    held = _hold_before_counting(state, check, spec, policy)
    if held is not None:
        return held
    assert check.observed is not None  # no hold: the observation is usable
    counts = _count(state, check, spec, policy)
    if not (counts.by_drift or counts.by_slo):
        return _no_change(counts, policy)
    return _replan_or_hold(state, check, spec, counts, policy)


def _hold_before_counting(state: RetuneState, check: Check, spec: Retune,
                          policy: Policy) -> Decision | None:
    """A hold that leaves the counts alone: nothing to judge yet, or nothing judgeable."""
    if not spec.enabled:
        return Decision(action=Action.HOLD, why=Why.DISABLED, message="retune.enabled is false",
                        state=state)
    if not due(state, check.now, spec, policy):
        return Decision(action=Action.HOLD, why=Why.NOT_DUE,
                        message=f"next check {spec.interval_seconds}s after the last",
                        state=state)
    checked = dataclasses.replace(state, last_check=check.now)
    observed = check.observed
    measured = _drift(check, spec)

    def hold(why: Why, message: str) -> Decision:
        return Decision(action=Action.HOLD, why=why, message=message, state=checked,
                        figures=measured.figures() if measured is not None else {})

    if check.rolling_out:
        return hold(Why.ROLLOUT_IN_FLIGHT, "a rollout is in flight: the metrics window mixes "
                                           "two configurations")
    reason = MetricsReason(check.availability)
    if observed is not None and reason is MetricsReason.AVAILABLE:
        reason = observed.availability.reason
    if observed is None or reason is not MetricsReason.AVAILABLE:
        message = observed.availability.message if observed is not None else ""
        return hold(_METRICS_HOLD.get(reason, Why.METRICS_MISSING),
                    message or f"no observation ({reason.value})")
    if observed.samples < policy.min_samples:
        return hold(Why.NOT_ENOUGH_SAMPLES,
                    f"{observed.samples:.0f} requests in the window; drift and SLO checks "
                    f"need {policy.min_samples}")
    return None


def _drift(check: Check, spec: Retune) -> Drift | None:
    """The drift from the running plan; None without a plan or a usable observation."""
    if check.planned is None or check.observed is None or not check.observed.availability.ok:
        return None
    return drift(check.planned, check.observed, spec.drift)


@dataclass(frozen=True, kw_only=True)
class _Counts:
    """A due check's drift and SLO counts, and what they add up to."""

    state: RetuneState  # checked and counted
    drift: Drift | None
    stale: bool  # the window began before the serving configuration took the traffic
    live: list[str]  # the violations that count
    drifting: bool
    needed: int  # drifted checks needed to re-plan
    by_drift: bool
    by_slo: bool

    @property
    def parts(self) -> list[str]:
        return [*self.live, *([self.drift.reason] if self.drifting and self.drift else [])]

    @property
    def figures(self) -> dict[str, float]:
        return self.drift.figures() if self.drift is not None else {}


def _count(state: RetuneState, check: Check, spec: Retune, policy: Policy) -> _Counts:
    assert check.observed is not None
    measured = _drift(check, spec)
    # A window that began before the serving configuration took the traffic (the last
    # rollout, or the first deployment: `serving_since`) mixes in another configuration's
    # requests, or none at all: it judges neither latencies nor drift.
    starts = [t for t in (state.last_rollout, check.serving_since) if t is not None]
    stale = bool(starts) and check.observed.observed_at - check.observed.window_s < max(starts)
    drift_checks = state.drift_checks
    if measured is not None and not stale:
        if measured.exceeded:
            drift_checks += 1
        elif measured.level < policy.exit_band:
            drift_checks = 0
    live = [] if stale else list(check.violations)
    counted = dataclasses.replace(state, last_check=check.now, drift_checks=drift_checks,
                                  violation_checks=state.violation_checks + 1 if live else 0)
    drifting = measured is not None and bool(measured.exceeded) and not stale
    needed = drift_checks_needed(spec, policy)
    return _Counts(state=counted, drift=measured, stale=stale, live=live, drifting=drifting,
                   needed=needed, by_drift=drifting and drift_checks >= needed,
                   by_slo=counted.violation_checks >= policy.persist_checks)


def _no_change(counts: _Counts, policy: Policy) -> Decision:
    """Counted, but not (yet) enough to re-plan: pending, no plan, or within thresholds."""
    st = counts.state
    if counts.drifting or counts.live:
        n, of = ((st.drift_checks, counts.needed) if counts.drifting
                 else (st.violation_checks, policy.persist_checks))
        return Decision(action=Action.NO_CHANGE, why=Why.PENDING,
                        message=f"{'; '.join(counts.parts)} ({n} of {of} checks)",
                        state=st, figures=counts.figures)
    if counts.drift is None:
        return Decision(action=Action.NO_CHANGE, why=Why.NO_PLAN,
                        message="no active plan to compare with", state=st)
    message = counts.drift.reason + ("; no SLO violation observed" if not counts.stale else
                                     "; not judged: the window began before the serving "
                                     "configuration took the traffic")
    return Decision(action=Action.NO_CHANGE, why=Why.WITHIN_THRESHOLDS, message=message,
                    state=st, figures=counts.figures)


def _replan_or_hold(state: RetuneState, check: Check, spec: Retune, counts: _Counts,
                    policy: Policy) -> Decision:
    """Enough to re-plan: re-plan, unless the cooldown or an earlier failure holds it."""
    assert check.observed is not None
    now = check.now
    why = Why.SLO_VIOLATION if counts.by_slo else Why.DRIFT
    message = "; ".join(counts.parts)

    def hold(why: Why, text: str) -> Decision:
        return Decision(action=Action.HOLD, why=why, message=f"{message}; {text}",
                        state=counts.state, figures=counts.figures)

    if state.last_rollout is not None and now - state.last_rollout < spec.cooldown_seconds:
        left = spec.cooldown_seconds - (now - state.last_rollout)
        return hold(Why.COOLDOWN, f"the last rollout was {now - state.last_rollout:.0f}s ago, "
                                  f"{left:.0f}s of the {spec.cooldown_seconds}s cooldown left")
    workload = WorkloadSummary.of_observed(check.observed)
    failure = _failure_for(state.failed, workload, spec.drift, check.basis, now, policy)
    if failure is not None:
        return hold(Why.ALREADY_FAILED, f"a re-plan for this workload failed at "
                                        f"{stamp(failure.time)}: {failure.reason}")
    replanned = dataclasses.replace(counts.state, drift_checks=0, violation_checks=0,
                                    last_replan=now,
                                    last_replan_workload=workload.digest(spec.drift))
    return Decision(action=Action.REPLAN, why=why, message=message, state=replanned,
                    workload=workload, figures=counts.figures)


def _failure_for(failed: Sequence[Failure], workload: WorkloadSummary,
                 thresholds: DriftThresholds, basis: str, now: float,
                 policy: Policy) -> Failure | None:
    for f in reversed(failed):
        if (f.basis == basis and now - f.time < policy.failed_ttl_s
                and not drift(f.workload, workload, thresholds).exceeded):
            return f
    return None


# ---- small helpers --------------------------------------------------------------------------


def stamp(unix_s: float) -> str:
    """RFC 3339 to the second, as status writes times."""
    stamp = datetime.datetime.fromtimestamp(round(unix_s), datetime.UTC)
    return stamp.isoformat().replace("+00:00", "Z")


def unix(text: str) -> float:
    return datetime.datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()


def _stamp(unix_s: float | None) -> str | None:
    return None if unix_s is None else stamp(unix_s)


def _unix(text: str | None) -> float | None:
    return unix(text) if text else None
