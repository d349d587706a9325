"""Absolute percentage errors and their summaries, shared by every validation report."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypedDict

import numpy as np


def ape(pred: float | None, meas: float | None) -> float | None:
    """|pred - meas| / meas in percent; None when either side is missing."""
    if pred is None or meas is None:
        return None
    return abs(pred - meas) / meas * 100.0


class ErrorStats(TypedDict):
    """APE of one metric over some rows, as the validation reports print and serialise it."""

    n: int
    median_ape: float | None  # percent
    p90_ape: float | None


def stats(values: Sequence[float]) -> ErrorStats:
    """Count, median and p90 of APE values (percent, two decimals)."""
    if not values:
        return {"n": 0, "median_ape": None, "p90_ape": None}
    arr = np.asarray(values)
    return {"n": len(values), "median_ape": round(float(np.median(arr)), 2),
            "p90_ape": round(float(np.percentile(arr, 90)), 2)}


def rounded(x: float | None) -> float | None:
    return None if x is None else round(x, 3)
