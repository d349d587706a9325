"""What the search optimises, and the bounds of the space it may explore.

The objective ranks configurations that meet every SLO; the bounds prune the space before any
configuration is priced. An omitted list means "anything the hardware pool and catalog allow".
"""

from __future__ import annotations

import enum
from typing import Annotated, Any

from pydantic import BeforeValidator, Field, field_validator

from trilemma.optimizer.catalog import gpus

# Engine is re-exported: the spec package's API names it beside the objective.
from trilemma.optimizer.catalog.engines import Engine as Engine
from trilemma.optimizer.catalog.quantization import KvDtype, QuantRecipe, parse_recipe
from trilemma.optimizer.catalog.speculation import SpecMethod
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.spec.base import SpecModel, rule_error


class Objective(enum.StrEnum):
    """How to rank configurations that meet every SLO."""

    MIN_COST = "min_cost"  # cheapest $/hour that carries the design rate
    MAX_THROUGHPUT = "max_throughput"  # most requests/s within the pool (and budget)
    MIN_LATENCY = "min_latency"  # lowest latency percentiles within the pool (and budget)
    BALANCED = "balanced"  # the Pareto knee between cost and latency


def _recipe(value: Any) -> Any:
    # Accept the catalog's aliases ("awq", "gptq", "bfloat16") as well as the enum values.
    if isinstance(value, str):
        try:
            return parse_recipe(value)
        except InputError as err:
            raise rule_error(err.why) from None
    return value


Recipe = Annotated[QuantRecipe, BeforeValidator(_recipe)]


def _no_duplicates(values: list[Any] | None) -> list[Any] | None:
    if values is not None and len(set(values)) != len(values):
        raise rule_error("lists a value twice")
    return values


class SearchBounds(SpecModel):
    """Limits on the configurations the search may try."""

    gpu_types: list[str] | None = Field(
        default=None, min_length=1,
        description="GPU catalog keys the search may use; default: every type in the pool.")
    quantizations: list[Recipe] | None = Field(
        default=None, min_length=1,
        description="Weight quantization recipes to try (bf16, fp8, int8, int4, nvfp4, "
                    "mxfp4); default: all the GPUs run.")
    kv_dtypes: list[KvDtype] | None = Field(
        default=None, min_length=1, description="KV-cache dtypes to try (bf16, fp8).")
    speculation: list[SpecMethod] | None = Field(
        default=None, min_length=1,
        description="Speculative decoding methods to try (none, ngram, draft, eagle, eagle3, "
                    "mtp); default: all that apply to the model.")
    engines: list[Engine] | None = Field(
        default=None, min_length=1, description="Serving engines to try (vllm, sglang).")
    max_tensor_parallel: int | None = Field(
        default=None, ge=1, le=256, description="Largest tensor-parallel size per replica.")
    max_pipeline_parallel: int | None = Field(
        default=None, ge=1, le=64, description="Largest pipeline-parallel size per replica.")
    max_replicas: int | None = Field(
        default=None, ge=1, le=10_000, description="Most replicas in one deployment.")
    allow_disaggregation: bool = Field(
        default=True,
        description="Whether prefill and decode may run on separate replicas; false keeps "
                    "them together.")

    @field_validator("gpu_types")
    @classmethod
    def _known_gpus(cls, keys: list[str] | None) -> list[str] | None:
        if keys is None:
            return None
        canonical = []
        for key in keys:
            try:
                canonical.append(gpus.get_gpu(key).key)
            except InputError as err:
                raise rule_error(err.why, field=str(len(canonical)), value=key) from None
        return _no_duplicates(canonical)

    @field_validator("quantizations", "kv_dtypes", "speculation", "engines")
    @classmethod
    def _unique(cls, values: list[Any] | None) -> list[Any] | None:
        return _no_duplicates(values)
