"""The chart's Grafana dashboard as typed objects: its panels, their PromQL, its variables.

Read by the dashboard's tests (tests/unit/test_dashboard.py: layout, data sources, every metric
a query names is one that something exports) and by the renderer
(trilemma.tools.dashboard_render), which evaluates the same queries against a real Prometheus.
Only what those two need is modelled; the JSON file stays the source of truth.

`metric_names` is a small PromQL tokenizer, not a parser: it drops strings, label matchers,
range and offset durations, and by/without/on/ignoring groupings, then keeps the identifiers
that are not function calls or keywords. That is enough for the dashboard's expressions, whose
syntax promtool checks separately.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The chart's dashboard, from a source checkout (the chart is not installed with the package).
DASHBOARD = (Path(__file__).resolve().parents[1] / "charts" / "trilemma" / "dashboards"
             / "trilemma-endpoint.json")
DATASOURCE_VARIABLE = "datasource"

_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_TOKEN = re.compile(r"(?P<number>\d[\w.]*)|(?P<name>[A-Za-z_:][\w:]*)(?P<call>\s*\()?")
# Binary operators spelled as words, modifiers, and the float literals PromQL accepts.
_KEYWORDS = frozenset({"and", "or", "unless", "atan2", "offset", "bool", "by", "without", "on",
                       "ignoring", "group_left", "group_right", "inf", "nan"})
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(?P<selector>.*?)\s*,\s*\w+\s*\)\s*$")


@dataclass(frozen=True)
class Grid:
    """A panel's place on Grafana's 24-column grid (units: columns, rows of 30 px)."""

    x: int
    y: int
    w: int
    h: int

    def overlaps(self, other: Grid) -> bool:
        return (self.x < other.x + other.w and other.x < self.x + self.w
                and self.y < other.y + other.h and other.y < self.y + self.h)


@dataclass(frozen=True)
class Target:
    ref: str
    expr: str
    legend: str


@dataclass(frozen=True)
class Panel:
    id: int
    type: str
    title: str
    grid: Grid
    unit: str
    targets: tuple[Target, ...]
    dashed: frozenset[str]  # legends drawn dashed: the predictions beside the observations


@dataclass(frozen=True)
class Annotation:
    name: str
    expr: str
    title_format: str
    text_format: str


@dataclass(frozen=True)
class Dashboard:
    title: str
    schema_version: int
    panels: tuple[Panel, ...]
    annotations: tuple[Annotation, ...]
    variable_queries: Mapping[str, str]  # query variables: name -> label_values(...)
    datasources: tuple[tuple[str, Any], ...]  # (where, the datasource field as written)

    @classmethod
    def load(cls, path: Path = DASHBOARD) -> Dashboard:
        return cls.of(json.loads(path.read_text()))

    @classmethod
    def of(cls, doc: Mapping[str, Any]) -> Dashboard:
        sources: list[tuple[str, Any]] = []
        panels = tuple(_panel(p, sources) for p in doc["panels"])
        annotations = []
        for a in doc.get("annotations", {}).get("list", []):
            sources.append((f"annotation {a['name']!r}", a.get("datasource")))
            annotations.append(Annotation(name=a["name"], expr=a["expr"],
                                          title_format=a.get("titleFormat", ""),
                                          text_format=a.get("textFormat", "")))
        queries: dict[str, str] = {}
        for v in doc.get("templating", {}).get("list", []):
            if v["type"] == "query":
                sources.append((f"variable {v['name']!r}", v.get("datasource")))
                query = v["query"]
                queries[v["name"]] = query["query"] if isinstance(query, dict) else query
        return cls(title=doc["title"], schema_version=int(doc["schemaVersion"]), panels=panels,
                   annotations=tuple(annotations), variable_queries=queries,
                   datasources=tuple(sources))

    def expressions(self) -> list[tuple[str, str]]:
        """(where, PromQL) for every query the dashboard runs, variables' included."""
        out = [(f"panel {p.id} {p.title!r} {t.ref}", t.expr)
               for p in self.panels for t in p.targets]
        out += [(f"annotation {a.name!r}", a.expr) for a in self.annotations]
        for name, query in self.variable_queries.items():
            match = _LABEL_VALUES.match(query)
            out.append((f"variable {name!r}", match["selector"] if match else query))
        return out


def _panel(doc: Mapping[str, Any], sources: list[tuple[str, Any]]) -> Panel:
    where = f"panel {doc['id']} {doc.get('title', '')!r}"
    if doc["type"] != "row":
        sources.append((where, doc.get("datasource")))
    targets = []
    for t in doc.get("targets", []):
        sources.append((f"{where} {t['refId']}", t.get("datasource")))
        targets.append(Target(ref=t["refId"], expr=t["expr"], legend=t.get("legendFormat", "")))
    field_config = doc.get("fieldConfig", {})
    dashed = frozenset(
        o["matcher"]["options"] for o in field_config.get("overrides", [])
        if any(p["id"] == "custom.lineStyle" for p in o.get("properties", [])))
    grid = doc["gridPos"]
    return Panel(id=int(doc["id"]), type=doc["type"], title=doc.get("title", ""),
                 grid=Grid(grid["x"], grid["y"], grid["w"], grid["h"]),
                 unit=field_config.get("defaults", {}).get("unit", ""),
                 targets=tuple(targets), dashed=dashed)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (see the module's note on its limits)."""
    text = _VARIABLE.sub("", _STRING.sub('""', expr))
    text = _RANGE.sub("", _MATCHERS.sub("", text))
    while True:  # nested groupings cannot occur, but a grouping may follow a removed one
        stripped = _GROUPING.sub("", text)
        if stripped == text:
            break
        text = stripped
    return {m["name"] for m in _TOKEN.finditer(text)
            if m["name"] and not m["call"] and m["name"] not in _KEYWORDS}


def expand(expr: str, variables: Mapping[str, str]) -> str:
    """`expr` with Grafana's $name and ${name} replaced from `variables` (KeyError if unset)."""
    return _VARIABLE.sub(lambda m: variables[m[1] or m[2]], expr)
