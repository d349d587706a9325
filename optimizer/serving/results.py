"""What a simulation yields: per-request timestamps, and the statistics read from them.

The event loop writes a `Trace` (plain lists, cheap to update) and freezes it into a
`SimResult`. Definitions follow the benchmark clients (genai-perf, `vllm bench serve`):
  TTFT  = first token - arrival;  E2E = finish - arrival;
  TPOT  = (E2E - TTFT) / (output tokens - 1), undefined for one-token outputs;
  queue = first scheduled on an engine - arrival (request overhead included).
Times in ms, rates per second.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from trilemma.optimizer.errors import InputError
from trilemma.optimizer.perf.arrays import FloatArray


class Trace:
    """Mutable per-request record that engines and the event loop fill in during a run."""

    def __init__(self, n: int) -> None:
        nan = math.nan
        self.arrival = [nan] * n
        self.first_scheduled = [nan] * n
        self.first_token = [nan] * n
        self.finish = [nan] * n
        self.preemptions = [0] * n
        self.cached_tokens = [0] * n  # prefill tokens skipped thanks to the prefix cache
        self.engine = [-1] * n  # the engine that finished the request
        self.occupancy_ms: list[float] = []  # in-system count changes to occupancy at that time
        self.occupancy: list[int] = []


@dataclass(frozen=True, kw_only=True)
class Stats:
    """Mean and percentiles of one metric over the requests that define it."""

    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: np.ndarray) -> Stats:
        v = values[np.isfinite(values)]
        if v.size == 0:
            return cls(mean=math.nan, p50=math.nan, p90=math.nan, p99=math.nan)
        p50, p90, p99 = np.percentile(v, [50.0, 90.0, 99.0])
        return cls(mean=float(v.mean()), p50=float(p50), p90=float(p90), p99=float(p99))


@dataclass(frozen=True, kw_only=True)
class Summary:
    ttft_ms: Stats
    tpot_ms: Stats
    e2e_ms: Stats
    queue_ms: Stats
    requests_per_s: float
    output_tokens_per_s: float
    preempted_share: float  # requests preempted at least once
    prefix_hit_share: float  # requests that skipped prefill tokens via the prefix cache


@dataclass(frozen=True, kw_only=True)
class SimResult:
    """Per-request arrays (workload row order) and per-engine counters of one run."""

    arrival_ms: FloatArray
    first_scheduled_ms: FloatArray
    first_token_ms: FloatArray
    finish_ms: FloatArray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    preemptions: np.ndarray
    cached_tokens: np.ndarray
    engine: np.ndarray
    occupancy_ms: np.ndarray  # requests in the system: occupancy[j] from occupancy_ms[j] on
    occupancy: np.ndarray
    # Per simulated engine: at most one per request (the rest of a large pool gets none;
    # simulating.simulate), main pool first, then the prefill pool.
    engine_steps: np.ndarray
    engine_busy_ms: np.ndarray
    step_evaluations: int  # batch shapes the perf model priced

    @classmethod
    def from_trace(cls, trace: Trace, *, prompt_tokens: np.ndarray, output_tokens: np.ndarray,
                   engine_steps: list[int], engine_busy_ms: list[float],
                   step_evaluations: int) -> SimResult:
        return cls(arrival_ms=np.array(trace.arrival),
                   first_scheduled_ms=np.array(trace.first_scheduled),
                   first_token_ms=np.array(trace.first_token),
                   finish_ms=np.array(trace.finish),
                   prompt_tokens=np.asarray(prompt_tokens),
                   output_tokens=np.asarray(output_tokens),
                   preemptions=np.array(trace.preemptions, dtype=np.int64),
                   cached_tokens=np.array(trace.cached_tokens, dtype=np.int64),
                   engine=np.array(trace.engine, dtype=np.int64),
                   occupancy_ms=np.array(trace.occupancy_ms),
                   occupancy=np.array(trace.occupancy, dtype=np.int64),
                   engine_steps=np.array(engine_steps, dtype=np.int64),
                   engine_busy_ms=np.array(engine_busy_ms),
                   step_evaluations=step_evaluations)

    # ---- per-request metrics -----------------------------------------------------------------

    @property
    def ttft_ms(self) -> FloatArray:
        return self.first_token_ms - self.arrival_ms

    @property
    def e2e_ms(self) -> FloatArray:
        return self.finish_ms - self.arrival_ms

    @property
    def tpot_ms(self) -> np.ndarray:
        steps = (self.output_tokens - 1).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(steps > 0, (self.e2e_ms - self.ttft_ms) / steps, np.nan)

    @property
    def queue_ms(self) -> FloatArray:
        return self.first_scheduled_ms - self.arrival_ms

    @property
    def makespan_ms(self) -> float:
        return float(self.finish_ms.max() - self.arrival_ms.min())

    # ---- rates over the run or a steady window -----------------------------------------------

    def steady(self, *, warmup: float = 0.0, cooldown: float = 0.0) -> np.ndarray:
        """Mask of the requests that arrive after the first `warmup` share and before the last
        `cooldown` share of arrivals: the ones that saw the system in steady state."""
        if not (warmup >= 0.0 and cooldown >= 0.0 and warmup + cooldown < 1.0):
            raise InputError("warmup", (warmup, cooldown),
                             "warmup and cooldown are shares summing to less than 1")
        n = len(self.arrival_ms)
        order = np.argsort(self.arrival_ms, kind="stable")
        keep = np.zeros(n, dtype=bool)
        keep[order[int(warmup * n):n - int(cooldown * n)]] = True
        return keep

    def _window(self, mask: np.ndarray | None) -> tuple[np.ndarray, float, float]:
        mask = np.ones(len(self.arrival_ms), dtype=bool) if mask is None else mask
        if not mask.any():
            raise InputError("mask", 0, "selects no request")
        start = float(self.arrival_ms[mask].min())
        end = float(self.finish_ms[mask].max())
        return mask, start, end

    def requests_per_s(self, mask: np.ndarray | None = None) -> float:
        """Completions of the selected requests per second of the span they occupy."""
        mask, start, end = self._window(mask)
        return float(mask.sum()) / max(end - start, 1e-9) * 1e3

    def output_tokens_per_s(self, mask: np.ndarray | None = None) -> float:
        mask, start, end = self._window(mask)
        return float(self.output_tokens[mask].sum()) / max(end - start, 1e-9) * 1e3

    def finished_per_s(self, start_ms: float, end_ms: float) -> float:
        """Requests finishing inside [start_ms, end_ms) per second."""
        if not end_ms > start_ms:
            raise InputError("end_ms", end_ms, f"must be after start_ms ({start_ms})")
        done = np.count_nonzero((self.finish_ms >= start_ms) & (self.finish_ms < end_ms))
        return done / (end_ms - start_ms) * 1e3

    def mean_in_system(self, start_ms: float | None = None, end_ms: float | None = None) -> float:
        """Time-average of the requests in the system (arrived, not finished) over a window,
        from the event loop's own count (not from the per-request timestamps)."""
        t = self.occupancy_ms
        start = float(t[0]) if start_ms is None else start_ms
        end = float(t[-1]) if end_ms is None else end_ms
        if not end > start:
            raise InputError("end_ms", end, f"must be after start_ms ({start})")
        edges = np.clip(np.append(t, end), start, end)
        return float(np.sum(self.occupancy * np.diff(edges)) / (end - start))

    def goodput(self, *, ttft_ms: float | None = None, tpot_ms: float | None = None,
                mask: np.ndarray | None = None) -> float:
        """Share of the (selected) requests that meet every given SLO threshold."""
        if ttft_ms is None and tpot_ms is None:
            raise InputError("slo", None, "give a TTFT and/or a TPOT threshold")
        mask = np.ones(len(self.arrival_ms), dtype=bool) if mask is None else mask
        ok = mask.copy()
        if ttft_ms is not None:
            ok &= self.ttft_ms <= ttft_ms
        if tpot_ms is not None:
            # A one-token answer has no TPOT and cannot miss a TPOT target.
            ok &= ~(self.tpot_ms > tpot_ms)
        return float(ok.sum()) / max(int(mask.sum()), 1)

    def summary(self, mask: np.ndarray | None = None) -> Summary:
        mask = np.ones(len(self.arrival_ms), dtype=bool) if mask is None else mask
        return Summary(
            ttft_ms=Stats.of(self.ttft_ms[mask]), tpot_ms=Stats.of(self.tpot_ms[mask]),
            e2e_ms=Stats.of(self.e2e_ms[mask]), queue_ms=Stats.of(self.queue_ms[mask]),
            requests_per_s=self.requests_per_s(mask),
            output_tokens_per_s=self.output_tokens_per_s(mask),
            preempted_share=float(np.mean(self.preemptions[mask] > 0)),
            prefix_hit_share=float(np.mean(self.cached_tokens[mask] > 0)))
