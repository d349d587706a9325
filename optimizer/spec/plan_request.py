"""The top-level spec document: what `trilemma optimize SPEC.yaml` reads.

It gathers the candidate model(s), the workload, the SLOs, the hardware pool, the objective and
the search bounds, and checks what only the whole document can: bounds that name GPUs outside
the pool, recipes no pool GPU runs, a quality floor no candidate can reach.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
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

# The request length a deployment must hold is this percentile of prompts plus this percentile
# of outputs (SearchSettings.memory_percentile's default); the share of longer requests in an
# error message is counted over this many sampled requests.
WINDOW_PERCENTILE = 99.0
WINDOW_SAMPLE = 20_000

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
        self._requests_fit_a_window()
        return self

    def longest_request_tokens(self, percentile: float = WINDOW_PERCENTILE) -> float:
        """Prompt plus output tokens a deployment must hold: the two lengths' `percentile`s
        summed (what the search sizes memory and --max-model-len for)."""
        wl = self.workload
        return (wl.prompt_distribution().percentile_tokens(percentile)
                + wl.output_distribution().percentile_tokens(percentile))

    def _requests_fit_a_window(self) -> None:
        # A model's context window (max_position_embeddings, already extended where its
        # config.json applies rope scaling) bounds every request the engine will accept: a
        # plan for longer requests would be deployed with a --max-model-len that refuses them.
        longest = self.longest_request_tokens()
        windows = {c.id: c.arch.max_position_embeddings for c in self.candidates}
        if not windows or any(not w or longest <= w for w in windows.values()):
            return  # at least one candidate holds them (the search drops the others)
        sample = self.workload.sample(WINDOW_SAMPLE, np.random.default_rng(0))
        total = sample.prompt_tokens + sample.output_tokens
        over = ", ".join(f"{m}: {window:,} tokens, {float(np.mean(total > window)):.1%} of "
                         f"requests longer" for m, window in windows.items())
        raise rule_error(
            f"requests do not fit the context window of any candidate model ({over}); the "
            f"p{WINDOW_PERCENTILE:g} prompt plus the p{WINDOW_PERCENTILE:g} output is "
            f"{longest:,.0f} tokens. Choose a model with a longer window; context extension "
            "(e.g. YaRN rope scaling) is not planned", field="workload.promptTokens",
            value=round(longest))

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

