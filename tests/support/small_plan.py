"""The small planning request of tests/unit/fixtures/cli/small.yaml and a search space small
enough to plan it in a second: shared by the closed loop's unit tests."""

from __future__ import annotations

import copy
from pathlib import Path

import yaml

from trilemma.optimizer.search import space
from trilemma.optimizer.spec import PlanRequest, parse_spec

SMALL = Path(__file__).parents[1] / "unit" / "fixtures" / "cli" / "small.yaml"
SETTINGS = space.SearchSettings(tp=(1, 2), pp=(1,), dp=(1,), ep=(False,), spec_k=(2,),
                                max_num_seqs=(64, 256), max_num_batched_tokens=(4096, 8192),
                                pd_ratios=((1, 1),), simulate_top_k=1, simulate_front=0,
                                simulate_requests=300, front_size=8,
                                explain_sensitivity=False, workers=1)


def small_request(rate: float = 4.0, **workload: object) -> PlanRequest:
    raw = copy.deepcopy(yaml.safe_load(SMALL.read_text()))
    raw["workload"]["arrivals"]["requestsPerSecond"] = rate
    raw["workload"].update(workload)
    return parse_spec(raw)
