"""PNG figures of a plan: latency against load, and the cost/latency Pareto front.

Sits at the validation layer, beside `validation`: it draws numbers that search and the
performance model produced, as plain data (`Curve`, `ParetoPoint`), so it imports neither.
matplotlib is an optional extra (`pip install 'trilemma[plot]'`) imported inside the
functions, so the optimizer runs without it. Figures are built on matplotlib's object API
with the Agg canvas, never pyplot: no global figure state, no display backend. Output is
byte-for-byte reproducible: fixed size and DPI, fixed style, and no Software/date metadata.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trilemma.optimizer.errors import InputError

if TYPE_CHECKING:  # matplotlib is an optional extra: its names are for the type checker only
    from matplotlib.typing import RcKeyType

FIGSIZE_IN = (10.0, 4.2)
PARETO_FIGSIZE_IN = (7.0, 5.0)
DPI = 120
# Only the keys the figures depend on, so a user's matplotlibrc cannot change the bytes.
_STYLE: dict[RcKeyType, Any] = {
    "font.family": "DejaVu Sans",   # ships with matplotlib: same glyphs on every machine
    "font.size": 9.0,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "savefig.facecolor": "white",
}
_COLOURS = ("#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#ff7f0e", "#17becf", "#8c564b")
_BASELINE_COLOUR = "#444444"
# PNG text chunks matplotlib would write; None drops them (the version string would change the
# bytes between matplotlib releases).
_METADATA = {"Software": None}


@dataclass(frozen=True, kw_only=True)
class Curve:
    """One configuration's p90 latencies at increasing request rates."""

    label: str
    rates_rps: Sequence[float]
    ttft_p90_ms: Sequence[float]
    tpot_p90_ms: Sequence[float]
    baseline: bool = False


@dataclass(frozen=True, kw_only=True)
class ParetoPoint:
    """One priced configuration: $/hour and a latency figure (e.g. TTFT or TPOT p90)."""

    cost_per_hour: float
    latency_ms: float
    label: str
    on_front: bool = False
    recommended: bool = False
    baseline: bool = False
    alternative: bool = False  # the best on one GPU type or engine, off the front
    dominated: bool = False    # (alternatives) the front is no worse on both axes: faded


@contextmanager
def _figure(path: Path, figsize: tuple[float, float]) -> Iterator[Any]:
    """A fresh Agg figure under the fixed style, saved to `path` on exit."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.rcsetup import cycler
    except ImportError:
        raise InputError("plot", str(path),
                         "needs the [plot] extra: pip install 'trilemma[plot]'") from None
    # A fixed colour cycle: the default one can be changed by a matplotlibrc.
    style: dict[RcKeyType, Any] = {**_STYLE, "axes.prop_cycle": cycler(color=list(_COLOURS))}
    with matplotlib.rc_context(style):
        fig = Figure(figsize=figsize, dpi=DPI)
        FigureCanvasAgg(fig)
        yield fig
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=DPI, metadata=_METADATA)


def _positive(name: str, values: Sequence[float], where: str) -> list[float]:
    out = [float(v) for v in values]
    if any(not math.isfinite(v) or v <= 0 for v in out):
        raise InputError(name, where, "values must be finite and positive")
    return out


def _wide(values: Sequence[float], ratio: float = 20.0) -> bool:
    """Log scale when the values span more than `ratio`: saturation makes TTFT explode."""
    return bool(values) and max(values) / min(values) > ratio


def rate_latency_plot(curves: Sequence[Curve], path: Path, *, title: str,
                      ttft_slo_ms: float | None = None, tpot_slo_ms: float | None = None) -> Path:
    """Two panels, rate vs TTFT p90 and rate vs TPOT p90; baselines dashed, SLOs dotted."""
    if not curves:
        raise InputError("curves", [], "at least one curve is needed")
    data = []
    for c in curves:
        n = len(c.rates_rps)
        if n == 0 or len(c.ttft_p90_ms) != n or len(c.tpot_p90_ms) != n:
            raise InputError("curves", c.label,
                             "rates, TTFT and TPOT need the same, non-zero number of points")
        data.append((c, _positive("rates_rps", c.rates_rps, c.label),
                     _positive("ttft_p90_ms", c.ttft_p90_ms, c.label),
                     _positive("tpot_p90_ms", c.tpot_p90_ms, c.label)))
    with _figure(path, FIGSIZE_IN) as fig:
        ax_ttft, ax_tpot = fig.subplots(1, 2)
        for ax, column, slo, name in ((ax_ttft, 2, ttft_slo_ms, "TTFT p90 (ms)"),
                                      (ax_tpot, 3, tpot_slo_ms, "TPOT p90 (ms)")):
            for c, *series in data:
                style: dict[str, Any] = (
                    {"linestyle": "--", "color": _BASELINE_COLOUR, "marker": "x"}
                    if c.baseline else {"linestyle": "-", "marker": "o", "markersize": 3.5})
                label = f"{c.label} (baseline)" if c.baseline else c.label
                ax.plot(series[0], series[column - 1], label=label, linewidth=1.6, **style)
            if slo is not None:
                # Labelled in place: the two panels' SLOs differ, one legend cannot say both.
                ax.axhline(slo, color="#b00000", linestyle=":", linewidth=1.2)
                ax.annotate(f"SLO {slo:g} ms", (1.0, slo), xycoords=("axes fraction", "data"),
                            xytext=(-4, 3), textcoords="offset points", ha="right",
                            fontsize=8, color="#b00000")
            values = [v for _, *s in data for v in s[column - 1]]
            if _wide(values + ([slo] if slo else [])):
                ax.set_yscale("log")
            ax.set_xlabel("request rate (req/s)")
            ax.set_ylabel(name)
            ax.set_xlim(left=0)
        ax_ttft.set_title("time to first token", fontsize=9)
        ax_tpot.set_title("time per output token", fontsize=9)
        ax_tpot.legend(loc="upper left", fontsize=8, framealpha=0.9)
        fig.suptitle(title, fontsize=11)
    return path


def pareto_plot(points: Sequence[ParetoPoint], path: Path, *, title: str,
                latency_label: str = "latency p90 (ms)") -> Path:
    """Cost/latency scatter: front joined by a step line, recommendation starred, baseline X."""
    if not points:
        raise InputError("points", [], "at least one point is needed")
    for p in points:
        _positive("cost_per_hour", [p.cost_per_hour], p.label)
        _positive("latency_ms", [p.latency_ms], p.label)
    with _figure(path, PARETO_FIGSIZE_IN) as fig:
        ax = fig.subplots()
        others = [p for p in points
                  if not (p.on_front or p.recommended or p.baseline or p.alternative)]
        front = sorted((p for p in points if p.on_front), key=lambda p: p.cost_per_hour)
        if others:
            ax.scatter([p.cost_per_hour for p in others], [p.latency_ms for p in others],
                       s=14, color="#9e9e9e", alpha=0.6, label="dominated", zorder=2)
        if front:
            ax.step([p.cost_per_hour for p in front], [p.latency_ms for p in front],
                    where="post", color=_COLOURS[0], linewidth=1.4, zorder=3)
            ax.scatter([p.cost_per_hour for p in front], [p.latency_ms for p in front],
                       s=28, color=_COLOURS[0], label="Pareto front", zorder=4)
        for p in points:
            if p.recommended:
                ax.scatter([p.cost_per_hour], [p.latency_ms], marker="*", s=260,
                           color="#f2b01e", edgecolor="black", linewidth=0.8, zorder=6,
                           label=f"recommended: {p.label}")
            if p.baseline:
                ax.scatter([p.cost_per_hour], [p.latency_ms], marker="X", s=110,
                           color="#d62728", edgecolor="black", linewidth=0.6, zorder=5,
                           label=f"baseline: {p.label}")
        _alternatives(ax, [p for p in points if p.alternative and not p.recommended])
        for p in front:
            if not p.recommended:
                ax.annotate(p.label, (p.cost_per_hour, p.latency_ms), textcoords="offset points",
                            xytext=(5, 4), fontsize=7, color="#333333")
        costs = [p.cost_per_hour for p in points]
        latencies = [p.latency_ms for p in points]
        if _wide(costs, 8.0):
            ax.set_xscale("log")
        if _wide(latencies, 8.0):
            ax.set_yscale("log")
        ax.margins(x=0.12, y=0.08)  # room for the point labels at the edges
        ax.set_xlabel("cost ($/hour)")
        ax.set_ylabel(latency_label)
        ax.set_title(title, fontsize=11)
        ax.legend(loc="upper right", fontsize=8, framealpha=0.9)
    return path


def _alternatives(ax: Any, points: Sequence[ParetoPoint]) -> None:
    """Diamonds, labelled: solid where nothing on the front beats them, faded where it does."""
    for faded in (False, True):
        group = [p for p in points if p.dominated is faded]
        if not group:
            continue
        alpha = 0.35 if faded else 0.9
        ax.scatter([p.cost_per_hour for p in group], [p.latency_ms for p in group], marker="D",
                   s=30, color=_COLOURS[4], alpha=alpha, zorder=3,
                   label="best per GPU / engine" + (" (dominated)" if faded else ""))
        for p in group:
            ax.annotate(p.label, (p.cost_per_hour, p.latency_ms), textcoords="offset points",
                        xytext=(5, -9), fontsize=7, color="#333333", alpha=alpha)
