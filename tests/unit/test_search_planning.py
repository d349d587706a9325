"""plan(): objectives, search quality against an exhaustive screen, determinism, infeasible
SLOs, bounds, disaggregation, confirmation and explanation."""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from trilemma.optimizer import search
from trilemma.optimizer.search import planning, ranking, screening, sizing, space
from trilemma.optimizer.search.configs import Mode, canonical_json
from trilemma.optimizer.spec import parse_spec

SMALL = Path(__file__).parent / "fixtures" / "cli" / "small.yaml"

# A space small enough to screen exhaustively: two quantizations, TP 1-2, four engine limits.
TINY = space.SearchSettings(tp=(1, 2), pp=(1,), dp=(1,), ep=(False,), spec_k=(2,),
                            max_num_seqs=(64, 256), max_num_batched_tokens=(4096, 8192),
                            pd_ratios=((1, 1), (1, 2)), simulate_top_k=0, simulate_front=0,
                            simulate_requests=0, front_size=200, explain_sensitivity=False,
                            workers=1)


def _raw(**changes: Any) -> dict[str, Any]:
    raw = yaml.safe_load(SMALL.read_text())
    for path, value in changes.items():
        node = raw
        *head, last = path.split(".")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = value
    return raw


def _request(**changes: Any):
    return parse_spec(copy.deepcopy(_raw(**changes)))


def _exhaustive(request):
    """Every candidate of the space screened the same way: no coarse pass, no dominance."""
    settings = space.SearchSettings(**{**TINY.__dict__, "prune_dominated": False})
    sp = space.enumerate_space(request, settings)
    wl = screening.WorkloadMeans.of(request)
    terms = screening.slo_terms(request)
    screens = [screening.screen_rows(r, request, wl, terms, request.bounds.allow_disaggregation)
               for r in sp.rows]
    cands, _ = sizing.size_all(screens, request, settings, wl, terms, Counter())
    return ranking.metrics(cands, wl)


def _latency(c, request) -> float:
    wl = screening.WorkloadMeans.of(request)
    return ranking.e2e_ms(c.prediction.ttft_p90_ms, c.prediction.tpot_p90_ms, wl)


@pytest.mark.parametrize("objective", ["min_cost", "max_throughput", "min_latency", "balanced"])
def test_recommendation_is_within_2_percent_of_the_exhaustive_optimum(objective: str) -> None:
    req = _request(objective=objective)
    m = _exhaustive(req)
    rec = planning.plan(req, settings=TINY).recommended
    cost, lat, cap = rec.prediction.cost_per_hour, _latency(rec, req), rec.prediction.capacity_rps
    if objective == "min_cost":
        assert cost <= m.cost.min() * 1.02
    elif objective == "max_throughput":
        assert cap >= m.capacity.max() * 0.98
    elif objective == "min_latency":
        assert lat <= m.latency.min() * 1.02
    else:
        d = ranking.knee_distance(np.append(m.cost, cost), np.append(m.latency, lat))
        assert d[-1] <= d[:-1].min() + 0.02


def test_every_exhaustive_pareto_point_has_a_returned_point_within_2_percent() -> None:
    req = _request()
    m = _exhaustive(req)
    exact = ranking.front(m, 10_000)
    p = planning.plan(req, settings=TINY)
    got = np.array([[c.prediction.cost_per_hour, _latency(c, req)] for c in p.front])
    for i in exact:
        rel = np.abs(got - [m.cost[i], m.latency[i]]) / [m.cost[i], m.latency[i]]
        assert (rel <= 0.02).all(1).any(), (m.cost[i], m.latency[i])


def test_same_spec_and_seed_give_byte_identical_plans() -> None:
    settings = space.SearchSettings(**{**TINY.__dict__, "simulate_top_k": 2,
                                       "simulate_front": 1, "simulate_requests": 150,
                                       "explain_sensitivity": True})
    a = planning.plan(_request(), settings=settings, seed=3)
    b = planning.plan(_request(), settings=settings, seed=3)
    assert canonical_json(a.to_dict()) == canonical_json(b.to_dict())
    assert "timings" not in a.to_dict() and "total" in a.to_dict(timings=True)["timings"]


def test_an_slo_nothing_meets_raises_infeasible_slo_naming_the_term_and_nearest_configs() -> None:
    req = _request(**{"slo.tpotMs": {"p90": 0.5}})
    with pytest.raises(search.InfeasibleSLO) as info:
        planning.plan(req, settings=TINY)
    err = info.value
    assert err.field == "slo"
    assert "tpot p90 <= 0.5 ms" in str(err)
    assert err.nearest and all("vs 0.5 ms target" in line for line in err.nearest)
    assert "TP" in err.nearest[0]


def test_budget_and_quality_floor_are_respected() -> None:
    free = planning.plan(_request(objective="min_latency"), settings=TINY)
    budget = free.recommended.prediction.cost_per_hour * 0.6
    req = _request(objective="min_latency", **{
        "slo.maxCostPerHour": budget, "slo.qualityFloor": 60.0,
        "model.quality": {"score": 60.2, "source": "test"}})
    p = planning.plan(req, settings=TINY)
    for c in [p.recommended, *p.front]:
        assert c.prediction.cost_per_hour <= budget
        assert c.prediction.quality is not None and c.prediction.quality >= 60.0
    assert p.counts.pruned["quality"] > 0
    assert p.recommended.prediction.cost_per_hour < free.recommended.prediction.cost_per_hour


@pytest.mark.parametrize("allow", [True, False])
def test_disaggregated_candidates_present_when_allowed_and_absent_when_not(allow: bool) -> None:
    req = _request(**{"bounds.allowDisaggregation": allow})
    s = planning.search(req, TINY, lambda _p, _f: None, {})
    assert bool((s.candidates.mode > 0).any()) is allow
    if not allow:
        p = planning.plan(req, settings=TINY)
        assert all(c.config.mode is Mode.AGGREGATED for c in [p.recommended, *p.front])


def test_explanation_names_the_binding_constraint_with_numbers_and_runners_up() -> None:
    settings = space.SearchSettings(**{**TINY.__dict__, "explain_sensitivity": True})
    p = planning.plan(_request(), settings=settings)
    e = p.explanation
    assert e.binding.startswith("closest to binding: ") and "%" in e.binding
    assert e.limits[0].ratio == max(x.ratio for x in e.limits)
    assert 1 <= len(e.runners_up) <= 3 and all("$" in s for s in e.runners_up)
    assert [s.name for s in e.sensitivity] == ["rate x2", "prompt x2"]
    doubled = e.sensitivity[0]
    assert doubled.cost_per_hour is None or doubled.cost_per_hour >= \
        p.recommended.prediction.cost_per_hour


def test_each_objective_picks_the_extreme_of_its_axis_among_returned_points() -> None:
    picks = {o: planning.plan(_request(objective=o), settings=TINY)
             for o in ("min_cost", "max_throughput", "min_latency")}
    for o, p in picks.items():
        pts = [p.recommended, *p.front]
        if o == "min_cost":
            assert p.recommended.prediction.cost_per_hour == min(
                c.prediction.cost_per_hour for c in pts)
        elif o == "max_throughput":
            assert p.recommended.prediction.capacity_rps >= max(
                c.prediction.capacity_rps for c in pts) * 0.999
        else:
            req = _request()
            assert _latency(p.recommended, req) <= min(_latency(c, req) for c in pts) + 1e-6
    assert picks["min_cost"].recommended.prediction.cost_per_hour < \
        picks["min_latency"].recommended.prediction.cost_per_hour


def test_confirming_replaces_percentiles_with_simulated_ones() -> None:
    settings = space.SearchSettings(**{**TINY.__dict__, "simulate_top_k": 2,
                                       "simulate_front": 0, "simulate_requests": 300})
    p = planning.plan(_request(), settings=settings, seed=1)
    assert p.counts.simulated >= 1
    assert p.recommended.prediction.simulated
    assert p.recommended.prediction.provenance["latency"].startswith("simulated")


def test_counts_add_up_and_progress_is_reported() -> None:
    seen: list[str] = []
    p = planning.plan(_request(), settings=TINY, progress=lambda ph, _f: seen.append(ph))
    assert seen[0] == "enumerate" and seen[-1] == "done"
    assert p.counts.enumerated > p.counts.screened >= p.counts.feasible > 0


def test_public_names_are_pinned() -> None:
    assert sorted(search.__all__) == [
        "Choice", "Counts", "Explanation", "InfeasibleSLO", "Limit", "MalformedPlan", "Mode",
        "Part", "Plan", "Predicted", "Prediction", "RequestDigest", "Scenario", "SearchSettings",
        "Sense", "ServingConfig", "WorkerConfig", "WorkloadDigest", "canonical_json",
        "pareto_front", "plan", "predict"]


def test_max_replicas_bounds_every_returned_deployment(tmp_path):
    from pathlib import Path as _P

    from trilemma.optimizer import search as _search
    from trilemma.optimizer.spec import load_spec as _load

    src = _P(__file__).parent / "fixtures" / "cli" / "small.yaml"
    path = tmp_path / "capped.yaml"
    path.write_text(src.read_text().replace("allowDisaggregation: false",
                                            "allowDisaggregation: false\n  maxReplicas: 1"))
    result = _search.plan(_load(path))
    for choice in [result.recommended, *result.front]:
        assert choice.config.replicas + choice.config.prefill_replicas <= 1
    assert result.counts.pruned["replicas"] > 0
