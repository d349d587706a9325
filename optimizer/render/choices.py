"""Decisions both engines share: quantization flag, speculation, multi-node layout.

Between the plan and the per-engine flag builders (vllm_flags.py, sglang_flags.py): each
function turns one plan field plus catalog facts into an engine-neutral decision, or raises
InputError(field, value, why) when no engine command could express it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trilemma.optimizer import catalog
from trilemma.optimizer.catalog import QuantRecipe, SpecMethod, quantization
from trilemma.optimizer.catalog.engines import Engine
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.perf import context_parallel
from trilemma.optimizer.render import drafts
from trilemma.optimizer.render.ir import Arg, Source
from trilemma.optimizer.search.configs import WorkerConfig
from trilemma.optimizer.spec.hardware import GpuGroup

DEFAULT_PORT = 8000


@dataclass(frozen=True, kw_only=True)
class RenderOptions:
    """What the caller may set beyond the plan; None = renderer or engine default."""

    port: int = DEFAULT_PORT
    max_model_len: int | None = None   # tokens; None leaves the model's own limit
    draft_model: str | None = None     # eagle/eagle3 head, overriding data/draft_heads.yaml
    pool_group: GpuGroup | None = None  # node size, resource name, scheduling constraints
    # A mixed plan's other GPU types' groups (by their `gpu`); pool_group is the worker's.
    pool_groups: tuple[GpuGroup, ...] = ()
    router_command: tuple[str, ...] | None = None  # disaggregated: the request router
    # What the engine loads when it is not the planned model id: a checkpoint path in the pod,
    # or the Hub id of a model planned from its config.json alone.
    served_model: str | None = None
    # The plan's predicted p99 end-to-end latency (Prediction.e2e_p99_ms): sizes the pods'
    # termination grace period so a drain outlasts the requests in flight (drain.py).
    e2e_p99_ms: float | None = None


def quant_flag(model: catalog.ModelArch, worker: WorkerConfig) -> str | None:
    """The --quantization value to pass, or None when the checkpoint already is that format.

    Engines read a pre-quantized checkpoint's format from its config, so a flag would be
    redundant; only fp8 can be produced on the fly from a bf16 checkpoint by both engines.
    """
    recipe = worker.quant
    why = quantization.checkpoint_reason(model.checkpoint_quant, recipe)
    if why:
        raise InputError("quant", recipe.value, f"{model.id} is {why}: point model at one")
    if model.checkpoint_quant is None and recipe is QuantRecipe.FP8:
        return "fp8"
    return None


def quantization_arg(model: catalog.ModelArch, worker: WorkerConfig) -> Arg:
    """`--quantization` (same flag and values in vLLM and SGLang), or a recorded no-op when the
    engine reads the format from the checkpoint's config."""
    quant = quant_flag(model, worker)
    if quant:
        return Arg(flag="--quantization", value=quant, source=Source.PLAN)
    return Arg(flag="--quantization", source=Source.CATALOG, emit=False,
               note=f"checkpoint format {model.checkpoint_quant or 'bf16'} read from its config")


@dataclass(frozen=True, kw_only=True)
class Speculation:
    """The engine-neutral speculation decision: method, draft tokens, head checkpoint."""

    method: SpecMethod
    k: int
    head: str | None = None
    head_overridden: bool = False


def speculation(model: catalog.ModelArch, worker: WorkerConfig,
                options: RenderOptions) -> Speculation | None:
    method = worker.spec_method
    if method is SpecMethod.NONE:
        return None
    if method is SpecMethod.MTP and model.nextn_layers == 0:
        raise InputError("spec_method", method.value,
                         f"{model.id} has no multi-token-prediction layers to draft with")
    if method is SpecMethod.DRAFT:
        if not worker.draft_model:
            raise InputError("draft_model", None, "the draft method needs a draft model id")
        return Speculation(method=method, k=worker.spec_k, head=worker.draft_model)
    if method in (SpecMethod.EAGLE, SpecMethod.EAGLE3):
        if options.draft_model:
            return Speculation(method=method, k=worker.spec_k, head=options.draft_model,
                               head_overridden=True)
        head = drafts.draft_head(method.value, model.id)
        return Speculation(method=method, k=worker.spec_k, head=head)
    return Speculation(method=method, k=worker.spec_k)


def gpus_per_node(worker: WorkerConfig, options: RenderOptions) -> int:
    if options.pool_group is not None:
        return options.pool_group.effective_gpus_per_node
    return catalog.get_gpu(worker.gpu).gpus_per_node


def nodes_per_replica(worker: WorkerConfig, options: RenderOptions) -> int:
    """1 when a replica fits one node; else how many whole nodes it fills."""
    per_node = gpus_per_node(worker, options)
    if worker.gpus <= per_node:
        return 1
    if worker.gpus % per_node:
        raise InputError(
            "tp", worker.tp,
            f"a replica of {worker.gpus} GPUs spans nodes of {per_node}; it must fill whole "
            "nodes (tp*pp*dp a multiple of the GPUs per node)")
    return math.ceil(worker.gpus / per_node)


def require_moe_for_ep(model: catalog.ModelArch, worker: WorkerConfig) -> None:
    if worker.ep and model.moe is None:
        raise InputError("ep", worker.ep, f"{model.id} is dense: expert parallel needs MoE")


def require_context_parallel(model: catalog.ModelArch, worker: WorkerConfig,
                             engine: Engine) -> None:
    """A cp the engine's pinned release cannot run is refused here, never rendered as a flag
    the engine lacks (or one it would reject at start-up)."""
    why = context_parallel.reason(model, engine, worker.tp, worker.cp)
    if why:
        raise InputError("cp", worker.cp, why)
