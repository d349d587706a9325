"""User-facing specs: the strict pydantic models of what `trilemma optimize` reads.

A spec says which model(s) to serve, the workload, the SLOs, the hardware pool, the objective
and the search bounds. Sits just above the catalogs (it checks GPU keys, model ids and
quantization names against them) and below everything that plans: search reads a validated
PlanRequest. The same models will generate the operator's CRD schemas (spec_json_schema).

The names below are the supported API; tests/unit/test_spec_api.py pins the list.
"""

from trilemma.optimizer.spec.arrivals import (
    Arrivals,
    GammaArrivals,
    PoissonArrivals,
    Trace,
    TraceArrivals,
    load_trace,
)
from trilemma.optimizer.spec.base import SpecModel, rule_error
from trilemma.optimizer.spec.hardware import (
    GpuGroup,
    HardwarePool,
    TaintEffect,
    Toleration,
    TolerationOperator,
)
from trilemma.optimizer.spec.lengths import (
    MAX_P90_OVER_MEAN,
    FixedLengths,
    HistogramLengths,
    LengthDistribution,
    LognormalLengths,
)
from trilemma.optimizer.spec.loading import (
    SpecError,
    describe,
    load_spec,
    parse_spec,
    spec_error_to_input_error,
)
from trilemma.optimizer.spec.models import (
    ModelChoice,
    QualityScore,
    base_quality,
    quality,
    quality_table,
)
from trilemma.optimizer.spec.objective import Engine, Objective, SearchBounds
from trilemma.optimizer.spec.plan_request import API_VERSION, KIND, PlanRequest
from trilemma.optimizer.spec.schema import spec_json_schema
from trilemma.optimizer.spec.slo import LatencyTarget, Slo
from trilemma.optimizer.spec.workload import PrefixReuse, RequestSample, Workload

__all__ = [
    "API_VERSION",
    "KIND",
    "MAX_P90_OVER_MEAN",
    "Arrivals",
    "Engine",
    "FixedLengths",
    "GammaArrivals",
    "GpuGroup",
    "HardwarePool",
    "HistogramLengths",
    "LatencyTarget",
    "LengthDistribution",
    "LognormalLengths",
    "ModelChoice",
    "Objective",
    "PlanRequest",
    "PoissonArrivals",
    "PrefixReuse",
    "QualityScore",
    "RequestSample",
    "SearchBounds",
    "Slo",
    "SpecError",
    "SpecModel",
    "TaintEffect",
    "Toleration",
    "TolerationOperator",
    "Trace",
    "TraceArrivals",
    "Workload",
    "base_quality",
    "describe",
    "load_spec",
    "load_trace",
    "parse_spec",
    "quality",
    "quality_table",
    "rule_error",
    "spec_error_to_input_error",
    "spec_json_schema",
]
