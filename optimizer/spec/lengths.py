"""Token-length distributions for prompts and outputs: fixed, lognormal, or a histogram.

Part of the workload spec. The serving simulator samples request lengths from these; the perf
model and the search read their means and percentiles. Every distribution answers the same
questions (mean, percentiles, E[min(length, cap)] for prefix caching, samples) so callers
never branch on `kind`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import Annotated, Literal

import numpy as np
import numpy.typing as npt
from pydantic import Field, model_validator

from trilemma.optimizer.spec import limits
from trilemma.optimizer.spec.base import SpecModel, require_generator, rule_error

_NORMAL = NormalDist()
_Z90 = _NORMAL.inv_cdf(0.9)
# Among lognormals with a given mean, p90/mean peaks at exp(z90^2 / 2) ~= 2.27 (at sigma = z90).
MAX_P90_OVER_MEAN = math.exp(_Z90 * _Z90 / 2)

Tokens = npt.NDArray[np.int64]


class _Percentiles:
    """p50/p90 shorthands over each distribution's percentile_tokens."""

    def percentile_tokens(self, pct: float) -> float:
        raise NotImplementedError

    def p50_tokens(self) -> float:
        return self.percentile_tokens(50)

    def p90_tokens(self) -> float:
        return self.percentile_tokens(90)


class FixedLengths(_Percentiles, SpecModel):
    """Every request has the same length."""

    kind: Literal["fixed"] = Field(description="Distribution kind: every request the same.")
    value: int = Field(ge=1, le=limits.MAX_TOKENS, description="Tokens per request.")

    def mean_tokens(self) -> float:
        return float(self.value)

    def percentile_tokens(self, pct: float) -> float:
        _fraction(pct)
        return float(self.value)

    def expected_min(self, cap: float) -> float:
        """E[min(length, cap)]: the tokens a `cap`-token shared prefix can cover on average."""
        return float(min(self.value, cap))

    def sample(self, n: int, rng: np.random.Generator) -> Tokens:
        require_generator(rng)
        return np.full(n, self.value, dtype=np.int64)


class LognormalLengths(_Percentiles, SpecModel):
    """Lengths lognormally distributed, given by their mean and 90th percentile.

    Two numbers people read off a dashboard. Two lognormals match a mean and a p90 (sigma
    below or above z90 ~= 1.28); the lighter-tailed one is used, since the other puts most of
    its mass far below the mean, unlike measured prompt and output lengths.
    """

    kind: Literal["lognormal"] = Field(description="Distribution kind: lognormal.")
    mean: float = Field(ge=1, le=limits.MAX_TOKENS, description="Mean length in tokens.")
    p90: float = Field(ge=1, le=limits.MAX_TOKENS,
                       description="90th-percentile length in tokens; above the mean.")

    @model_validator(mode="after")
    def _p90_fits_a_lognormal(self) -> LognormalLengths:
        if self.p90 <= self.mean:
            raise rule_error(
                f"p90 must exceed the mean ({self.mean:g}); use kind: fixed for a constant length",
                field="p90", value=self.p90)
        if self.p90 > self.mean * MAX_P90_OVER_MEAN:
            raise rule_error(
                f"no lognormal has p90 above {MAX_P90_OVER_MEAN:.3f} x its mean "
                f"({self.mean * MAX_P90_OVER_MEAN:.0f} here); for a heavier tail give a "
                "histogram", field="p90", value=self.p90)
        return self

    @property
    def sigma(self) -> float:
        # ln(p90/mean) = z*sigma - sigma^2/2  ->  the smaller root.
        d = math.log(self.p90 / self.mean)
        return _Z90 - math.sqrt(max(_Z90 * _Z90 - 2 * d, 0.0))

    @property
    def mu(self) -> float:
        return math.log(self.mean) - self.sigma**2 / 2

    def mean_tokens(self) -> float:
        return self.mean

    def percentile_tokens(self, pct: float) -> float:
        return math.exp(self.mu + self.sigma * _NORMAL.inv_cdf(_fraction(pct)))

    def expected_min(self, cap: float) -> float:
        if cap <= 0:
            return 0.0
        mu, s = self.mu, self.sigma
        # E[X; X < c] + c * P(X >= c), the lognormal partial expectation.
        below = self.mean * _NORMAL.cdf((math.log(cap) - mu - s * s) / s)
        return below + cap * (1 - _NORMAL.cdf((math.log(cap) - mu) / s))

    def sample(self, n: int, rng: np.random.Generator) -> Tokens:
        draws = require_generator(rng).lognormal(self.mu, self.sigma, n)
        return np.maximum(np.rint(draws), 1).astype(np.int64)


class HistogramLengths(_Percentiles, SpecModel):
    """An empirical distribution: point values with weights, or bins (uniform inside a bin).

    Give `values` (n lengths) or `edges` (n+1 increasing bin edges), and n `weights`.
    Weights need not sum to 1; they are normalised.
    """

    kind: Literal["histogram"] = Field(description="Distribution kind: empirical histogram.")
    values: list[Annotated[int, Field(le=limits.MAX_TOKENS)]] | None = Field(
        default=None, min_length=1, max_length=limits.MAX_HISTOGRAM_BINS,
        description="Point lengths in tokens, increasing; exclusive with edges.")
    edges: list[Annotated[float, Field(le=limits.MAX_TOKENS)]] | None = Field(
        default=None, min_length=2, max_length=limits.MAX_HISTOGRAM_BINS + 1,
        description="Bin edges in tokens, increasing, first >= 1; lengths are uniform within a "
                    "bin; exclusive with values.")
    weights: list[float] = Field(
        min_length=1, max_length=limits.MAX_HISTOGRAM_BINS,
        description="Relative frequency of each value or bin (>= 0, not all 0).")

    @model_validator(mode="after")
    def _shape(self) -> HistogramLengths:
        if self.values is None and self.edges is None:
            raise rule_error("give values (point lengths) or edges (bins)", field="values")
        if self.values is not None and self.edges is not None:
            raise rule_error("give values (point lengths) or edges (bins), not both",
                             field="edges", value=self.edges)
        points: Sequence[float]
        if self.values is not None:
            points, name, n = self.values, "values", len(self.values)
            if points[0] < 1:
                raise rule_error("lengths must be >= 1 token", field="values.0", value=points[0])
        else:
            assert self.edges is not None
            points, name, n = self.edges, "edges", len(self.edges) - 1
            if points[0] < 1:
                raise rule_error("the first edge must be >= 1 token", field="edges.0",
                                 value=points[0])
        if any(b <= a for a, b in itertools.pairwise(points)):
            raise rule_error(f"{name} must be strictly increasing", field=name, value=points)
        if len(self.weights) != n:
            what = "one per value" if name == "values" else "one per bin (len(edges) - 1)"
            raise rule_error(f"need {n} weights, {what}; got {len(self.weights)}",
                             field="weights", value=self.weights)
        if any(w < 0 or not math.isfinite(w) for w in self.weights) or sum(self.weights) <= 0:
            raise rule_error("weights must be finite, >= 0 and not all 0", field="weights",
                             value=self.weights)
        return self

    def _probabilities(self) -> npt.NDArray[np.float64]:
        w = np.asarray(self.weights, dtype=np.float64)
        return w / np.sum(w)

    def mean_tokens(self) -> float:
        p = self._probabilities()
        if self.values is not None:
            return float(p @ np.asarray(self.values, dtype=float))
        e = np.asarray(self.edges, dtype=float)
        return float(p @ ((e[:-1] + e[1:]) / 2))

    def percentile_tokens(self, pct: float) -> float:
        q = _fraction(pct)
        cdf = np.cumsum(self._probabilities())
        # The first value/bin whose cumulative share reaches q (tolerating float round-off).
        i = min(int(np.searchsorted(cdf, q - 1e-12)), len(cdf) - 1)
        if self.values is not None:
            return float(self.values[i])
        assert self.edges is not None
        lo, hi = self.edges[i], self.edges[i + 1]
        before = cdf[i - 1] if i else 0.0
        share = cdf[i] - before
        return lo + (hi - lo) * (q - before) / share if share > 0 else lo

    def expected_min(self, cap: float) -> float:
        p = self._probabilities()
        if self.values is not None:
            return float(p @ np.minimum(np.asarray(self.values, dtype=float), cap))
        e = np.asarray(self.edges, dtype=float)
        a, b = e[:-1], e[1:]
        c = np.clip(cap, a, b)
        # Uniform on [a, b] with a <= c <= b: E[min(X, c)] = ((c^2 - a^2) / 2 + c (b - c)) /
        # (b - a); a bin wholly above the cap contributes the cap itself.
        inside = ((c * c - a * a) / 2 + c * (b - c)) / (b - a)
        return float(p @ np.where(cap < a, cap, inside))

    def sample(self, n: int, rng: np.random.Generator) -> Tokens:
        rng = require_generator(rng)
        p = self._probabilities()
        if self.values is not None:
            picked: Tokens = rng.choice(np.asarray(self.values, dtype=np.int64), size=n, p=p)
            return picked
        e = np.asarray(self.edges, dtype=float)
        bins = rng.choice(len(p), size=n, p=p)
        draws: npt.NDArray[np.float64] = e[bins] + (e[bins + 1] - e[bins]) * rng.random(n)
        return np.maximum(np.rint(draws), 1).astype(np.int64)


def _fraction(pct: float) -> float:
    if not 0 < pct < 100:
        raise ValueError(f"percentile must be strictly between 0 and 100, got {pct}")
    return pct / 100


LengthDistribution = Annotated[
    FixedLengths | LognormalLengths | HistogramLengths, Field(discriminator="kind")]
"""A prompt or output length distribution, told apart by `kind`."""

# Discriminator values, so error paths can drop the union tag pydantic inserts.
LENGTH_KINDS = ("fixed", "lognormal", "histogram")
