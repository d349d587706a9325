"""The closed loop's decisions: has traffic drifted from the plan, should the endpoint re-plan,
and should the new plan replace the running one.

Pure functions, no I/O. A Kopf timer feeds them: the active plan (its `request` digest and
recommendation), the estimator's `ObservedWorkload` and the small `RetuneState` kept in
`status.retune`; they return decisions and the next state, which the timer writes back.

    estimate_workload -> drift, slo_violations -> decide -> Replan?
        -> plan(observed_request(...)) and repredict(current config, same request)
        -> accept -> rolled_out / record_failure -> history_append(status.retuneHistory)

Rates: a plan is sized for `design_rate_rps` = mean rate x peakFactor, while Prometheus sees
the mean rate. Drift therefore compares the observed mean with the design rate divided by the
spec's peak factor (mean with mean), and a re-plan keeps the spec's peak factor
(estimator.to_workload_spec does), so the loop never mistakes the planned headroom for drift.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from trilemma.operator import estimator
from trilemma.operator.estimator import MetricsReason, ObservedWorkload
from trilemma.operator.resources import DriftThresholds, Retune
from trilemma.optimizer.spec import Objective, PlanRequest, Slo

Obj = dict[str, Any]


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
    max_failed: int = 5  # failure records kept in status
    # A timer that fires a little early still counts as on time (Kopf timers jitter).
    due_slack: float = 0.1


POLICY = Policy()


# ---- workload summaries and drift ---------------------------------------------------------


class Dimension(enum.Enum):
    """The figures drift is measured on: label, unit, status key, threshold field, relative."""

    RATE = ("request rate", "req/s", "rateRps", "rate", True)
    PROMPT = ("prompt length", "tokens", "promptTokens", "prompt_tokens", True)
    OUTPUT = ("output length", "tokens", "outputTokens", "output_tokens", True)
    PREFIX = ("prefix hit share", "", "prefixShare", "prefix_share", False)

    def __init__(self, label: str, unit: str, key: str, threshold_field: str,
                 relative: bool) -> None:
        self.label = label
        self.unit = unit
        self.key = key
        self.threshold_field = threshold_field
        self.relative = relative

    def threshold(self, thresholds: DriftThresholds) -> float:
        return float(getattr(thresholds, self.threshold_field))


@dataclass(frozen=True, kw_only=True)
class WorkloadSummary:
    """The four figures drift compares: mean rate, mean prompt and output tokens, prefix share
    (prompt tokens served from the cache, 0-1; None when unknown)."""

    rate_rps: float
    prompt_tokens: float
    output_tokens: float
    prefix_share: float | None = None

    @classmethod
    def of_plan(cls, plan: Mapping[str, Any], *, peak_factor: float) -> WorkloadSummary:
        """What a plan dict (Plan.to_dict()) was made for; `peak_factor` is the spec's, since
        the plan's design rate is the mean rate times it."""
        request = plan["request"]
        wl = request["workload"]
        prompt = float(wl["prompt_tokens_mean"])
        cached = float(wl.get("cached_tokens_mean") or 0.0)
        return cls(rate_rps=float(request["design_rate_rps"]) / max(peak_factor, 1.0),
                   prompt_tokens=prompt, output_tokens=float(wl["output_tokens_mean"]),
                   prefix_share=cached / prompt if prompt > 0 else 0.0)

    @classmethod
    def of_observed(cls, observed: ObservedWorkload) -> WorkloadSummary:
        """The observation's figures; ValueError when rate or a mean length is unknown."""
        rate, prompt, output = (observed.rate_rps, observed.prompt_tokens.mean,
                                observed.output_tokens.mean)
        if rate is None or prompt is None or output is None:
            raise ValueError(f"incomplete observation ({observed.availability.message})")
        return cls(rate_rps=rate, prompt_tokens=prompt, output_tokens=output,
                   prefix_share=observed.prefix_hit_share)

    def value(self, dim: Dimension) -> float | None:
        return {Dimension.RATE: self.rate_rps, Dimension.PROMPT: self.prompt_tokens,
                Dimension.OUTPUT: self.output_tokens, Dimension.PREFIX: self.prefix_share}[dim]

    def digest(self, thresholds: DriftThresholds) -> str:
        """Names the workload coarsely: one bucket per threshold step (log-spaced for the
        relative figures), so that noise inside a threshold mostly keeps the same name."""
        parts = []
        for dim in Dimension:
            v = self.value(dim)
            t = dim.threshold(thresholds)
            if v is None:
                parts.append("-")
            elif dim.relative:
                parts.append(str(math.floor(math.log(max(v, 1e-9)) / math.log1p(t))))
            else:
                parts.append(str(math.floor(v / t)))
        return hashlib.sha256(".".join(parts).encode()).hexdigest()[:10]

    def to_status(self) -> Obj:
        return {d.key: _sig(v) for d in Dimension if (v := self.value(d)) is not None}

    @classmethod
    def from_status(cls, data: Mapping[str, Any]) -> WorkloadSummary:
        share = data.get(Dimension.PREFIX.key)
        return cls(rate_rps=float(data[Dimension.RATE.key]),
                   prompt_tokens=float(data[Dimension.PROMPT.key]),
                   output_tokens=float(data[Dimension.OUTPUT.key]),
                   prefix_share=None if share is None else float(share))


@dataclass(frozen=True, kw_only=True)
class Change:
    """One figure, planned against observed, and its threshold."""

    dimension: Dimension
    planned: float
    observed: float | None
    threshold: float

    @property
    def change(self) -> float | None:
        """Relative (observed / planned - 1) or absolute (observed - planned); None: unknown."""
        if self.observed is None:
            return None
        if not self.dimension.relative:
            return self.observed - self.planned
        if self.planned <= 0:
            return math.inf if self.observed > 0 else 0.0
        return self.observed / self.planned - 1.0

    @property
    def level(self) -> float:
        """|change| / threshold: 1 is the threshold, 0 for unknown figures."""
        c = self.change
        return 0.0 if c is None else abs(c) / self.threshold

    @property
    def exceeded(self) -> bool:
        return self.level > 1.0

    def sentence(self) -> str:
        d, c = self.dimension, self.change
        if c is None:
            return f"{d.label} not observed"
        assert self.observed is not None
        if d.relative:
            figures = f"{_num(self.planned)} -> {_num(self.observed)} {d.unit}"
            text = f"{d.label} {c:+.0%} ({figures})"
            limit = f"{self.threshold:.0%}"
        else:
            text = (f"{d.label} {c * 100:+.0f} points ({self.planned:.0%} -> "
                    f"{self.observed:.0%})")
            limit = f"{self.threshold * 100:.0f} points"
        return f"{text} {'exceeds' if self.exceeded else 'within'} {limit}"


@dataclass(frozen=True, kw_only=True)
class Drift:
    """How far the observed workload is from the planned one, figure by figure."""

    changes: tuple[Change, ...]

    @property
    def exceeded(self) -> tuple[Dimension, ...]:
        return tuple(c.dimension for c in self.changes if c.exceeded)

    @property
    def level(self) -> float:
        """The largest |change| / threshold: above 1 is drift, below the exit band is calm."""
        return max((c.level for c in self.changes), default=0.0)

    @property
    def reason(self) -> str:
        """One line: the figures over their thresholds, largest first, or the largest one."""
        known = sorted((c for c in self.changes if c.change is not None),
                       key=lambda c: -c.level)
        if not known:
            return "no workload figures observed"
        over = [c.sentence() for c in known if c.exceeded]
        if over:
            return "; ".join(over)
        return f"workload within thresholds (largest: {known[0].sentence()})"

    def figures(self) -> dict[str, float]:
        """Observed figures and their changes, for events and status."""
        out: dict[str, float] = {}
        for c in self.changes:
            if c.observed is not None and c.change is not None and math.isfinite(c.change):
                out[c.dimension.key] = _sig(c.observed)
                out[f"{c.dimension.key}Change"] = round(c.change, 4)
        return out


def drift(planned: WorkloadSummary, observed: ObservedWorkload | WorkloadSummary,
          thresholds: DriftThresholds) -> Drift:
    """Each figure's change from the plan. Rate and lengths are relative changes, the prefix
    share an absolute one (a share near 0 makes relative changes meaningless). A figure the
    observation lacks (e.g. the engine exports no prefix-cache counters) is unknown, never
    drift; a plan without prefix reuse is compared as a share of 0."""
    if isinstance(observed, ObservedWorkload):
        seen: Mapping[Dimension, float | None] = {
            Dimension.RATE: observed.rate_rps, Dimension.PROMPT: observed.prompt_tokens.mean,
            Dimension.OUTPUT: observed.output_tokens.mean,
            Dimension.PREFIX: observed.prefix_hit_share}
    else:
        seen = {d: observed.value(d) for d in Dimension}
    changes = []
    for d in Dimension:
        p = planned.value(d)
        if p is None:
            continue
        changes.append(Change(dimension=d, planned=p, observed=seen[d],
                              threshold=d.threshold(thresholds)))
    return Drift(changes=tuple(changes))


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
            out.append(f"{name} {_num(seen)} ms exceeds {what} {_num(target)} ms "
                       f"({seen / target - 1:+.0%})")

    for pct, target in slo.ttft_ms.items() if slo.ttft_ms else ():
        check(f"TTFT {pct}", getattr(observed.ttft_ms, pct), target, f"the {pct} target")
    for pct, target in slo.tpot_ms.items() if slo.tpot_ms else ():
        check(f"ITL {pct}", getattr(observed.itl_ms, pct), target, f"the TPOT {pct} target")
    if slo.min_tokens_per_second_per_user is not None:
        check("ITL p50", observed.itl_ms.p50, 1000.0 / slo.min_tokens_per_second_per_user,
              f"{_num(slo.min_tokens_per_second_per_user)} tokens/s per user, i.e.")
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

    def to_status(self) -> Obj:
        return {"workload": self.digest, "time": _stamp(self.time), "reason": self.reason,
                "basis": self.basis, "figures": self.workload.to_status()}

    @classmethod
    def from_status(cls, data: Mapping[str, Any]) -> Failure:
        return cls(workload=WorkloadSummary.from_status(data["figures"]),
                   digest=str(data["workload"]), time=_unix(data["time"]),
                   reason=str(data.get("reason", "")), basis=str(data.get("basis", "")))


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

    def to_status(self) -> Obj:
        out: Obj = {"driftChecks": self.drift_checks, "violationChecks": self.violation_checks}
        for key, t in (("lastCheckTime", self.last_check), ("lastReplanTime", self.last_replan),
                       ("lastRolloutTime", self.last_rollout)):
            if t is not None:
                out[key] = _stamp(t)
        if self.last_replan_workload is not None:
            out["lastReplanWorkload"] = self.last_replan_workload
        if self.failed:
            out["failed"] = [f.to_status() for f in self.failed]
        return out

    @classmethod
    def from_status(cls, data: Mapping[str, Any] | None) -> RetuneState:
        """The state from `status.retune`; missing keys (a new endpoint) take defaults."""
        d = data or {}

        def when(key: str) -> float | None:
            return _unix(d[key]) if d.get(key) else None

        return cls(last_check=when("lastCheckTime"), drift_checks=int(d.get("driftChecks", 0)),
                   violation_checks=int(d.get("violationChecks", 0)),
                   last_replan=when("lastReplanTime"),
                   last_replan_workload=d.get("lastReplanWorkload"),
                   last_rollout=when("lastRolloutTime"),
                   failed=tuple(Failure.from_status(f) for f in d.get("failed") or ()))


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
class Decision:
    action: Action
    why: Why
    message: str
    state: RetuneState  # to write back to status.retune (unchanged for NOT_DUE, DISABLED)
    workload: WorkloadSummary | None = None  # on Replan: the observed workload to plan for
    figures: dict[str, float] = field(default_factory=dict)


def decide(state: RetuneState, now: float, observed: ObservedWorkload | None,
           availability: MetricsReason | str, drift: Drift | None, violations: Sequence[str],
           spec: Retune, *, rolling_out: bool, basis: str = "",
           serving_since: float | None = None, policy: Policy = POLICY) -> Decision:
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
    if not spec.enabled:
        return Decision(action=Action.HOLD, why=Why.DISABLED, message="retune.enabled is false",
                        state=state)
    if not due(state, now, spec, policy):
        return Decision(action=Action.HOLD, why=Why.NOT_DUE,
                        message=f"next check {spec.interval_seconds}s after the last",
                        state=state)
    checked = dataclasses.replace(state, last_check=now)

    def hold(why: Why, message: str, st: RetuneState = checked) -> Decision:
        return Decision(action=Action.HOLD, why=why, message=message, state=st,
                        figures=drift.figures() if drift is not None else {})

    if rolling_out:
        return hold(Why.ROLLOUT_IN_FLIGHT, "a rollout is in flight: the metrics window mixes "
                                           "two configurations")
    reason = MetricsReason(availability)
    if observed is not None and reason is MetricsReason.AVAILABLE:
        reason = observed.availability.reason
    if observed is None or reason is not MetricsReason.AVAILABLE:
        message = observed.availability.message if observed is not None else ""
        why = _METRICS_HOLD.get(reason, Why.METRICS_MISSING)
        return hold(why, message or f"no observation ({reason.value})")
    if observed.samples < policy.min_samples:
        return hold(Why.NOT_ENOUGH_SAMPLES,
                    f"{observed.samples:.0f} requests in the window; drift and SLO checks "
                    f"need {policy.min_samples}")

    # A window that began before the serving configuration took the traffic (the last
    # rollout, or the first deployment: `serving_since`) mixes in another configuration's
    # requests, or none at all: it judges neither latencies nor drift.
    starts = [t for t in (state.last_rollout, serving_since) if t is not None]
    stale = bool(starts) and observed.observed_at - observed.window_s < max(starts)
    drift_checks = state.drift_checks
    if drift is not None and not stale:
        if drift.exceeded:
            drift_checks += 1
        elif drift.level < policy.exit_band:
            drift_checks = 0
    live = [] if stale else list(violations)
    counted = dataclasses.replace(checked, drift_checks=drift_checks,
                                  violation_checks=state.violation_checks + 1 if live else 0)
    drifting = drift is not None and bool(drift.exceeded) and not stale
    needed = drift_checks_needed(spec, policy)
    by_drift = drifting and drift_checks >= needed
    by_slo = counted.violation_checks >= policy.persist_checks
    parts = [*live, *([drift.reason] if drifting and drift is not None else [])]
    figures = drift.figures() if drift is not None else {}

    if not (by_drift or by_slo):
        if drifting or live:
            if drifting:
                n, of = counted.drift_checks, needed
            else:
                n, of = counted.violation_checks, policy.persist_checks
            message = f"{'; '.join(parts)} ({n} of {of} checks)"
            return Decision(action=Action.NO_CHANGE, why=Why.PENDING, message=message,
                            state=counted, figures=figures)
        if drift is None:
            return Decision(action=Action.NO_CHANGE, why=Why.NO_PLAN,
                            message="no active plan to compare with", state=counted)
        message = drift.reason + ("; no SLO violation observed" if not stale else
                                  "; not judged: the window began before the serving "
                                  "configuration took the traffic")
        return Decision(action=Action.NO_CHANGE, why=Why.WITHIN_THRESHOLDS, message=message,
                        state=counted, figures=figures)

    why = Why.SLO_VIOLATION if by_slo else Why.DRIFT
    message = "; ".join(parts)
    if state.last_rollout is not None and now - state.last_rollout < spec.cooldown_seconds:
        left = spec.cooldown_seconds - (now - state.last_rollout)
        return hold(Why.COOLDOWN, f"{message}; the last rollout was "
                                  f"{now - state.last_rollout:.0f}s ago, {left:.0f}s of the "
                                  f"{spec.cooldown_seconds}s cooldown left", counted)
    workload = WorkloadSummary.of_observed(observed)
    failure = _failure_for(state.failed, workload, spec.drift, basis, now, policy)
    if failure is not None:
        return hold(Why.ALREADY_FAILED, f"{message}; a re-plan for this workload failed at "
                                        f"{_stamp(failure.time)}: {failure.reason}", counted)
    replanned = dataclasses.replace(counted, drift_checks=0, violation_checks=0,
                                    last_replan=now,
                                    last_replan_workload=workload.digest(spec.drift))
    return Decision(action=Action.REPLAN, why=why, message=message, state=replanned,
                    workload=workload, figures=figures)


def _failure_for(failed: Sequence[Failure], workload: WorkloadSummary,
                 thresholds: DriftThresholds, basis: str, now: float,
                 policy: Policy) -> Failure | None:
    for f in reversed(failed):
        if (f.basis == basis and now - f.time < policy.failed_ttl_s
                and not drift(f.workload, workload, thresholds).exceeded):
            return f
    return None


def observed_request(request: PlanRequest, observed: ObservedWorkload, *,
                     at_peak: bool = True) -> PlanRequest:
    """`request` with its workload replaced by the observed one (estimator.to_workload_spec,
    which keeps the spec's peak factor and predictability). `at_peak=False` plans for the
    observed mean rate itself: what calibration compares observed latencies with."""
    workload = estimator.to_workload_spec(observed, base=request.workload)
    if not at_peak:
        workload = workload.model_copy(update={"peak_factor": 1.0})
    data = request.model_dump(by_alias=True, mode="json", exclude_none=True)
    data["workload"] = workload.model_dump(by_alias=True, mode="json", exclude_none=True)
    # Validated again: the document-wide rules see the new workload.
    return PlanRequest.model_validate(data)


# ---- the running configuration under the new workload -------------------------------------


# ---- accepting a new plan -----------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Acceptance:
    roll_out: bool
    reason: str
    improvement: float | None  # share by which the candidate beats the current on the objective
    current_hash: str
    candidate_hash: str
    figures: dict[str, float] = field(default_factory=dict)


def accept(current: Mapping[str, Any], candidate: Mapping[str, Any], objective: Objective | str,
           min_improvement: float, current_violates_slo: bool) -> Acceptance:
    """Whether the re-plan's recommendation should replace the running configuration.

    `current` is the running configuration re-predicted at the new workload (`repredict`'s
    dict: the old plan's figures were for the old workload); `candidate` is the new plan dict,
    whose recommendation was predicted at that same workload and meets the SLO by
    construction. Roll out when the current configuration violates the SLO (observed, as
    `current_violates_slo`, or re-predicted, its `slo_miss`), else when the candidate beats it
    on the objective by at least `min_improvement`:

    - min_cost: $/hour (both carry the observed design rate);
    - max_throughput: requests/s within the SLO;
    - min_latency: TTFT p90 + TPOT p90 x (mean output - 1), the search's latency axis, with
      the mean output of the new workload (the candidate plan's request);
    - balanced: the geometric mean of the cost and latency ratios, which like the search's
      knee distance weighs a share of dollars as much as the same share of milliseconds.
    """
    objective = Objective(objective)
    rec = candidate["recommended"]
    cur_hash, new_hash = str(current["hash"]), str(rec["hash"])
    cur, new = current["prediction"], rec["prediction"]
    osl = float(candidate["request"]["workload"]["output_tokens_mean"])
    figures = {"currentCostPerHour": round(float(cur["cost_per_hour"]), 4),
               "candidateCostPerHour": round(float(new["cost_per_hour"]), 4),
               "currentTtftP90Ms": round(float(cur["ttft_p90_ms"]), 3),
               "candidateTtftP90Ms": round(float(new["ttft_p90_ms"]), 3),
               "currentTpotP90Ms": round(float(cur["tpot_p90_ms"]), 3),
               "candidateTpotP90Ms": round(float(new["tpot_p90_ms"]), 3)}

    def result(roll_out: bool, reason: str, improvement: float | None) -> Acceptance:
        extra = {} if improvement is None else {"improvement": round(improvement, 4)}
        return Acceptance(roll_out=roll_out, reason=reason, improvement=improvement,
                          current_hash=cur_hash, candidate_hash=new_hash,
                          figures={**figures, **extra})

    if new_hash == cur_hash:
        return result(False, f"the re-plan recommends the running configuration "
                             f"{rec['summary']} ({cur_hash})", 0.0)
    improvement, what = _improvement(objective, cur, new, osl)
    miss = current.get("slo_miss")
    if current_violates_slo or miss:
        why = "violates the SLO as observed" if current_violates_slo else f"would miss {miss}"
        return result(True, f"the running {current['summary']} {why}; {rec['summary']} is "
                            f"planned to meet it", improvement)
    if improvement is None:
        return result(False, f"cannot compare {what} of {current['summary']} and "
                             f"{rec['summary']}", None)
    verdict = (f"{rec['summary']} improves {what} by {improvement:.1%} over the running "
               f"{current['summary']}")
    # Exactly the share asked for counts as enough, whatever the float rounding (1 - 9/10).
    if improvement >= min_improvement - 1e-9:
        return result(True, f"{verdict} (at least {min_improvement:.0%} needed)", improvement)
    return result(False, f"{verdict}, less than the {min_improvement:.0%} needed", improvement)


def _improvement(objective: Objective, cur: Mapping[str, Any], new: Mapping[str, Any],
                 osl: float) -> tuple[float | None, str]:
    """(share by which `new` beats `cur`, what was compared); None when undefined."""
    def lat(p: Mapping[str, Any]) -> float:
        return float(p["ttft_p90_ms"]) + float(p["tpot_p90_ms"]) * max(osl - 1.0, 0.0)

    def gain(old: float, value: float) -> float | None:  # lower is better
        return 1.0 - value / old if old > 0 and math.isfinite(old) else None

    c_cost, n_cost = float(cur["cost_per_hour"]), float(new["cost_per_hour"])
    if objective is Objective.MIN_COST:
        return gain(c_cost, n_cost), "cost per hour"
    if objective is Objective.MIN_LATENCY:
        return gain(lat(cur), lat(new)), "latency"
    if objective is Objective.MAX_THROUGHPUT:
        c_cap, n_cap = cur.get("capacity_rps"), new.get("capacity_rps")
        if c_cap is None or n_cap is None:
            return None, "capacity"
        if float(c_cap) <= 0:
            return (math.inf if float(n_cap) > 0 else None), "capacity"
        return float(n_cap) / float(c_cap) - 1.0, "capacity"
    if c_cost <= 0 or lat(cur) <= 0:
        return None, "cost and latency"
    return 1.0 - math.sqrt(n_cost / c_cost * lat(new) / lat(cur)), "cost x latency"


# ---- history --------------------------------------------------------------------------------


class Step(enum.StrEnum):
    """What a `status.retuneHistory` entry records."""

    REPLAN = "Replan"  # a re-plan was started
    ROLL_OUT = "RollOut"  # its recommendation is rolling out
    KEEP = "Keep"  # its recommendation was not worth a rollout
    FAILED = "Failed"  # the re-plan or its rollout failed
    HOLD = "Hold"  # a re-plan was due but held (cooldown, same workload failed)


@dataclass(frozen=True, kw_only=True)
class RetuneEvent:
    time: float
    action: Step
    reason: str
    cause: str | None = None  # the decision's Why, when the event comes from one
    from_hash: str | None = None
    to_hash: str | None = None
    figures: Mapping[str, float] = field(default_factory=dict)

    def to_status(self) -> Obj:
        out: Obj = {"time": _stamp(self.time), "action": self.action.value,
                    "reason": self.reason}
        if self.cause is not None:
            out["cause"] = self.cause
        if self.from_hash is not None:
            out["fromHash"] = self.from_hash
        if self.to_hash is not None:
            out["toHash"] = self.to_hash
        if self.figures:
            out["figures"] = {k: self.figures[k] for k in sorted(self.figures)}
        return out

    @classmethod
    def of_decision(cls, decision: Decision, now: float,
                    serving_hash: str | None = None) -> RetuneEvent:
        step = Step.REPLAN if decision.action is Action.REPLAN else Step.HOLD
        return cls(time=now, action=step, reason=decision.message, cause=decision.why.value,
                   from_hash=serving_hash, figures=decision.figures)

    @classmethod
    def of_acceptance(cls, acceptance: Acceptance, now: float) -> RetuneEvent:
        return cls(time=now, action=Step.ROLL_OUT if acceptance.roll_out else Step.KEEP,
                   reason=acceptance.reason, from_hash=acceptance.current_hash,
                   to_hash=acceptance.candidate_hash, figures=acceptance.figures)


def history_append(history: Sequence[Mapping[str, Any]] | None, event: RetuneEvent,
                   keep: int = 10) -> list[Obj]:
    """`status.retuneHistory` with `event` added, oldest first, at most `keep` entries. A hold
    with the same cause as the entry before it replaces that entry, so that a hold reported at
    every check (a long cooldown) does not push the re-plans out of the history."""
    entries = [dict(e) for e in history or ()]
    new = event.to_status()
    last = entries[-1] if entries else {}
    if (new["action"] == Step.HOLD.value and last.get("action") == Step.HOLD.value
            and last.get("cause") == new.get("cause")):
        entries.pop()
    return [*entries, new][-keep:] if keep > 0 else []


# ---- small helpers --------------------------------------------------------------------------


def _num(x: float) -> str:
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _sig(value: float) -> float:
    """Four significant digits, so that status patches do not churn on noise."""
    return float(f"{value:.4g}")


def _stamp(unix_s: float) -> str:
    stamp = datetime.datetime.fromtimestamp(round(unix_s), datetime.UTC)
    return stamp.isoformat().replace("+00:00", "Z")


def _unix(text: str) -> float:
    return datetime.datetime.fromisoformat(str(text).replace("Z", "+00:00")).timestamp()
