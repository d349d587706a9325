"""The chart's Grafana dashboard drawn with matplotlib from real Prometheus data, for the README.

No Grafana runs here (no package, no container), so this draws the dashboard itself: it runs
`trilemma demo` (the operator, a simulated vLLM fleet under steady then shifted traffic, a real
Prometheus scraping the fleet and the operator) keeping Prometheus' data, then starts
Prometheus again on that data, evaluates every panel's and annotation's PromQL from the SAME
JSON over the run (query_range, Grafana's variables filled in), and lays the panels out by
their gridPos. What it shows is what those queries return; the look is only Grafana-like.

    python -m trilemma.tools.dashboard_render --out docs/dashboard.png
    python -m trilemma.tools.dashboard_render --data DIR   # redraw a kept run (--keep DIR)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

from trilemma.tools.dashboard_queries import (
    DASHBOARD,
    DATASOURCE_VARIABLE,
    Annotation,
    Dashboard,
    Panel,
    expand,
)

RANGE_FILE = "range.json"  # beside the kept data: the run's [start, end] in unix seconds
STEP_S = 5
CLOCK_TICK_S = 30  # x ticks: UTC clock time every 30 s (the run lasts minutes)
# Grafana's $__rate_interval would be 4 scrapes (4 s) here; the operator's window in the demo
# is 30 s, and quantiles over 4 s of traffic are mostly noise.
RATE_INTERVAL = "30s"
GRID_COLUMNS = 24
INCH_PER_COLUMN, INCH_PER_ROW = 0.68, 0.32
# Inside a panel's cell (inches): its title above the plot, tick labels left and below.
PAD_TOP, PAD_BOTTOM, PAD_LEFT, PAD_RIGHT = 0.32, 0.28, 0.55, 0.12
HEADER, FOOTER = 0.4, 0.3  # the dashboard's title bar, the caption line (inches)
CAPTION = ("matplotlib rendering of the dashboard's PromQL (charts/trilemma/dashboards/"
           "trilemma-endpoint.json) against real Prometheus data from `trilemma demo`; "
           "not a Grafana screenshot")
BACKGROUND, PANEL, TEXT, GRIDLINE = "#111217", "#181b1f", "#ccccdc", "#2c3235"
PALETTE = ("#73bf69", "#fade2a", "#5794f2", "#ff9830", "#b877d9", "#8ab8ff", "#f2495c")
PREDICTED, ANNOTATION, GRIDLINE_TEXT = "#f2495c", "#ff9830", "#8e8e9e"


class _RangeSeries(TypedDict):
    metric: dict[str, str]
    values: list[list[float | str]]


@dataclass(frozen=True)
class Series:
    label: str
    times: tuple[float, ...]
    values: tuple[float, ...]


@dataclass(frozen=True)
class Change:
    """A configuration change: when the annotation query first returned its series."""

    at: float
    title: str


class RangeQueries:
    """query_range against one Prometheus over one time range, Grafana's variables filled."""

    def __init__(self, url: str, start: float, end: float, variables: Mapping[str, str]) -> None:
        self.url, self.start, self.end = url, start, end
        self.variables = dict(variables)

    def run(self, expr: str) -> list[_RangeSeries]:
        query = urllib.parse.urlencode({"query": expand(expr, self.variables),
                                        "start": self.start, "end": self.end, "step": STEP_S})
        with urllib.request.urlopen(f"{self.url}/api/v1/query_range?{query}",
                                    timeout=30) as response:
            body = json.loads(response.read())
        if body.get("status") != "success":
            raise RuntimeError(f"query failed: {expr}: {body}")
        result: list[_RangeSeries] = body["data"]["result"]
        return result

    def series(self, panel: Panel) -> list[Series]:
        out = []
        for target in panel.targets:
            for found in self.run(target.expr):
                points = [(float(t), float(v)) for t, v in found["values"]]
                out.append(Series(label=_legend(target.legend, found["metric"]),
                                  times=tuple(t for t, _ in points),
                                  values=tuple(v for _, v in points)))
        return out

    def changes(self, annotation: Annotation) -> list[Change]:
        """One change per series and contiguous run of samples, as Grafana groups them."""
        out = []
        for found in self.run(annotation.expr):
            times = [float(t) for t, _ in found["values"]]
            starts = [t for i, t in enumerate(times) if i == 0 or t - times[i - 1] > STEP_S]
            title = _legend(annotation.title_format, found["metric"])
            out += [Change(at=t, title=title) for t in starts]
        return sorted(out, key=lambda c: c.at)


def _legend(template: str, labels: Mapping[str, str]) -> str:
    """Grafana's legend format: {{label}} replaced by the series' label value."""
    text = template
    for key, value in labels.items():
        text = text.replace("{{" + key + "}}", value)
    return text or "value"


def draw(dashboard: Dashboard, queries: RangeQueries, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = max(p.grid.y + p.grid.h for p in dashboard.panels)
    width = GRID_COLUMNS * INCH_PER_COLUMN
    height = HEADER + rows * INCH_PER_ROW + FOOTER
    fig = plt.figure(figsize=(width, height), facecolor=BACKGROUND)
    fig.text(0.1 / width, 1 - HEADER / 2 / height, f"{dashboard.title}    namespace="
             f"{queries.variables['namespace']}   endpoint={queries.variables['endpoint']}",
             color=TEXT, fontsize=11, va="center", weight="bold")
    fig.text(0.1 / width, FOOTER / 2 / height, CAPTION, color=GRIDLINE_TEXT, fontsize=7,
             va="center", style="italic")
    changes = [c for a in dashboard.annotations for c in queries.changes(a)]
    for panel in dashboard.panels:
        # The cell in inches from the bottom left, then the plot inset in it.
        left = panel.grid.x * INCH_PER_COLUMN
        top = height - HEADER - panel.grid.y * INCH_PER_ROW
        w, h = panel.grid.w * INCH_PER_COLUMN, panel.grid.h * INCH_PER_ROW
        if panel.type == "row":
            fig.text((left + 0.1) / width, (top - h / 2) / height, panel.title, color=TEXT,
                     fontsize=10, va="center", weight="bold")
            continue
        ax = fig.add_axes(((left + PAD_LEFT) / width, (top - h + PAD_BOTTOM) / height,
                           (w - PAD_LEFT - PAD_RIGHT) / width,
                           (h - PAD_TOP - PAD_BOTTOM) / height))
        _panel(ax, panel, queries.series(panel), changes, queries)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=72, facecolor=BACKGROUND)
    plt.close(fig)


def _panel(ax: object, panel: Panel, series: Sequence[Series], changes: Sequence[Change],
           queries: RangeQueries) -> None:
    from matplotlib.axes import Axes
    from matplotlib.ticker import FuncFormatter, MaxNLocator, MultipleLocator

    assert isinstance(ax, Axes)
    ax.set_facecolor(PANEL)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.tick_params(colors=TEXT, labelsize=7, length=0)
    ax.grid(color=GRIDLINE, linewidth=0.6)
    ax.set_title(panel.title, color=TEXT, fontsize=9, loc="left", pad=4)
    ax.set_xlim(queries.start, queries.end)
    colours = iter(PALETTE)
    for s in series:
        dashed = s.label in panel.dashed
        # Predictions on top: a prediction the observation matches would hide under it.
        ax.plot(s.times, s.values, linewidth=1.4, linestyle="--" if dashed else "-",
                color=PREDICTED if dashed else next(colours, TEXT), label=s.label,
                zorder=3 if dashed else 2)
    for change in changes:
        ax.axvline(change.at, color=ANNOTATION, linewidth=1.0, linestyle=":")
        if panel.grid.y == 0:  # Grafana shows the text on hover; here once, on the top row
            # Left of the line in the right half, so that it stays inside the panel.
            right = change.at > (queries.start + queries.end) / 2
            ax.text(change.at, 0.02, f" {change.title} ", color=ANNOTATION, fontsize=6.5,
                    transform=ax.get_xaxis_transform(), va="bottom",
                    ha="right" if right else "left")
    # Headroom for the legend, which Grafana puts below the plot, also over a flat line.
    highest = max((v for s in series for v in s.values if math.isfinite(v)), default=0.0)
    ax.set_ylim(0, highest * 1.35 if highest > 0 else 1.0)
    ax.yaxis.set_major_locator(MaxNLocator(nbins=4))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _format(v, panel.unit)))
    ax.xaxis.set_major_locator(MultipleLocator(CLOCK_TICK_S))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda t, _: time.strftime(
        "%H:%M:%S", time.gmtime(t))))
    if series:
        ax.legend(loc="upper left", fontsize=6.5, frameon=False, labelcolor=TEXT, ncol=4,
                  handlelength=1.6, columnspacing=1.0)
    else:
        ax.text(0.5, 0.5, "No data", color=TEXT, ha="center", va="center",
                transform=ax.transAxes, fontsize=9)


def _format(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"
    if unit == "currencyUSD":
        return f"${value:.2f}"
    if unit in ("reqps", "ops"):
        return f"{value:g}/s"
    return f"{value:g}"


def run_demo_keeping_data(data: Path, steady_s: float, shift_s: float, seed: int,
                          control_plane: str) -> None:
    """`trilemma demo` with Prometheus' data kept in `data`, and the run's range beside it."""
    from trilemma.tools.demo import DemoOptions, run_demo

    started = time.time()
    options = DemoOptions(steady_s=steady_s, shift_s=shift_s, seed=seed,
                          control_plane=control_plane, prometheus_dir=data)
    result = asyncio.run(run_demo(options, out=sys.stderr))
    if not (data / "data").is_dir():
        raise RuntimeError(f"the demo kept no Prometheus data: {result.message}")
    (data / RANGE_FILE).write_text(json.dumps({"start": started, "end": time.time()}))


def render(data: Path, out: Path, dashboard: Dashboard, variables: Mapping[str, str]) -> None:
    from trilemma.simfleet.prometheus_server import PrometheusServer

    span = json.loads((data / RANGE_FILE).read_text())
    with PrometheusServer(data, []) as prometheus:  # no scrapes: the kept data only
        first = RangeQueries(prometheus.url, span["start"], span["end"], variables).run(
            "count(up)")
        start = min((float(found["values"][0][0]) for found in first), default=span["start"])
        draw(dashboard, RangeQueries(prometheus.url, start, span["end"], variables), out)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trilemma.tools.dashboard_render",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--out", type=Path, default=Path("docs/dashboard.png"))
    parser.add_argument("--dashboard", type=Path, default=DASHBOARD)
    parser.add_argument("--data", type=Path, help="redraw a kept run instead of running one")
    parser.add_argument("--keep", type=Path, help="keep the run's Prometheus data here")
    parser.add_argument("--steady-s", type=float, default=45.0)
    parser.add_argument("--shift-s", type=float, default=120.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--control-plane", default="kmock")
    args = parser.parse_args(argv)
    from trilemma.tools.demo import scenario

    variables = {"namespace": scenario.NAMESPACE, "endpoint": scenario.NAME,
                 "__rate_interval": RATE_INTERVAL, "__interval": f"{STEP_S}s",
                 DATASOURCE_VARIABLE: "prometheus"}
    dashboard = Dashboard.load(args.dashboard)
    if args.data is not None:
        render(args.data, args.out, dashboard, variables)
        return 0
    with tempfile.TemporaryDirectory(prefix="trilemma-dashboard-") as tmp:
        data = args.keep or Path(tmp) / "prometheus"
        run_demo_keeping_data(data, args.steady_s, args.shift_s, args.seed, args.control_plane)
        render(data, args.out, dashboard, variables)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
