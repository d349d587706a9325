"""The dashboard's matplotlib renderer (trilemma.tools.dashboard_render) on canned query results:
legends filled from labels, annotations grouped into changes, every panel drawn. The real run
(the demo, then Prometheus' query_range) is `python -m trilemma.tools.dashboard_render`."""

from __future__ import annotations

from typing import Any

from trilemma.tools import dashboard_render
from trilemma.tools.dashboard_queries import Annotation, Dashboard
from trilemma.tools.dashboard_render import RangeQueries

START = 1_700_000_000.0


class Canned(RangeQueries):
    """Every query returns the same two series: one labelled by hash, one by result."""

    def __init__(self) -> None:
        super().__init__("http://unused", START, START + 300, {"namespace": "n", "endpoint": "e"})
        self.queries: list[str] = []

    def run(self, expr: str) -> list[Any]:
        self.queries.append(expr)
        first = [[START + t, "1"] for t in range(0, 60, dashboard_render.STEP_S)]
        later = [[START + t, "NaN"] for t in range(200, 260, dashboard_render.STEP_S)]
        return [{"metric": {"hash": "abc", "result": "ok"}, "values": first + later}]


def test_annotations_become_one_change_per_contiguous_run():
    annotation = Annotation(name="a", expr="x", title_format="new {{hash}}", text_format="")
    changes = Canned().changes(annotation)
    assert [(c.at - START, c.title) for c in changes] == [(0.0, "new abc"), (200.0, "new abc")]


def test_every_panel_of_the_dashboard_is_drawn(tmp_path):
    dashboard = Dashboard.load()
    queries = Canned()
    out = tmp_path / "d.png"
    dashboard_render.draw(dashboard, queries, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    targets = sum(len(p.targets) for p in dashboard.panels)
    assert len(queries.queries) == targets + len(dashboard.annotations)


def test_series_take_their_legend_and_units_as_grafana_does():
    (series, *_) = Canned().series(next(p for p in Dashboard.load().panels
                                        if p.title == "Reconciles"))
    assert series.label == "ok"
    assert dashboard_render._format(0.125, "s") == "125 ms"
    assert dashboard_render._format(2.5, "currencyUSD") == "$2.50"
