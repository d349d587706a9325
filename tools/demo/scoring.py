"""What the demo measured and how it scores: the result, and each estimate the operator wrote
(status.observedWorkload) against what the load generator saw finish in the same window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

from trilemma.simfleet.load_report import LoadReport, PhaseReport
from trilemma.tools.demo.scenario import WINDOW_MARGIN_S, WINDOW_S
from trilemma.tools.demo.timeline import Event, EventDict, Timeline

Obj = dict[str, Any]

FigureKey = Literal["rate", "prompt", "output", "prefix", "ttft_p90_ms"]
# The figures relative errors are taken of (the prefix share's error is in points).
RELATIVE: tuple[FigureKey, ...] = ("rate", "prompt", "output", "ttft_p90_ms")


class Figures(TypedDict, total=False):
    """A window's workload, estimated or true; empty when loadgen saw nothing finish."""

    rate: float | None  # requests per second
    prompt: float | None  # mean tokens
    output: float | None
    prefix: float | None  # share of prompt tokens the servers found cached
    ttft_p90_ms: float | None


class PlanSummary(TypedDict, total=False):
    """A plan as the JSON report and the timeline give it (from the endpoint's status); empty
    until there is one."""

    hash: str | None
    summary: str | None
    gpus: int | None
    replicas: int | None
    costPerHour: float | None
    ttftP90Ms: float | None
    tpotP90Ms: float | None
    capacityRps: float | None
    candidates: int | None
    searchSeconds: float | None
    reused: bool | None


class PhaseFigures(TypedDict):
    """Loadgen's report of one phase, as the JSON report and the summary give it."""

    durationSeconds: float
    sent: int
    completed: int
    failed: int
    rateRps: float
    promptMean: float | None
    outputMean: float | None
    prefixTokenShare: float
    cachedShare: float | None
    errors: dict[str, int]


class EstimateDict(TypedDict):
    phase: str
    observedAt: float
    fullWindow: bool
    requests: int
    observed: Figures
    truth: Figures
    error: dict[str, float]


class DemoReport(TypedDict):
    """`trilemma demo --json`: the run's result."""

    exitCode: int
    message: str
    shift: str
    plan: PlanSummary
    newPlan: PlanSummary
    replanned: bool
    accepted: bool | None
    rolledOut: bool
    detectionDelaySeconds: float | None
    steadyReplans: int
    steadyRollouts: int
    estimates: list[EstimateDict]
    load: dict[str, PhaseFigures]
    operatorLogProblems: list[str]
    timeline: list[EventDict]


EXIT_ROLLED_OUT = 0
EXIT_NO_ROLLOUT = 1
# A program or package the demo needs is missing: Prometheus (found after the planning part,
# which needs none), or KMock for the emulated API.
EXIT_NO_PROMETHEUS = 2
EXIT_MISSING_EXTRA = 2
EXIT_INTERRUPTED = 130


@dataclass(frozen=True)
class Observation:
    """One status.observedWorkload and when it was observed (unix seconds)."""

    at: float
    workload: Obj

    @property
    def has_figures(self) -> bool:
        # A check whose query failed (a busy machine can time one out) writes an
        # observedWorkload without a rate, which no estimate can use.
        return self.workload.get("rateRps") is not None


@dataclass
class TrafficClock:
    """When the traffic started, shifted and was told to stop (unix seconds)."""

    load_start: float | None = None
    shift_start: float | None = None
    load_end: float = float("inf")

    def after_shift(self, unix_s: float) -> bool:
        return self.shift_start is not None and unix_s >= self.shift_start

    def whole_window_after(self, start: float, unix_s: float) -> bool:
        """A window ending at `unix_s` lies inside a phase that started at `start`."""
        return unix_s - WINDOW_S >= start + WINDOW_MARGIN_S


@dataclass
class Estimate:
    """One status.observedWorkload against what loadgen saw finish in the same window."""

    phase: str
    observed_at: float  # seconds since the demo started
    full_window: bool  # the window lies inside the phase
    observed: Figures
    truth: Figures
    requests: int

    def to_dict(self) -> EstimateDict:
        return {"phase": self.phase, "observedAt": round(self.observed_at, 1),
                "fullWindow": self.full_window, "requests": self.requests,
                "observed": self.observed, "truth": self.truth, "error": errors(self)}


def errors(e: Estimate) -> dict[str, float]:
    """Relative errors of rate, lengths and TTFT p90; the prefix share's in points (a share near 0
    makes a relative error meaningless)."""
    out: dict[str, float] = {}
    for key in RELATIVE:
        seen, true = e.observed.get(key), e.truth.get(key)
        if seen is not None and true:
            out[key] = round(seen / true - 1.0, 4)
    seen, true = e.observed.get("prefix"), e.truth.get("prefix")
    if seen is not None and true is not None:
        out["prefix_points"] = round((seen - true) * 100, 2)
    return out


@dataclass
class DemoResult:
    exit_code: int = EXIT_NO_ROLLOUT
    message: str = ""  # why the demo stopped short, if it did
    shift: str = "prompt"
    plan: PlanSummary = field(default_factory=PlanSummary)
    new_plan: PlanSummary = field(default_factory=PlanSummary)
    replanned: bool = False
    accepted: bool | None = None  # None: no verdict on a re-plan yet
    rolled_out: bool = False
    detection_delay_s: float | None = None
    steady_replans: int = 0
    steady_rollouts: int = 0
    estimates: list[Estimate] = field(default_factory=list)
    load: dict[str, PhaseFigures] = field(default_factory=dict)  # loadgen's, by phase
    log_problems: list[str] = field(default_factory=list)
    timeline: list[Event] = field(default_factory=list)

    def to_dict(self) -> DemoReport:
        return {"exitCode": self.exit_code, "message": self.message, "shift": self.shift,
                "plan": self.plan,
                "newPlan": self.new_plan, "replanned": self.replanned,
                "accepted": self.accepted, "rolledOut": self.rolled_out,
                "detectionDelaySeconds": self.detection_delay_s,
                "steadyReplans": self.steady_replans, "steadyRollouts": self.steady_rollouts,
                "estimates": [e.to_dict() for e in self.estimates], "load": self.load,
                "operatorLogProblems": self.log_problems,
                "timeline": [e.to_dict() for e in self.timeline]}


def window_truth(report: LoadReport, load_start: float, since: float,
                 until: float) -> tuple[Figures, int]:
    """What loadgen saw finish in (since, until] (unix seconds): the window's true figures."""
    done = [r for r in report.requests if r.ok and r.e2e_s is not None
            and since < load_start + r.sent_s + r.e2e_s <= until]
    if not done:
        return {}, 0
    prompt = sum(r.prompt_tokens for r in done)
    cached = sum(r.usage_cached or 0 for r in done)
    served = sum(r.usage_prompt or r.prompt_tokens for r in done)
    ttft = sorted(r.ttft_s for r in done if r.ttft_s is not None)
    return {"rate": round(len(done) / (until - since), 4),
            "prompt": round(prompt / len(done), 1),
            "output": round(sum(r.output_tokens for r in done) / len(done), 1),
            "prefix": round(cached / served, 4) if served else None,
            # Measured by the client: includes the HTTP hop the server's histogram does not.
            "ttft_p90_ms": round(ttft[int(0.9 * (len(ttft) - 1))] * 1000, 1) if ttft else None,
            }, len(done)


def estimates(observations: list[Observation], clock: TrafficClock, report: LoadReport,
              timeline: Timeline) -> list[Estimate]:
    """For each phase, its latest observation (a whole window inside the phase if there is
    one) against the requests loadgen saw finish in the same window."""
    assert clock.load_start is not None and clock.shift_start is not None
    out = []
    bounds = (("steady", clock.load_start, clock.shift_start),
              ("shifted", clock.shift_start, clock.load_end))
    for name, start, end in bounds:
        inside = [o for o in observations if start < o.at <= end and o.has_figures]
        if not inside:
            continue
        full = [o for o in inside if clock.whole_window_after(start, o.at)]
        latest = (full or inside)[-1]
        seen = latest.workload
        truth, count = window_truth(report, clock.load_start, latest.at - WINDOW_S, latest.at)
        out.append(Estimate(
            phase=name, observed_at=timeline.at(latest.at), full_window=bool(full),
            observed={"rate": seen.get("rateRps"),
                      "prompt": (seen.get("promptTokens") or {}).get("mean"),
                      "output": (seen.get("outputTokens") or {}).get("mean"),
                      "prefix": seen.get("prefixHitShare"),
                      "ttft_p90_ms": (seen.get("ttftMs") or {}).get("p90")},
            truth=truth, requests=count))
    return out


def phase_figures(p: PhaseReport) -> PhaseFigures:
    """Loadgen's report of one phase, for the JSON report and the summary."""
    return {"durationSeconds": round(p.duration_s, 1), "sent": p.sent,
            "completed": p.completed, "failed": p.failed, "rateRps": round(p.rate_per_s, 3),
            "promptMean": p.prompt_tokens.mean and round(p.prompt_tokens.mean, 1),
            "outputMean": p.output_tokens.mean and round(p.output_tokens.mean, 1),
            "prefixTokenShare": round(p.prefix_token_share, 4),
            "cachedShare": (round(p.server_cached_tokens / p.server_prompt_tokens, 4)
                            if p.server_prompt_tokens else None),
            "errors": p.errors}
