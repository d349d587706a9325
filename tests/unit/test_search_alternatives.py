"""Alternatives: the best plan on each GPU type and engine beside the front, in the plan, its
JSON (old plans without them still decode), the optimize table and the coarse screen."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from trilemma.operator import children
from trilemma.optimizer import cli
from trilemma.optimizer.search import (
    Plan,
    canonical_json,
    planning,
    ranking,
    screening,
    sizing,
    space,
)
from trilemma.optimizer.search.alternatives import By
from trilemma.optimizer.spec import load_spec

FIXTURES = Path(__file__).parent / "fixtures" / "cli"
TWO = FIXTURES / "two-gpus.yaml"
SETTINGS = space.SearchSettings(max_num_seqs=(64, 256), max_num_batched_tokens=(4096, 8192),
                                simulate_top_k=2, simulate_front=1, simulate_requests=200,
                                explain_sensitivity=False, workers=1)


@pytest.fixture(scope="module")
def two() -> Plan:
    return planning.plan(load_spec(TWO), settings=SETTINGS)


def test_one_dominating_gpu_type_still_shows_the_others(two: Plan) -> None:
    # The cheap H100s win on both axes: the front holds nothing else.
    assert {c.config.worker.gpu for c in two.front} == {"h100_sxm"}
    alts = {(a.by, a.value): a for a in two.alternatives}
    assert set(alts) == {(By.GPU, "h100_sxm"), (By.GPU, "l40s"),
                         (By.ENGINE, "sglang"), (By.ENGINE, "vllm")}
    l40s = alts[By.GPU, "l40s"]
    assert l40s.choice.config.worker.gpu == "l40s" and l40s.dominated
    assert l40s.cost_ratio == pytest.approx(
        l40s.choice.prediction.cost_per_hour / two.recommended.prediction.cost_per_hour)
    assert alts[By.ENGINE, "sglang"].choice.config.engine.value == "sglang"
    assert alts[By.GPU, "h100_sxm"].choice == two.recommended
    assert alts[By.GPU, "h100_sxm"].cost_ratio == 1.0 and not alts[By.GPU, "h100_sxm"].dominated


def test_each_alternative_is_the_cheapest_meeting_the_slo_on_its_kind(two: Plan) -> None:
    """Against an exhaustive screen: min_cost on l40s is the cheapest l40s candidate."""
    req = load_spec(TWO)
    settings = space.SearchSettings(**{**SETTINGS.__dict__, "prune_dominated": False})
    sp = space.enumerate_space(req, settings)
    wl = screening.WorkloadMeans.of(req)
    terms = screening.slo_terms(req)
    screens = [screening.screen_rows(r, req, wl, terms, False) for r in sp.rows]
    cands, _ = sizing.size_all(screens, req, settings, wl, terms, Counter())
    gpu = np.array([rs.rows.group.gpu.key for rs in screens])[cands.screen.astype(int)]
    m = ranking.metrics(cands, wl)
    for a in two.alternatives:
        if a.by is By.GPU:
            assert a.choice.prediction.cost_per_hour <= m.cost[gpu == a.value].min() * 1.02


def test_json_carries_alternatives_and_round_trips_byte_identically(two: Plan) -> None:
    data = two.to_dict()
    assert [a["value"] for a in data["alternatives"]] == ["h100_sxm", "l40s", "sglang", "vllm"]
    assert {"by", "value", "choice", "cost_ratio", "latency_ratio", "dominated"} \
        <= set(data["alternatives"][1])
    again = Plan.from_dict(json.loads(canonical_json(data)))
    assert canonical_json(again.to_dict()) == canonical_json(data)
    assert again.alternatives[1].by is By.GPU and again == Plan.from_dict(again.to_dict())


def test_a_plan_stored_before_alternatives_decodes_and_keeps_its_bytes(two: Plan) -> None:
    old = {k: v for k, v in two.to_dict().items() if k != "alternatives"}
    decoded = Plan.from_dict(old)
    assert decoded.alternatives == []
    assert canonical_json(decoded.to_dict()) == canonical_json(old)
    cm = {"data": {children.PLAN_KEY: canonical_json(old)}}
    stored = children.stored_plan(cm)
    assert stored is not None and stored.recommended.config == two.recommended.config


def test_one_gpu_type_and_one_engine_have_no_alternatives() -> None:
    p = planning.plan(load_spec(FIXTURES / "small.yaml"), settings=SETTINGS)
    assert p.alternatives == [] and "alternatives" not in p.to_dict()


def test_the_coarse_screen_keeps_every_gpu_type_and_engine(monkeypatch) -> None:
    # With the global cut at its tightest, one layout survives it: each GPU type and engine
    # must still reach the full screen, or their alternatives vanish.
    monkeypatch.setattr(screening, "COARSE_KEEP_FACTOR", 1.0)
    monkeypatch.setattr(screening, "COARSE_KEEP_FASTEST", 0)
    monkeypatch.setattr(screening, "COARSE_KEEP_DEPLOY_FACTOR", 1.0)
    req = load_spec(TWO)
    screens, dropped, _ = screening.screen_space(space.enumerate_space(req, SETTINGS), req,
                                                 SETTINGS)
    assert dropped > 0
    assert {rs.rows.group.gpu.key for rs in screens} == {"l40s", "h100_sxm"}
    assert {rs.rows.group.engine.value for rs in screens} == {"vllm", "sglang"}


def test_optimize_table_and_json_show_alternatives(capsys) -> None:
    assert cli.main(["optimize", str(TWO)]) == 0
    out = capsys.readouterr().out
    assert "best meeting the SLO on each GPU type / engine" in out
    assert "gpu l40s: " in out and "x the cost" in out and "dominated by the front" in out
    assert cli.main(["optimize", str(TWO), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert {a["value"] for a in doc["alternatives"]} == {"h100_sxm", "l40s", "sglang", "vllm"}
