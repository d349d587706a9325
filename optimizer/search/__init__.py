"""Search: enumerate serving configurations, screen them analytically, confirm the frontier
with the simulator, and return a Pareto front with an explained recommendation."""

from trilemma.optimizer.search.configs import (
    Choice,
    Mode,
    Part,
    Prediction,
    ServingConfig,
    WorkerConfig,
    canonical_json,
)
from trilemma.optimizer.search.decoding import MalformedPlan
from trilemma.optimizer.search.explaining import Explanation, InfeasibleSLO, Limit, Scenario
from trilemma.optimizer.search.pareto import Sense, pareto_front
from trilemma.optimizer.search.planning import Counts, Plan, RequestDigest, WorkloadDigest, plan
from trilemma.optimizer.search.predicting import Predicted, predict
from trilemma.optimizer.search.space import SearchSettings

__all__ = [
    "Choice",
    "Counts",
    "Explanation",
    "InfeasibleSLO",
    "Limit",
    "MalformedPlan",
    "Mode",
    "Part",
    "Plan",
    "Predicted",
    "Prediction",
    "RequestDigest",
    "Scenario",
    "SearchSettings",
    "Sense",
    "ServingConfig",
    "WorkerConfig",
    "WorkloadDigest",
    "canonical_json",
    "pareto_front",
    "plan",
    "predict",
]
