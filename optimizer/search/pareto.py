"""Pareto fronts: which points no other point beats on every objective.

`pareto_front_reference` is the definition written out (O(n^2) pairs, for tests);
`pareto_front` is the one the search runs: sort lexicographically, so a point can only be
dominated by one before it, then compare chunks against the front found so far. A point
dominated by a non-front point is also dominated by a front point (dominance is transitive),
so comparing against the front is enough.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import numpy as np

from trilemma.optimizer.errors import InputError

_CHUNK = 512


class Sense(enum.Enum):
    MIN = "min"
    MAX = "max"


def _normalise(points: np.ndarray | Sequence[Sequence[float]],
               senses: Sequence[Sense]) -> np.ndarray:
    x = np.asarray(points, dtype=np.float64)
    if x.ndim != 2:
        raise InputError("points", x.shape, "must be a 2-D array: one row per point")
    if len(senses) != x.shape[1]:
        raise InputError("senses", len(senses),
                         f"needs one sense per objective column ({x.shape[1]})")
    for s in senses:
        if not isinstance(s, Sense):
            raise InputError("senses", s, "each must be Sense.MIN or Sense.MAX")
    if not np.all(np.isfinite(x)):
        raise InputError("points", "non-finite", "objectives must be finite numbers")
    sign = np.array([1.0 if s is Sense.MIN else -1.0 for s in senses])
    signed: np.ndarray = x * sign
    return signed


def dominates(a: np.ndarray, b: np.ndarray) -> bool:
    """a is no worse than b everywhere and better somewhere (both already minimised)."""
    return bool(np.all(a <= b) and np.any(a < b))


def pareto_front_reference(points: np.ndarray | Sequence[Sequence[float]],
                           senses: Sequence[Sense]) -> np.ndarray:
    """Indices (ascending) of the non-dominated points; every pair compared."""
    x = _normalise(points, senses)
    return np.array([i for i in range(len(x))
                     if not any(dominates(x[j], x[i]) for j in range(len(x)) if j != i)],
                    dtype=np.int64)


def pareto_front(points: np.ndarray | Sequence[Sequence[float]],
                 senses: Sequence[Sense]) -> np.ndarray:
    """Indices (ascending) of the non-dominated points; equal points are all kept."""
    x = _normalise(points, senses)
    n = len(x)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort(x.T[::-1])
    xs = x[order]
    front = np.zeros((0, x.shape[1]))
    keep: list[np.ndarray] = []
    for start in range(0, n, _CHUNK):
        c = xs[start:start + _CHUNK]
        alive = np.ones(len(c), dtype=bool)
        if len(front):
            le = np.all(front[None, :, :] <= c[:, None, :], axis=-1)
            lt = np.any(front[None, :, :] < c[:, None, :], axis=-1)
            alive &= ~(le & lt).any(1)
        c_alive = c[alive]
        le = np.all(c_alive[None, :, :] <= c_alive[:, None, :], axis=-1)
        lt = np.any(c_alive[None, :, :] < c_alive[:, None, :], axis=-1)
        inner = ~(le & lt).any(1)
        idx = np.flatnonzero(alive)[inner]
        keep.append(order[start + idx])
        front = np.concatenate([front, c[idx]])
    return np.sort(np.concatenate(keep))
