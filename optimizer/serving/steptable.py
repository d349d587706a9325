"""Step times for the simulator: straight from the perf model, or from a lazily filled table.

Every simulated engine step asks for the time of one batch: `d` decoding sequences at mean KV
length `kv`, plus a prefill chunk of `p` tokens over `s` sequences whose context reaches `c`
tokens on average. The perf layer's `StepModel.step` answers that, vectorized; called on
scalars it costs 50-200 us of numpy overhead, several times the rest of a simulated step.

`StepTable` splits a step as the step model builds it:
    t(d, kv, p, s, c) = t(d, kv, 0, 0, 0) + delta(d, p, s, c)
The first term (decode step, drafting included) is tabulated for every d and a geometric grid
of kv, and interpolated linearly in kv (decode attention is linear in the KV read). The second
(what a prefill chunk adds) does not depend on kv, because decode attention does not depend on
the chunk; it is tabulated on geometric grids of d, p, s and u = c / (p / s) (u = 1: a fresh
prompt in one chunk) and interpolated multilinearly. Both fill lazily in blocks computed with
one vectorized call, so a run pays for the corner of the space its workload visits.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from trilemma.optimizer.catalog import speculation
from trilemma.optimizer.catalog.speculation import DraftKind
from trilemma.optimizer.perf import latency
from trilemma.optimizer.perf.arrays import FloatArray
from trilemma.optimizer.perf.steps import StepModel
from trilemma.optimizer.serving.cluster import EngineConfig

# Geometric spacing of the table axes; measured against direct calls in the unit tests.
_KV_RATIO = 1.2
_AXIS_RATIO = math.sqrt(2.0)
# Chunk tokens get a finer axis: GEMMs turn from memory- to compute-bound along it.
_TOKEN_RATIO = 2.0**0.25
_DECODE_ROWS_PER_FILL = 32
# The KV length at which delta is taken: any value gives the same delta when the decode term
# is additive, as in StepModel.
_KV_REF = 1024.0

Pricer = Callable[[int, float, int, int, float], float]


class StepCost(Protocol):
    """What the simulator needs of a perf model: `perf.steps.StepModel.step`'s signature."""

    def step(self, *, tp: Any, dp: Any, ep: Any, pp: Any, dec_seqs: Any, dec_kv: Any,
             q: Any = 1.0, pf_tokens: Any = 0.0, pf_seqs: Any = 0.0,
             pf_kv: Any = 0.0, cp: Any = 1.0) -> Any: ...


def step_ms(perf_model: StepCost, engine: EngineConfig, d: Any, kv: Any, p: Any, s: Any,
            c: Any) -> np.ndarray:
    """Vectorized time (ms) of steps with these batch shapes on `engine`, drafting included."""
    d = np.asarray(d, dtype=np.float64)
    total = perf_model.step(tp=engine.tp, dp=engine.dp, ep=engine.ep, pp=engine.pp,
                            dec_seqs=d, dec_kv=np.asarray(kv, dtype=np.float64),
                            q=float(engine.tokens_per_decode),
                            pf_tokens=np.asarray(p, dtype=np.float64),
                            pf_seqs=np.asarray(s, dtype=np.float64),
                            pf_kv=np.asarray(c, dtype=np.float64), cp=engine.cp).total
    return np.asarray(total, dtype=np.float64) + _drafting_ms(perf_model, engine, d, kv)


def _drafting_ms(perf_model: StepCost, engine: EngineConfig, d: np.ndarray,
                 kv: Any) -> FloatArray:
    spec = engine.speculation
    if spec is None or speculation.draft_cost(spec.config.method).kind is DraftKind.NONE:
        return np.zeros(np.shape(d))
    # The perf layer's own drafting cost, so that simulator and analytic model price the same
    # drafter. It is private to perf.latency; perf should export it.
    # A layer drafter (EAGLE, MTP) is priced from the target's own layers, which only perf's
    # StepModel has; a draft model needs only its own StepModel.
    target = perf_model if isinstance(perf_model, StepModel) else None
    ms = latency._draft_ms(target, spec.draft, spec.config,
                           tp=np.asarray(engine.tp, dtype=np.float64),
                           dp=np.asarray(engine.dp, dtype=np.float64),
                           ep=np.asarray(engine.ep, dtype=bool),
                           pp=np.asarray(engine.pp, dtype=np.float64), dec=d,
                           ctx=np.asarray(kv, dtype=np.float64), cp=engine.cp)
    return np.where(d > 0, ms, 0.0)


class DirectPricer:
    """The reference: one perf-model call per simulated step."""

    def __init__(self, perf_model: StepCost, engine: EngineConfig) -> None:
        self.perf_model = perf_model
        self.engine = engine
        self.calls = 0

    def __call__(self, d: int, kv: float, p: int, s: int, c: float) -> float:
        self.calls += 1
        return float(step_ms(self.perf_model, self.engine, d, kv, p, s, c))

    def decode_cursor(self, d: int) -> Callable[[float], float]:
        """StepTable.decode_cursor's counterpart: one perf-model call per step."""
        return lambda kv: self(d, kv, 0, 0, 0.0)


def _int_axis(top: int, start: int, ratio: float = _AXIS_RATIO) -> list[int]:
    """start, start+1, ... then `ratio` apart, ending exactly at `top`."""
    out = list(range(start, min(top, start + 4) + 1))
    x = float(out[-1])
    while out[-1] < top:
        x *= ratio
        out.append(min(top, max(out[-1] + 1, round(x))))
    return out


def _float_axis(lo: float, hi: float, ratio: float) -> list[float]:
    n = max(1, math.ceil(math.log(max(hi, lo * ratio) / lo) / math.log(ratio)))
    return [float(v) for v in np.geomspace(lo, max(hi, lo * ratio), n + 1)]


def _locate(axis: list[Any], x: float) -> tuple[int, float]:
    """Cell index and weight of x on an increasing axis; outside it, extrapolate the end cell."""
    i = bisect.bisect_right(axis, x) - 1
    i = min(max(i, 0), len(axis) - 2)
    lo = axis[i]
    return i, (x - lo) / (axis[i + 1] - lo)


class StepTable:
    """Step times interpolated from a table of the perf model; same call as DirectPricer.

    max_context: the longest KV (tokens) a sequence reaches; axes extend to it.
    """

    def __init__(self, perf_model: StepCost, engine: EngineConfig, *, max_context: int) -> None:
        self.perf_model = perf_model
        self.engine = engine
        seats = engine.seats
        budget = engine.max_num_batched_tokens
        top = max(int(max_context), 2)
        self.kv_axis = _float_axis(1.0, float(top), _KV_RATIO)
        self.d_axis = _int_axis(seats, 0)
        self.p_axis = _int_axis(budget, 1, _TOKEN_RATIO)
        self.s_axis = _int_axis(max(min(seats, budget), 2), 1)
        self.u_axis = _float_axis(1.0, float(top), _AXIS_RATIO)
        self._rows: list[list[float] | None] = [None] * (seats + 1)
        self._slabs: dict[tuple[int, int], list[list[float]]] = {}
        self._alone: np.ndarray | None = None  # decode steps on the d axis at _KV_REF
        self.evaluations = 0  # batch shapes priced by the perf model so far

    def _eval(self, d: Any, kv: Any, p: Any, s: Any, c: Any) -> np.ndarray:
        out = step_ms(self.perf_model, self.engine, d, kv, p, s, c)
        self.evaluations += out.size
        return out

    def _fill_rows(self, d: int) -> None:
        first = d - d % _DECODE_ROWS_PER_FILL
        ds = np.arange(first, min(first + _DECODE_ROWS_PER_FILL, len(self._rows)))
        kv = np.asarray(self.kv_axis)
        t = self._eval(ds[:, None], kv[None, :], 0.0, 0.0, 0.0)
        for row, values in zip(ds.tolist(), t.tolist(), strict=True):
            self._rows[row] = values

    def _slab(self, k: int, m: int) -> list[list[float]]:
        """delta over the (d, p) axes at the k-th s and m-th u."""
        slab = self._slabs.get((k, m))
        if slab is None:
            s = float(self.s_axis[k])
            d = np.asarray(self.d_axis, dtype=np.float64)[:, None]
            # A chunk carries at least one token per sequence.
            p = np.maximum(np.asarray(self.p_axis, dtype=np.float64), s)[None, :]
            c = self.u_axis[m] * p / s
            mixed = self._eval(d, _KV_REF, p, s, c)
            if self._alone is None:  # the same for every slab: priced once
                self._alone = self._eval(d, _KV_REF, 0.0, 0.0, 0.0)
            slab = (mixed - self._alone).tolist()
            self._slabs[(k, m)] = slab
        return slab

    def decode_ms(self, d: int, kv: float) -> float:
        row = self._rows[d]
        if row is None:
            self._fill_rows(d)
            row = self._rows[d]
            assert row is not None
        i, w = _locate(self.kv_axis, kv)
        return row[i] + w * (row[i + 1] - row[i])

    def decode_cursor(self, d: int) -> Callable[[float], float]:
        """decode_ms(d, .) for a run of increasing kv (a decode-only stretch): the cell only
        moves forward, so no search; the same arithmetic, so the same bits."""
        if self._rows[d] is None:
            self._fill_rows(d)
        row, axis = self._rows[d], self.kv_axis
        assert row is not None
        last = len(axis) - 2
        i = 0

        def at(kv: float) -> float:
            nonlocal i
            if kv < axis[i]:
                i = 0  # not increasing after all: start over
            while i < last and axis[i + 1] <= kv:
                i += 1
            lo = axis[i]
            w = (kv - lo) / (axis[i + 1] - lo)
            return row[i] + w * (row[i + 1] - row[i])

        return at

    def chunk_ms(self, d: int, p: int, s: int, c: float) -> float:
        """What a prefill chunk adds to a step of d decodes."""
        i, wd = _locate(self.d_axis, d)
        j, wp = _locate(self.p_axis, p)
        k, ws = _locate(self.s_axis, s)
        m, wu = _locate(self.u_axis, c * s / p)
        total = 0.0
        # Corners with zero weight are skipped: s is often exactly on the axis and u is 1 for
        # every prompt prefilled in one chunk.
        for kk, a in ((k, 1.0 - ws), (k + 1, ws)):
            if a == 0.0:
                continue
            for mm, b in ((m, 1.0 - wu), (m + 1, wu)):
                if b == 0.0:
                    continue
                g = self._slab(kk, mm)
                lo, hi = g[i], g[i + 1]
                at_lo = lo[j] + wp * (lo[j + 1] - lo[j])
                at_hi = hi[j] + wp * (hi[j + 1] - hi[j])
                total += a * b * (at_lo + wd * (at_hi - at_lo))
        return total

    def __call__(self, d: int, kv: float, p: int, s: int, c: float) -> float:
        t = self.decode_ms(d, kv)
        if s:
            t += self.chunk_ms(d, p, s, c)
        return t
