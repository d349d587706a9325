"""The OptimizedEndpoint's status: phase, conditions, the active configuration, its rollout.

Split from resources.py (the specs) so each stays small; resources.py re-exports these names,
so the status is still declared in one place and read from one module by most callers.
`Endpoint.put` validates every write against `OptimizedEndpointStatus`; crdgen.py generates the
status schema from it.
"""

from __future__ import annotations

import enum

from pydantic import Field

from trilemma.operator.status_models import (
    MAX_HISTORY,
    CalibrationStatus,
    ObservedWorkloadStatus,
    RetuneHistoryEntry,
    RetuneStatus,
)
from trilemma.optimizer.spec import SpecModel, Workload


class EndpointPhase(enum.StrEnum):
    PENDING = "Pending"
    OPTIMIZING = "Optimizing"
    DEPLOYING = "Deploying"
    READY = "Ready"
    INFEASIBLE = "Infeasible"
    FAILED = "Failed"


class ConditionType(enum.StrEnum):
    VALIDATED = "Validated"
    OPTIMIZED = "Optimized"
    DEPLOYED = "Deployed"
    READY = "Ready"
    METRICS_AVAILABLE = "MetricsAvailable"
    # kstatus's "abnormal-true" pair, derived from the rest of status (operator/health.py):
    # True while the operator works towards the spec, True when it cannot get there alone.
    RECONCILING = "Reconciling"
    STALLED = "Stalled"


class Condition(SpecModel):
    type: ConditionType
    status: str = Field(pattern=r"^(True|False|Unknown)$")
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", max_length=1024)
    message: str = Field(default="", max_length=32768)
    last_transition_time: str = Field(description="RFC 3339 time of the last status change.")
    observed_generation: int | None = Field(default=None, ge=0)


class Predictions(SpecModel):
    ttft_p90_ms: float
    tpot_p90_ms: float
    capacity_rps: float = Field(description="Requests/s the deployment sustains in the SLO.")
    cost_per_hour: float
    cost_per_million_tokens: float
    quality: float | None = None
    simulated: bool = False


class FrontPoint(SpecModel):
    hash: str
    summary: str
    ttft_p90_ms: float
    tpot_p90_ms: float
    capacity_rps: float
    cost_per_hour: float
    recommended: bool = False


class ActiveConfiguration(SpecModel):
    hash: str = Field(description="Hash of the configuration (names its Deployment).")
    summary: str = Field(description='Short form, e.g. "2x [fp8 TP2 eagle3x3] on h100_sxm".')
    short: str = Field(description='Printer column form, e.g. "fp8 TP2 eagle3x3".')
    model: str
    engine: str
    gpu: str
    gpus: int = Field(ge=0, description="GPUs the configuration holds in the pool.")
    gpus_by_type: dict[str, int] | None = Field(
        default=None, description="A configuration spanning GPU types (a mixed plan, or "
        "prefill on another type than decode): the GPUs it holds of each type; `gpu` is its "
        "(decode) worker's type.")
    replicas: int = Field(ge=0)
    engine_args: list[str] = Field(default_factory=list)
    applied: bool = Field(description="false: recommended only (autoApply false).")


class Optimization(SpecModel):
    time: str = Field(description="RFC 3339 time the plan was made.")
    duration_seconds: float = Field(ge=0)
    candidates: int = Field(ge=0, description="Configurations enumerated.")
    request_digest: str = Field(description="Hash of the planning input (spec + pool).")
    reused: bool = Field(default=False,
                         description="true: an earlier plan for the same input was reused.")


class RolloutState(enum.StrEnum):
    PROGRESSING = "Progressing"
    COMPLETE = "Complete"
    FAILED = "Failed"


class RolloutStatus(SpecModel):
    """The move of the Service from one configuration hash to another."""

    from_hash: str | None = Field(default=None, description="Hash serving before.")
    to_hash: str = Field(description="Hash being rolled out.")
    state: RolloutState
    started: str = Field(description="RFC 3339 time the new configuration was created.")
    deadline: str = Field(description="RFC 3339 time after which it counts as failed.")
    message: str = ""
    from_gpus: dict[str, int] = Field(
        default_factory=dict,
        description="GPUs the configuration serving before holds, by type, until it is gone "
                    "(what a rollback keeps allocated).")


class TunedWorkload(SpecModel):
    """The observed workload the active plan was re-planned for (the closed loop's)."""

    spec_digest: str = Field(description="Digest of the spec it applies to: a spec change "
                                         "drops it (the user's word is newer).")
    workload: Workload = Field(description="The workload planned for, in the spec's form.")


# Recommendations autoscale.py keeps (the schema's bound): an hour of checks every 2 minutes,
# enough for the longest stabilization window the spec allows at the default resync.
MAX_RECOMMENDATIONS = 32


class ScaleRecommendation(SpecModel):
    """One check of the operator-owned scaler: the count the observed rate asked for."""

    time: str = Field(description="RFC 3339 time of the check.")
    replicas: int = Field(ge=0)


class ScalingStatus(SpecModel):
    """The replica count deployed, who decided it, and what one replica carries."""

    owner: str = Field(description="spec.replicas.owner the count follows.")
    replicas: int = Field(ge=0, description="Replicas of the configuration deployed.")
    layout_hash: str = Field(description="Configuration hash the count applies to.")
    replica_capacity_rps: float = Field(
        ge=0, description="Requests/s one replica sustains within the SLO (the plan's): what a "
                          "KEDA or HPA target divides the rate by.")
    min_replicas: int | None = Field(default=None, ge=0)
    max_replicas: int | None = Field(
        default=None, ge=0, description="The most the spec and the pool's room allow now.")
    spec_count: int | None = Field(
        default=None, ge=0, description="owner external: the spec.replicas.count the deployed "
                                        "count was derived from.")
    desired_replicas: int | None = Field(
        default=None, ge=0, description="owner operator: the scaler's stabilized count.")
    observed_rps: float | None = Field(default=None, ge=0,
                                       description="owner operator: the rate it last read.")
    recommendations: list[ScaleRecommendation] = Field(
        default_factory=list, max_length=MAX_RECOMMENDATIONS,
        description="owner operator: the counts recent checks asked for, oldest first.")
    last_scale_time: str | None = Field(default=None,
                                        description="RFC 3339 time the count last changed.")
    message: str = Field(default="", max_length=1024,
                         description="Why this count (the reconciler's).")
    held_back_beside: str | None = Field(
        default=None, description="The configuration hash the count was held back beside: "
        "a rollout runs the new configuration next to the serving one, so it starts with what "
        "fits there and grows once that one is gone.")
    reading: str = Field(default="", max_length=1024,
                         description="owner operator: what the scaler's last check read, or "
                                     "why it could not.")


class OptimizedEndpointStatus(SpecModel):
    phase: EndpointPhase = EndpointPhase.PENDING
    message: str = ""
    observed_generation: int | None = Field(
        default=None, ge=0,
        description="metadata.generation the operator last acted on (planned, or refused): "
                    "kstatus and GitOps tools wait while it is behind.")
    conditions: list[Condition] = Field(default_factory=list)
    active_configuration: ActiveConfiguration | None = None
    predictions: Predictions | None = None
    pareto_front: list[FrontPoint] = Field(default_factory=list, max_length=8)
    last_optimization: Optimization | None = None
    cost_per_hour: float | None = Field(default=None, description="Of the active plan, $/hour.")
    serving_hash: str | None = Field(
        default=None, description="Configuration hash the Service sends traffic to.")
    rollout: RolloutStatus | None = None
    allocated_gpus: dict[str, int] = Field(
        default_factory=dict,
        description="GPUs this endpoint's children hold, by type (both sides during a rollout).")
    spec_digest: str | None = Field(
        default=None, description="Digest of the spec the status describes (written last).")
    observed_workload: ObservedWorkloadStatus | None = Field(
        default=None, description="The traffic Prometheus shows (rate, lengths, prefix share, "
                                  "latencies), each with its sample count and staleness.")
    tuned_workload: TunedWorkload | None = Field(
        default=None, description="The observed workload the active plan was re-planned for, "
                                  "and the spec digest it applies to (a spec change drops it).")
    retune: RetuneStatus | None = Field(
        default=None, description="The re-tune loop's state: checks, drift counts, cooldown.")
    retune_history: list[RetuneHistoryEntry] = Field(
        default_factory=list, max_length=MAX_HISTORY,
        description="The last 10 re-tune decisions, no-change ones included, and why.")
    replicas: int | None = Field(
        default=None, ge=0, description="The scale subresource's status.replicas: replicas of "
                                        "the serving configuration.")
    selector: str | None = Field(
        default=None, description="The scale subresource's label selector: the serving pods.")
    scaling: ScalingStatus | None = Field(
        default=None, description="The replica count, its owner and per-replica capacity.")
    calibration: CalibrationStatus | None = Field(
        default=None, description="Correction factors fitted from predicted vs observed "
                                  "latency of the active configuration.")


def status_field_names() -> list[str]:
    """The status keys the operator owns (camelCase), so that patches can clear stale ones."""
    return [f.alias or name for name, f in OptimizedEndpointStatus.model_fields.items()]
