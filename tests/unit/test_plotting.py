"""PNG figures: they are written, are PNGs, are reproducible, and say how to get matplotlib."""

from __future__ import annotations

import dataclasses
import sys

import pytest

from trilemma.optimizer import plotting
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.plotting import Curve, ParetoPoint

pytest.importorskip("matplotlib")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
RATES = [0.5, 1, 2, 4, 6, 8]
CURVES = [
    Curve(label="fp8 TP2 eagle3x3", rates_rps=RATES, ttft_p90_ms=[90, 95, 110, 160, 300, 2400],
          tpot_p90_ms=[6, 6.5, 7.5, 9, 12, 18]),
    Curve(label="fp8 TP4", rates_rps=RATES, ttft_p90_ms=[70, 72, 80, 100, 140, 260],
          tpot_p90_ms=[7, 7.2, 7.8, 8.6, 9.8, 12]),
    Curve(label="bf16 TP8", rates_rps=RATES[:5], ttft_p90_ms=[120, 140, 200, 600, 9000],
          tpot_p90_ms=[9, 10, 12, 16, 25], baseline=True),
]
POINTS = [
    ParetoPoint(cost_per_hour=7.6, latency_ms=900, label="fp8 TP2", on_front=True),
    ParetoPoint(cost_per_hour=15.1, latency_ms=310, label="fp8 TP4", on_front=True,
                recommended=True),
    ParetoPoint(cost_per_hour=30.2, latency_ms=180, label="bf16 TP8 x2", on_front=True),
    ParetoPoint(cost_per_hour=20.0, latency_ms=700, label="int4 TP4"),
    ParetoPoint(cost_per_hour=30.2, latency_ms=650, label="naive bf16 TP8", baseline=True),
    ParetoPoint(cost_per_hour=24.0, latency_ms=800, label="best on a100_sxm: bf16 TP4",
                alternative=True, dominated=True),
    ParetoPoint(cost_per_hour=40.0, latency_ms=150, label="best on sglang: fp8 TP8",
                alternative=True),
]


def draw_both(tmp_path, name):
    rate = plotting.rate_latency_plot(CURVES, tmp_path / f"{name}-rate.png", title="rewriting",
                                      ttft_slo_ms=1000, tpot_slo_ms=15)
    pareto = plotting.pareto_plot(POINTS, tmp_path / f"{name}-pareto.png", title="front")
    return rate, pareto


def test_writes_non_trivial_png_files(tmp_path):
    for path in draw_both(tmp_path, "a"):
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC)
        assert len(data) > 20_000


def test_same_input_gives_the_same_bytes(tmp_path):
    first, second = draw_both(tmp_path, "a"), draw_both(tmp_path, "b")
    for a, b in zip(first, second, strict=True):
        assert a.read_bytes() == b.read_bytes()


def test_dominated_alternatives_are_drawn_differently(tmp_path):
    # Faded when the front dominates them: the flag must reach the picture.
    solid = [dataclasses.replace(p, dominated=False) for p in POINTS]
    a = plotting.pareto_plot(POINTS, tmp_path / "faded.png", title="front")
    b = plotting.pareto_plot(solid, tmp_path / "solid.png", title="front")
    assert a.read_bytes() != b.read_bytes()


def test_png_carries_no_software_or_date_metadata(tmp_path):
    for path in draw_both(tmp_path, "a"):
        data = path.read_bytes()
        assert b"matplotlib" not in data and b"Creation Time" not in data


def test_reports_the_missing_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(InputError, match=r"pip install 'trilemma\[plot\]'"):
        plotting.pareto_plot(POINTS, tmp_path / "p.png", title="t")
    with pytest.raises(InputError, match=r"\[plot\] extra"):
        plotting.rate_latency_plot(CURVES, tmp_path / "r.png", title="t")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("call", "match"), [
    (lambda p: plotting.rate_latency_plot([], p, title="t"), "at least one"),
    (lambda p: plotting.pareto_plot([], p, title="t"), "at least one"),
    (lambda p: plotting.rate_latency_plot(
        [Curve(label="x", rates_rps=[1, 2], ttft_p90_ms=[1], tpot_p90_ms=[1, 2])], p,
        title="t"), "same"),
    (lambda p: plotting.pareto_plot(
        [ParetoPoint(cost_per_hour=0, latency_ms=1, label="free")], p, title="t"), "positive"),
])
def test_rejects_bad_input(tmp_path, call, match):
    with pytest.raises(InputError, match=match):
        call(tmp_path / "x.png")
