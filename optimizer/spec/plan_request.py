"""The top-level spec document: what `trilemma optimize SPEC.yaml` reads.

It gathers the candidate model(s), the workload, the SLOs, the hardware pool, the objective and
the search bounds, and checks what only the whole document can: bounds that name GPUs outside
the pool, recipes no pool GPU runs, a quality floor no candidate can reach.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from trilemma.optimizer.catalog import gpus
from trilemma.optimizer.catalog.quantization import QuantRecipe
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.spec import limits
from trilemma.optimizer.spec.base import SpecModel, rule_error
from trilemma.optimizer.spec.hardware import HardwarePool
from trilemma.optimizer.spec.models import ModelChoice
from trilemma.optimizer.spec.objective import Objective, SearchBounds
from trilemma.optimizer.spec.slo import Slo
from trilemma.optimizer.spec.workload import Workload

# The header a file may carry, matching the custom resource the operator will read. The group
# is provisional until the CRDs are generated.
API_VERSION = "trilemma.dev/v1alpha1"
KIND = "OptimizedEndpoint"


class PlanRequest(SpecModel):
    """A request to plan a deployment: models, workload, SLOs, hardware, objective, bounds."""

    api_version: Literal["trilemma.dev/v1alpha1"] | None = Field(
        default=None, description=f"Optional header: {API_VERSION}.")
    kind: Literal["OptimizedEndpoint"] | None = Field(
        default=None, description=f"Optional header: {KIND}.")
    model: ModelChoice | None = Field(
        default=None, description="The model to serve; or give models (candidates).")
    models: list[ModelChoice] | None = Field(
        default=None, min_length=1, max_length=limits.MAX_MODELS,
        description="Candidate models; the search may pick any. Exclusive with model.")
    workload: Workload = Field(description="The traffic to serve.")
    slo: Slo = Field(default_factory=Slo, description="Targets every plan must meet.")
    hardware: HardwarePool = Field(description="GPUs the search may use.")
    objective: Objective = Field(
        default=Objective.BALANCED,
        description="How to rank plans that meet the SLOs: min_cost, max_throughput, "
                    "min_latency or balanced.")
    bounds: SearchBounds = Field(
        default_factory=SearchBounds, description="Limits on the configurations to try.")

    @property
    def candidates(self) -> tuple[ModelChoice, ...]:
        """The candidate models, whichever of model/models the document used."""
        if self.model is not None:
            return (self.model,)
        assert self.models is not None, "validated: exactly one of model/models"
        return tuple(self.models)

    def allowed_gpus(self) -> tuple[str, ...]:
        """Pool GPU keys the bounds allow, in pool order."""
        allowed = self.bounds.gpu_types
        return tuple(k for k in self.hardware.gpu_keys if allowed is None or k in allowed)

    @model_validator(mode="after")
    def _consistent(self) -> PlanRequest:
        self._one_model_field()
        self._bounds_within_pool()
        self._formats_run_somewhere()
        self._quality_floor_reachable()
        return self

    def _one_model_field(self) -> None:
        if self.model is None and self.models is None:
            raise rule_error("give model (one) or models (candidates)", field="model")
        if self.model is not None and self.models is not None:
            raise rule_error("give model (one) or models (candidates), not both",
                             field="models", value=[m.id for m in self.models])
        ids = [m.id for m in self.candidates]
        for i, model_id in enumerate(ids):
            if model_id in ids[:i]:
                raise rule_error(f"{model_id} is listed twice", field=f"models.{i}.id",
                                 value=model_id)

    def _bounds_within_pool(self) -> None:
        for i, key in enumerate(self.bounds.gpu_types or ()):
            if key not in self.hardware.gpu_keys:
                raise rule_error(
                    f"{key} is not in the hardware pool ({', '.join(self.hardware.gpu_keys)})",
                    field=f"bounds.gpuTypes.{i}", value=key)

    def _formats_run_somewhere(self) -> None:
        # A listed recipe or KV dtype that no allowed GPU runs can only be a mistake; say so
        # now rather than return an empty search.
        allowed = [gpus.get_gpu(k) for k in self.allowed_gpus()]
        names = ", ".join(g.key for g in allowed)
        for i, recipe in enumerate(self.bounds.quantizations or ()):
            if not any(recipe.supported_on(g) for g in allowed):
                why = recipe.unsupported_reason(allowed[0])
                raise rule_error(f"no allowed GPU ({names}) runs {recipe.value}: {why}",
                                 field=f"bounds.quantizations.{i}", value=recipe.value)
        for i, kv in enumerate(self.bounds.kv_dtypes or ()):
            if not any(kv.supported_on(g) for g in allowed):
                raise rule_error(f"no allowed GPU ({names}) has fp8 hardware for a "
                                 f"{kv.value} KV cache", field=f"bounds.kvDtypes.{i}",
                                 value=kv.value)

    def _quality_floor_reachable(self) -> None:
        floor = self.slo.quality_floor
        if floor is None:
            return
        where = "model" if self.model is not None else "models"
        scores = []
        for i, choice in enumerate(self.candidates):
            path = "model.quality" if self.model is not None else f"models.{i}.quality"
            try:
                scores.append(choice.base_quality())
            except InputError as err:
                raise rule_error(f"slo.qualityFloor is set: {err.why}", field=path,
                                 value=None) from None
        benchmarks = sorted({s.benchmark for s in scores})
        if len(benchmarks) > 1:
            raise rule_error(f"a quality floor compares candidates on one benchmark; got "
                             f"{', '.join(benchmarks)}", field=where, value=benchmarks)
        best = max(self._best_quality(c) for c in self.candidates)
        if best < floor:
            raise rule_error(f"no candidate reaches the floor: the best scores {best:.1f} at "
                             "any allowed quantization", field="slo.qualityFloor", value=floor)

    def _best_quality(self, choice: ModelChoice) -> float:
        recipes = self.bounds.quantizations or list(QuantRecipe)
        return max(choice.quality_at(r) for r in recipes)

