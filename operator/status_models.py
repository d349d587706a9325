"""The closed loop's status fields: `observedWorkload`, `retune`, `retuneHistory`, `calibration`.

Models, not free-form maps, so that the CRD generated from them (crdgen.py) declares every key
the loop writes: the API server prunes what the schema does not name, so a write that drifted
from the schema would be dropped silently. The encoders (estimator, retune, retune_history,
calibration) build these models and their decoders read them; `Endpoint.put` validates a write
against them, so a misspelled key fails at its writer.

Optional figures default to None and are left out of the wire form (`to_wire`), and fields are
declared in the order the wire form lists them: what the encoders wrote before these models
existed round-trips unchanged.
"""

from __future__ import annotations

import enum
from typing import Annotated

from pydantic import Field

from trilemma.optimizer.spec import SpecModel

Time = Annotated[str, Field(description="RFC 3339 time, to the second.")]
Count = Annotated[int, Field(ge=0)]
# Failure records `retune.record_failure` keeps (retune.Policy.max_failed; the schema's bound).
MAX_FAILED = 5
# Entries `retune_history.append` keeps (its `keep` default; the schema's bound).
MAX_HISTORY = 10


# ---- observedWorkload ---------------------------------------------------------------------


class LengthFigures(SpecModel):
    """Tokens per request: the mean is exact, quantiles are read from histogram buckets."""

    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p99: float | None = None


class LatencyFigures(SpecModel):
    """Milliseconds, read from histogram buckets."""

    p50: float | None = None
    p90: float | None = None
    p99: float | None = None


class ObservedWorkloadStatus(SpecModel):
    """What the endpoint served over the query window (4 significant digits, unknowns out)."""

    window_seconds: Count = Field(description="The queries' window.")
    observed_at: Time = Field(description="The queries' evaluation time.")
    samples: Count = Field(description="Requests finished in the window.")
    rate_rps: float | None = Field(default=None, description="Requests/s.")
    prefix_hit_share: float | None = Field(
        default=None, description="Prompt tokens served from the prefix cache, 0-1.")
    burstiness_cv: float | None = Field(
        default=None, description="Implied inter-arrival CV; 1 = Poisson.")
    spec_acceptance: float | None = Field(
        default=None, description="Speculative decoding acceptance; absent when off.")
    queue_wait_ms: float | None = Field(default=None, description="Mean queue wait.")
    kv_cache_usage: float | None = Field(default=None, description="Mean KV-cache usage, 0-1.")
    staleness_seconds: float | None = Field(default=None,
                                            description="Age of the newest sample.")
    prompt_tokens: LengthFigures | None = None
    output_tokens: LengthFigures | None = None
    ttft_ms: LatencyFigures | None = None
    itl_ms: LatencyFigures | None = None
    refused_rps: float | None = Field(
        default=None, description="Generation requests/s the engine refused (HTTP 4xx: a "
                                  "prompt past the context limit is one); absent where the "
                                  "engine does not count them (SGLang).")


# ---- retune -------------------------------------------------------------------------------


class WorkloadFigures(SpecModel):
    """The figures drift is measured on (drift.WorkloadSummary)."""

    rate_rps: float
    prompt_tokens: float
    output_tokens: float
    prefix_share: float | None = None
    refused_share: float | None = None


class RetuneFailure(SpecModel):
    """A workload whose re-plan failed or was not worth rolling out: not retried for a while."""

    workload: str = Field(description="Digest of the workload (within the drift thresholds).")
    time: Time
    reason: str
    basis: str = Field(default="", description="What else the outcome depended on.")
    figures: WorkloadFigures


class RetuneStatus(SpecModel):
    """What the re-tune loop remembers between checks."""

    drift_checks: Count = Field(default=0,
                                description="Consecutive checks of one drift episode.")
    violation_checks: Count = Field(default=0,
                                    description="Consecutive checks with an SLO violation.")
    last_check_time: Time | None = None
    last_replan_time: Time | None = None
    last_rollout_time: Time | None = None
    last_replan_workload: str | None = Field(default=None,
                                             description="Digest of the last re-plan's workload.")
    failed: Annotated[list[RetuneFailure], Field(max_length=MAX_FAILED)] | None = None


class RetuneStep(enum.StrEnum):
    """What a `status.retuneHistory` entry records."""

    REPLAN = "Replan"  # a re-plan was started
    ROLL_OUT = "RollOut"  # its recommendation is rolling out
    KEEP = "Keep"  # its recommendation was not worth a rollout
    FAILED = "Failed"  # the re-plan or its rollout failed
    HOLD = "Hold"  # a re-plan was due but held (cooldown, same workload failed)


class RetuneHistoryEntry(SpecModel):
    """One re-tune decision and why."""

    time: Time
    action: RetuneStep
    reason: str
    cause: str | None = Field(default=None, description="The decision's Why, when from one.")
    from_hash: str | None = None
    to_hash: str | None = None
    figures: dict[str, float] | None = Field(default=None,
                                             description="The figures it was decided on.")


# ---- calibration --------------------------------------------------------------------------


class FactorStatus(SpecModel):
    """One latency's correction: smoothed observed / predicted p90 and the factor plans use."""

    factor: float = Field(default=1.0, gt=0)
    pairs: Count = 0
    applied: float = Field(default=1.0, gt=0)
    last_ratio: float | None = None


class CalibrationStatus(SpecModel):
    """The TTFT and TPOT correction factors and where the last pair came from."""

    ttft: FactorStatus = Field(default_factory=FactorStatus)
    tpot: FactorStatus = Field(default_factory=FactorStatus)
    updated: Time | None = None
    config_hash: str | None = Field(default=None,
                                    description="Configuration the last pair observed.")
