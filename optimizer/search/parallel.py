"""Screening across processes: the same result as serial `screening.screen_space`, sooner.

Screening spends its time in ~600 small step-model calls, one group at a time, each mostly
fixed numpy overhead: that does not vectorise further, but it splits cleanly by group. Forked
workers inherit the function to run (set just before the pool starts), so only group indices
go out and results come back; `pool.map` returns them in input order, which keeps the merge
deterministic. Anything that stops the pool (no fork on this platform, a broken worker)
falls back to running the same function serially.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

from trilemma.optimizer.search import screening
from trilemma.optimizer.search.screening import RowScreen
from trilemma.optimizer.search.space import SearchSettings, Space
from trilemma.optimizer.spec.plan_request import PlanRequest

_MIN_ITEMS = 32  # below this, starting processes costs more than it saves
_TASK: Callable[[int], Any] | None = None


def _run(i: int) -> Any:
    assert _TASK is not None, "set by the parent before forking"
    return _TASK(i)


def mapper(workers: int, min_items: int = _MIN_ITEMS) -> screening.Mapper:
    """`min_items`: fewer items run serially (worth lowering for items of ~0.1 s or more,
    such as confirming simulations)."""
    def run(fn: Callable[[int], Any], items: list[int]) -> list[Any]:
        global _TASK
        n = min(workers, len(items), os.cpu_count() or 1)
        forks = "fork" in multiprocessing.get_all_start_methods()
        if n < 2 or len(items) < min_items or not forks:
            return [fn(i) for i in items]
        _TASK = fn
        try:
            # Interleaved chunks balance the groups' uneven sizes across workers.
            with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("fork")) as ex:
                return list(ex.map(_run, items, chunksize=max(1, len(items) // (n * 8))))
        except (BrokenProcessPool, OSError):
            return [fn(i) for i in items]
        finally:
            _TASK = None
    return run


def warm(space: Space, request: PlanRequest) -> None:
    """Build each step model (and the kernel tables it loads lazily) once in the parent, so
    that forked workers inherit them instead of each building its own."""
    wl = screening.WorkloadMeans.of(request)
    terms = screening.slo_terms(request)
    seen: set[tuple[str, ...]] = set()
    for rows in space.rows:
        g = rows.group
        key = (g.arch.id, g.gpu.key, g.quant.value, g.kv.value, g.engine.value)
        if key not in seen:
            seen.add(key)
            screening.coarse_scores(screening.subset(rows, np.arange(1)), request, wl, terms)


def screen_space(space: Space, request: PlanRequest,
                 settings: SearchSettings) -> tuple[list[RowScreen], int, int]:
    if settings.workers > 1:
        warm(space, request)
    return screening.screen_space(space, request, settings, mapper(settings.workers))
