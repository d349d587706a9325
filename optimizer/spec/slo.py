"""Service-level objectives: latency percentiles, per-user speed, a quality floor, a budget.

Every target is optional; the search treats each one given as a hard constraint and the
objective (objective.py) ranks what passes. Latencies are milliseconds, quality is benchmark
points on the scale of the models' scores (spec/models.py), the budget is dollars per hour.
"""

from __future__ import annotations

import itertools

from pydantic import Field, model_validator

from trilemma.optimizer.spec import limits
from trilemma.optimizer.spec.base import SpecModel, rule_error

_PERCENTILES = ("p50", "p90", "p99")


class LatencyTarget(SpecModel):
    """Upper bounds on a latency's percentiles, in milliseconds; give at least one."""

    p50: float | None = Field(default=None, gt=0, le=limits.MAX_LATENCY_MS,
                                  description="Median bound, ms.")
    p90: float | None = Field(default=None, gt=0, le=limits.MAX_LATENCY_MS,
                                  description="90th-percentile bound, ms.")
    p99: float | None = Field(default=None, gt=0, le=limits.MAX_LATENCY_MS,
                                  description="99th-percentile bound, ms.")

    @model_validator(mode="after")
    def _ordered(self) -> LatencyTarget:
        given = [(name, v) for name in _PERCENTILES if (v := getattr(self, name)) is not None]
        if not given:
            raise rule_error("give at least one of p50, p90, p99 (ms), or omit the target")
        for (low, a), (high, b) in itertools.pairwise(given):
            if a > b:
                raise rule_error(f"{low} ({a:g} ms) must not exceed {high} ({b:g} ms)",
                                 field=high, value=b)
        return self

    def items(self) -> tuple[tuple[str, float], ...]:
        """The percentiles given, as (name, ms) from p50 up."""
        return tuple((n, v) for n in _PERCENTILES if (v := getattr(self, n)) is not None)


class Slo(SpecModel):
    """What every served request (or the deployment) must meet."""

    ttft_ms: LatencyTarget | None = Field(
        default=None, description="Time to first token bounds, ms.")
    tpot_ms: LatencyTarget | None = Field(
        default=None, description="Time per output token (after the first) bounds, ms.")
    end_to_end_ms: LatencyTarget | None = Field(
        default=None, description="Request latency bounds, first byte in to last token out, ms.")
    min_tokens_per_second_per_user: float | None = Field(
        default=None, gt=0, le=limits.MAX_TOKENS_PER_SECOND,
        description="Output tokens/s each user must see while streaming; implies a median "
                    "TPOT bound of 1000 / this ms.")
    quality_floor: float | None = Field(
        default=None, gt=0, le=100,
        description="Lowest acceptable model quality, benchmark points (0-100), after the "
                    "quantization penalty.")
    max_cost_per_hour: float | None = Field(
        default=None, gt=0, le=limits.MAX_BUDGET_PER_HOUR,
        description="Budget for the whole deployment, $/hour.")

    @model_validator(mode="after")
    def _end_to_end_covers_ttft(self) -> Slo:
        # A request's latency includes its first token: a tighter end-to-end bound than the
        # TTFT bound at the same percentile can never be met.
        if self.ttft_ms is None or self.end_to_end_ms is None:
            return self
        for name, e2e in self.end_to_end_ms.items():
            ttft = getattr(self.ttft_ms, name)
            if ttft is not None and e2e < ttft:
                raise rule_error(
                    f"end-to-end {name} ({e2e:g} ms) is below ttftMs.{name} ({ttft:g} ms); "
                    "a request's latency includes its first token",
                    field=f"endToEndMs.{name}", value=e2e)
        return self

    @property
    def effective_tpot_p50_ms(self) -> float | None:
        """The tightest median TPOT bound implied by tpotMs and minTokensPerSecondPerUser.

        A user streaming at r tokens/s needs a mean gap of 1000/r ms; we read that as the
        median request's TPOT. A p90 or p99 bound also bounds the median, so all count.
        """
        bounds = [v for _, v in self.tpot_ms.items()] if self.tpot_ms else []
        if self.min_tokens_per_second_per_user is not None:
            bounds.append(1000.0 / self.min_tokens_per_second_per_user)
        return min(bounds) if bounds else None

    @property
    def is_unconstrained(self) -> bool:
        """True when no target is given: the objective alone decides."""
        return all(getattr(self, name) is None for name in type(self).model_fields)
