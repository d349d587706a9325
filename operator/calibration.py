"""Closed-loop calibration: how much slower (or faster) the endpoint really is than predicted.

The performance model is calibrated on kernel profiles, not on this cluster: its drivers,
network, engine version and request mix. Each check the Kopf timer pairs the running
configuration's predicted p90 latencies with the observed ones; the smoothed ratio is a
correction factor per latency, kept in `status.calibration`, and `apply` turns it into the SLO
the next plan is searched against.

Why tightening the SLO is the correction: the screen keeps a configuration when every term's
predicted percentile / target <= 1 (screening.worst), and sizes it at the largest load that
holds (the capacity ladder); the confirming simulation checks the same terms. If reality is f
times the prediction, real / target <= 1 is exactly predicted / (target / f) <= 1, at every
load the ladder visits, so searching against target / f keeps exactly the configurations and
capacities that a corrected model would keep against the real target. This assumes the bias
is one multiplicative factor over the loads in question, which is what one factor can claim.

The factors are ratios to *raw* predictions made for the observed workload at its observed
rate (search.predict on retune.observed_request(..., at_peak=False)): never to a plan's
figures for its design rate (with a peak factor above 1 those are for a heavier load than the
one observed), and never to corrected figures, so a tightened plan cannot feed back on itself.
The engines export inter-token latency, not per-request TPOT; the TPOT factor is observed ITL
over predicted TPOT, which is the same comparison retune.slo_violations makes, so a plan made
with it meets the check that will actually be applied.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trilemma.operator.estimator import ObservedWorkload
from trilemma.operator.status_models import CalibrationStatus, FactorStatus
from trilemma.optimizer.search import Prediction
from trilemma.optimizer.spec import Slo


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Inert knobs of the fit, with the reason for each default."""

    # Weight of a new window in the exponential average (in log space, where ratios average
    # fairly): ~3 windows move a factor most of the way, one odd window moves it by 30% of
    # its log-ratio at most.
    smoothing: float = 0.3
    # Requests a window needs before its p90s count: the p90 of fewer is mostly bucket noise.
    min_samples: int = 100
    # Windows before a factor is applied: one window can be a fluke of that quarter hour.
    min_pairs: int = 3
    # Ratios and factors are clamped here: beyond them the model is wrong in a way a single
    # factor cannot mend (and a factor of 0.1 would let a plan promise 10x its targets).
    low: float = 0.5
    high: float = 3.0
    # Applied factors move in steps of 0.05, and only when the smoothed value is a whole step
    # away: every change of the applied SLO changes the request digest (a new search) and
    # retune's basis (a failed workload may be re-planned).
    step: float = 0.05


SETTINGS = Settings()


@dataclass(frozen=True, kw_only=True)
class Factor:
    """One latency's correction: the smoothed observed / predicted p90, the windows seen, and
    the factor plans use (`applied`)."""

    value: float = 1.0
    pairs: int = 0
    applied: float = 1.0
    last_ratio: float | None = None

    def updated(self, ratio: float, settings: Settings) -> Factor:
        """With one more window's ratio. A bias-corrected exponential average: m_n = (1 - a)
        m_{n-1} + a ln r_n, value = exp(m_n / (1 - (1 - a)^n)), so the first windows are their
        own weighted mean (no pull towards the prior 1) and later ones a plain average.

        The applied factor stays 1 for the first `min_pairs` windows, then follows the value
        in steps of `step`, moving only once the value is more than a step away from it: noise
        around a step's edge must not flip the SLO plans are made against."""
        r = min(max(ratio, settings.low), settings.high)
        keep = 1.0 - settings.smoothing
        n = self.pairs + 1
        m = math.log(self.value) * (1.0 - keep ** self.pairs)
        m = keep * m + settings.smoothing * math.log(r)
        value = min(max(math.exp(m / (1.0 - keep ** n)), settings.low), settings.high)
        applied = self.applied
        if n < settings.min_pairs:
            applied = 1.0
        elif abs(value - applied) > settings.step:
            applied = round(round(value / settings.step) * settings.step, 4)
        return Factor(value=value, pairs=n, applied=applied, last_ratio=ratio)

    def to_status(self) -> FactorStatus:
        last = None if self.last_ratio is None else float(f"{self.last_ratio:.4g}")
        return FactorStatus(factor=float(f"{self.value:.4g}"), pairs=self.pairs,
                            applied=self.applied, last_ratio=last)

    @classmethod
    def from_status(cls, data: FactorStatus) -> Factor:
        return cls(value=data.factor, pairs=data.pairs, applied=data.applied,
                   last_ratio=data.last_ratio)


@dataclass(frozen=True, kw_only=True)
class Calibration:
    """`status.calibration`: the TTFT and TPOT factors and where the last pair came from.

    Factors carry over when the configuration changes: the model's bias on a cluster is
    mostly systematic (engine version, drivers, network), so the last one is the best prior
    for the next configuration, and that configuration's own windows then move it.
    """

    ttft: Factor = dataclasses.field(default_factory=Factor)
    tpot: Factor = dataclasses.field(default_factory=Factor)
    updated: float | None = None  # unix seconds of the last pair
    config_hash: str | None = None  # configuration the last pair observed

    def factors(self) -> tuple[float, float]:
        """(TTFT, TPOT) factors a plan uses."""
        return self.ttft.applied, self.tpot.applied

    def key(self) -> str:
        """Names the applied factors: what a re-plan's outcome depended on (retune's basis)."""
        t, p = self.factors()
        return f"ttft{t:.2f}-tpot{p:.2f}"

    def to_status(self) -> CalibrationStatus:
        updated = None
        if self.updated is not None:
            stamp = datetime.datetime.fromtimestamp(round(self.updated), datetime.UTC)
            updated = stamp.isoformat().replace("+00:00", "Z")
        return CalibrationStatus(ttft=self.ttft.to_status(), tpot=self.tpot.to_status(),
                                 updated=updated, config_hash=self.config_hash)

    @classmethod
    def from_status(cls, data: CalibrationStatus | Mapping[str, Any] | None) -> Calibration:
        """The calibration from `status.calibration` (its model or wire form); missing keys
        (a new endpoint) take the neutral factor 1."""
        d = CalibrationStatus.model_validate(data or {})
        return cls(ttft=Factor.from_status(d.ttft), tpot=Factor.from_status(d.tpot),
                   updated=None if not d.updated else datetime.datetime.fromisoformat(
                       d.updated.replace("Z", "+00:00")).timestamp(),
                   config_hash=d.config_hash)


def update(calibration: Calibration, *, predicted: Prediction,
           observed: ObservedWorkload, config_hash: str | None = None,
           serving_since: float | None = None, settings: Settings = SETTINGS) -> Calibration:
    """`calibration` with one more (predicted, observed) pair, or unchanged when the window
    cannot be trusted: metrics not available, fewer than `min_samples` requests, or a window
    that began before `serving_since` (when the configuration took the traffic: earlier
    requests were served by another one).

    `predicted` is the serving configuration's prediction for the observed workload at its
    observed rate; TTFT and TPOT update independently, each when both sides are known.
    """
    if not observed.availability.ok or observed.samples < settings.min_samples:
        return calibration
    if serving_since is not None and observed.observed_at - observed.window_s < serving_since:
        return calibration
    ttft, tpot = calibration.ttft, calibration.tpot
    changed = False
    for name, seen in (("ttft", observed.ttft_ms.p90), ("tpot", observed.itl_ms.p90)):
        want = predicted.ttft_p90_ms if name == "ttft" else predicted.tpot_p90_ms
        if seen is None or not want > 0 or not seen > 0:
            continue
        ratio = seen / want
        if name == "ttft":
            ttft = ttft.updated(ratio, settings)
        else:
            tpot = tpot.updated(ratio, settings)
        changed = True
    if not changed:
        return calibration
    return Calibration(ttft=ttft, tpot=tpot, updated=observed.observed_at,
                       config_hash=config_hash)


def apply(slo: Slo, calibration: Calibration) -> Slo:
    """The SLO to plan against: each latency target divided by its applied factor.

    TTFT targets by the TTFT factor; TPOT targets and the per-user speed (a median TPOT bound
    of 1000 / speed) by the TPOT factor; end-to-end bounds (TTFT + output x TPOT) by the
    larger of the two, enough for either part's bias, yet never below the same percentile's
    corrected TTFT bound (a request's latency includes its first token). Quality floor and
    budget are not latencies and stay. Factors of 1 return `slo` itself.
    """
    f_ttft, f_tpot = calibration.factors()
    if f_ttft == 1.0 and f_tpot == 1.0:
        return slo
    data = slo.model_dump(mode="json", exclude_none=True)

    def scaled(key: str, factor: float) -> None:
        if key in data:
            data[key] = {p: v / factor for p, v in data[key].items()}

    scaled("ttft_ms", f_ttft)
    scaled("tpot_ms", f_tpot)
    scaled("end_to_end_ms", max(f_ttft, f_tpot))
    if "end_to_end_ms" in data and "ttft_ms" in data:
        data["end_to_end_ms"] = {p: max(v, data["ttft_ms"].get(p, 0.0))
                                 for p, v in data["end_to_end_ms"].items()}
    if "min_tokens_per_second_per_user" in data:
        data["min_tokens_per_second_per_user"] *= f_tpot
    # Validated again: the tightened document must still be a valid SLO.
    return Slo.model_validate(data)


def corrected(prediction: Prediction, calibration: Calibration) -> Prediction:
    """`prediction` with its latencies times the applied factors (for display: what the
    model, corrected, expects the endpoint to show)."""
    f_ttft, f_tpot = calibration.factors()
    p = prediction
    return dataclasses.replace(p, ttft_p50_ms=p.ttft_p50_ms * f_ttft,
                               ttft_p90_ms=p.ttft_p90_ms * f_ttft,
                               tpot_p50_ms=p.tpot_p50_ms * f_tpot,
                               tpot_p90_ms=p.tpot_p90_ms * f_tpot)
