"""Workload drift: how far the observed traffic is from the traffic the running plan was made
for, figure by figure, each against its threshold.

Pure: the retune state machine (retune.py) counts drifted checks; this module only measures.
Rates: a plan is sized for `design_rate_rps` = mean rate x peakFactor, while Prometheus sees
the mean rate. Drift therefore compares the observed mean with the design rate divided by the
spec's peak factor (mean with mean), and a re-plan keeps the spec's peak factor
(estimator.to_workload_spec does), so the loop never mistakes the planned headroom for drift.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trilemma.operator.estimator import ObservedWorkload
from trilemma.operator.resources import DriftThresholds
from trilemma.operator.status_models import WorkloadFigures
from trilemma.optimizer.search import Plan, RequestDigest

Obj = dict[str, Any]


class Dimension(enum.Enum):
    """The figures drift is measured on: label, unit, status key, threshold field, relative."""

    RATE = ("request rate", "req/s", "rateRps", "rate", True)
    PROMPT = ("prompt length", "tokens", "promptTokens", "prompt_tokens", True)
    OUTPUT = ("output length", "tokens", "outputTokens", "output_tokens", True)
    PREFIX = ("prefix hit share", "", "prefixShare", "prefix_share", False)
    # Requests the engine refused (a prompt past the deployed context limit): a plan expects
    # none, so any share over the threshold is drift (engines that do not count them: unknown).
    REFUSED = ("refused share", "", "refusedShare", "refused_share", False)

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
    """The figures drift compares: mean rate, mean prompt and output tokens, prefix share
    (prompt tokens served from the cache, 0-1) and refused share (0-1); None when unknown."""

    rate_rps: float
    prompt_tokens: float
    output_tokens: float
    prefix_share: float | None = None
    refused_share: float | None = None

    @classmethod
    def of_plan(cls, plan: Plan, *, peak_factor: float) -> WorkloadSummary:
        """What a plan was made for; `peak_factor` is the spec's, since the plan's design rate
        is the mean rate times it."""
        return cls.of_request(plan.request, peak_factor=peak_factor)

    @classmethod
    def of_request(cls, request: RequestDigest, *, peak_factor: float) -> WorkloadSummary:
        """`of_plan` from the plan's request digest (Plan.request)."""
        wl = request.workload
        prompt, cached = wl.prompt_tokens_mean, wl.cached_tokens_mean
        return cls(rate_rps=request.design_rate_rps / max(peak_factor, 1.0),
                   prompt_tokens=prompt, output_tokens=wl.output_tokens_mean,
                   prefix_share=cached / prompt if prompt > 0 else 0.0, refused_share=0.0)

    @classmethod
    def of_observed(cls, observed: ObservedWorkload) -> WorkloadSummary:
        """The observation's figures; ValueError when rate or a mean length is unknown."""
        rate, prompt, output = (observed.rate_rps, observed.prompt_tokens.mean,
                                observed.output_tokens.mean)
        if rate is None or prompt is None or output is None:
            raise ValueError(f"incomplete observation ({observed.availability.message})")
        return cls(rate_rps=rate, prompt_tokens=prompt, output_tokens=output,
                   prefix_share=observed.prefix_hit_share,
                   refused_share=observed.refused_share)

    def value(self, dim: Dimension) -> float | None:
        return {Dimension.RATE: self.rate_rps, Dimension.PROMPT: self.prompt_tokens,
                Dimension.OUTPUT: self.output_tokens, Dimension.PREFIX: self.prefix_share,
                Dimension.REFUSED: self.refused_share}[dim]

    def digest(self, thresholds: DriftThresholds) -> str:
        """Names the workload coarsely: one bucket per threshold step (log-spaced for the
        relative figures), so that noise inside a threshold mostly keeps the same name."""
        parts = []
        for dim in Dimension:
            v = self.value(dim)
            t = dim.threshold(thresholds)
            if dim is Dimension.REFUSED:
                # Named only while refusals are over a threshold step: a workload without
                # them keeps the name it had before refusals were counted.
                if v is not None and math.floor(v / t) > 0:
                    parts.append(f"r{math.floor(v / t)}")
                continue
            if v is None:
                parts.append("-")
            elif dim.relative:
                parts.append(str(math.floor(math.log(max(v, 1e-9)) / math.log1p(t))))
            else:
                parts.append(str(math.floor(v / t)))
        return hashlib.sha256(".".join(parts).encode()).hexdigest()[:10]

    def to_status(self) -> WorkloadFigures:
        return WorkloadFigures(
            rate_rps=sig(self.rate_rps), prompt_tokens=sig(self.prompt_tokens),
            output_tokens=sig(self.output_tokens),
            prefix_share=None if self.prefix_share is None else sig(self.prefix_share),
            refused_share=None if self.refused_share is None else sig(self.refused_share))

    @classmethod
    def from_status(cls, data: WorkloadFigures | Mapping[str, Any]) -> WorkloadSummary:
        figures = WorkloadFigures.model_validate(data)
        return cls(rate_rps=figures.rate_rps, prompt_tokens=figures.prompt_tokens,
                   output_tokens=figures.output_tokens, prefix_share=figures.prefix_share,
                   refused_share=figures.refused_share)


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
            figures = f"{num(self.planned)} -> {num(self.observed)} {d.unit}"
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
                out[c.dimension.key] = sig(c.observed)
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
            Dimension.PREFIX: observed.prefix_hit_share,
            Dimension.REFUSED: observed.refused_share}
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



def num(x: float) -> str:
    """A figure for a sentence: whole above 100, three significant digits below."""
    return f"{x:.0f}" if abs(x) >= 100 else f"{x:.3g}"


def sig(value: float) -> float:
    """Four significant digits, so that status patches do not churn on noise."""
    return float(f"{value:.4g}")
