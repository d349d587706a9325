"""ObservedWorkload values for the closed loop's unit tests (retune, acceptance)."""

from __future__ import annotations

from trilemma.operator.estimator import (
    Availability,
    LatencyStats,
    LengthStats,
    MetricsReason,
    ObservedWorkload,
)
from trilemma.optimizer.catalog.engines import Engine

NOW = 1_700_000_000.0


def observed(*, rate: float = 10.0, prompt: float = 1000.0, output: float = 200.0,
             prefix: float | None = 0.3, samples: float = 9000.0, at: float = NOW,
             window: int = 900, ttft: LatencyStats | None = None,
             itl: LatencyStats | None = None,
             reason: MetricsReason = MetricsReason.AVAILABLE) -> ObservedWorkload:
    return ObservedWorkload(
        engine=Engine.VLLM, window_s=window, observed_at=at,
        availability=Availability(reason=reason, message=f"{reason.value} (test)"),
        rate_rps=rate, prompt_tokens=LengthStats(mean=prompt),
        output_tokens=LengthStats(mean=output), prefix_hit_share=prefix,
        ttft_ms=ttft or LatencyStats(), itl_ms=itl or LatencyStats(), samples=samples)
