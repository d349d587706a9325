"""Plan.from_dict: a stored plan decodes back to the plan that wrote it, byte for byte, and
stored data that is not a plan fails with MalformedPlan naming the field."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from trilemma.optimizer.search import (
    Choice,
    Counts,
    Explanation,
    MalformedPlan,
    Plan,
    Prediction,
    ServingConfig,
    canonical_json,
    plan,
    space,
)
from trilemma.optimizer.spec import parse_spec

FIXTURES = Path(__file__).parent / "fixtures"
EXAMPLES = Path(__file__).parents[2] / "examples"
SETTINGS = space.SearchSettings(tp=(1, 2), pp=(1,), dp=(1,), ep=(False,), spec_k=(2,),
                                max_num_seqs=(64, 256), max_num_batched_tokens=(4096, 8192),
                                pd_ratios=((1, 1),), simulate_top_k=1, simulate_front=1,
                                simulate_requests=200, front_size=8, explain_sensitivity=True,
                                workers=1)


def _small(**bounds: Any) -> Any:
    raw = yaml.safe_load((FIXTURES / "cli" / "small.yaml").read_text())
    raw.setdefault("bounds", {}).update(bounds)
    return parse_spec(raw)


@pytest.fixture(scope="module",
                params=["small", "small-disaggregated", "chatbot", "code-completion"])
def real_plan(request: pytest.FixtureRequest) -> Plan:
    if not request.param.startswith("small"):
        spec = parse_spec(yaml.safe_load((EXAMPLES / f"{request.param}.yaml").read_text()))
        return plan(spec, settings=space.SearchSettings(
            workers=1, simulate_requests=200, simulate_top_k=1, simulate_front=1))
    return plan(_small(allowDisaggregation=request.param.endswith("disaggregated")),
                settings=SETTINGS)


def test_a_plan_round_trips_byte_identically(real_plan: Plan) -> None:
    data = real_plan.to_dict()
    again = Plan.from_dict(data)
    assert canonical_json(again.to_dict()) == canonical_json(data)
    # Decoded once, it stays fixed: decoding its own output changes nothing either.
    assert Plan.from_dict(again.to_dict()) == again
    assert again.recommended.config == real_plan.recommended.config
    assert isinstance(again.counts, Counts) and isinstance(again.explanation, Explanation)


def test_timings_round_trip_when_written(real_plan: Plan) -> None:
    data = real_plan.to_dict(timings=True)
    assert canonical_json(Plan.from_dict(data).to_dict(timings=True)) == canonical_json(data)


def test_parts_decode_on_their_own(real_plan: Plan) -> None:
    rec = real_plan.recommended.to_dict()
    assert Choice.from_dict(rec).to_dict() == rec
    assert Prediction.from_dict(rec["prediction"]).to_dict() == rec["prediction"]
    assert ServingConfig.from_dict(rec["config"]) == real_plan.recommended.config


def _broken(data: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(data)
    node: Any = out
    *head, last = path.split(".")
    for key in head:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return out


_DELETE = object()


@pytest.mark.parametrize(("path", "value", "field", "why"), [
    ("recommended.config.worker.tp", "2", "recommended.config.worker.tp", "expected int"),
    ("front.0.prediction.ttft_p90_ms", _DELETE, "front.0.prediction.ttft_p90_ms", "missing"),
    ("recommended.config.mode", "sideways", "recommended.config.mode", "not a Mode"),
    ("recommended.hash", "00000000", "recommended.hash", "not the configuration's hash"),
    ("counts.pruned", [1], "counts.pruned", "expected an object"),
    ("explanation.limits", {}, "explanation.limits", "expected an array"),
    ("objective", "cheapest", "objective", "not a Objective"),
    ("recommended.config.worker.tensor_parallel", 2,
     "recommended.config.worker.tensor_parallel", "unknown field"),
])
def test_a_malformed_plan_names_the_field(real_plan: Plan, path: str, value: Any, field: str,
                                          why: str) -> None:
    with pytest.raises(MalformedPlan) as err:
        Plan.from_dict(_broken(real_plan.to_dict(), path, value))
    assert err.value.field == field and err.value.why.startswith(why)


def test_not_an_object_at_all_is_malformed() -> None:
    with pytest.raises(MalformedPlan, match="expected an object"):
        Plan.from_dict(["not", "a", "plan"])  # type: ignore[arg-type]
