"""`vllm serve` flags -> the ServingConfig a sim-server emulates.

The inverse of optimizer/render/vllm_flags.py: every flag the renderer emits is read back into
the WorkerConfig field it came from, so a sim-server started with a rendered Deployment's
arguments stands in for the vLLM container (a kind cluster without GPUs). Flags the renderer
never emits are listed back to the caller to warn about, not guessed at. Defaults for flags
left out are vLLM's own (engine facts), not WorkerConfig's, because that is what an engine
started without them would run.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from trilemma.optimizer import catalog
from trilemma.optimizer.catalog import SpecMethod
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.perf import engine_facts
from trilemma.optimizer.perf import estimate as perf_estimate
from trilemma.optimizer.search.configs import ServingConfig, WorkerConfig

# vLLM's SpeculativeConfig.method spellings -> the catalog's methods. Every "*_mtp" method
# (deepseek_mtp, qwen3_next_mtp, ...) drafts with the model's own nextn layers.
_SPEC_METHODS = {
    "ngram": SpecMethod.NGRAM,
    "draft_model": SpecMethod.DRAFT,
    "eagle": SpecMethod.EAGLE,
    "eagle3": SpecMethod.EAGLE3,
    "mtp": SpecMethod.MTP,
}

# Flags the renderer emits that change nothing in a one-process simulator: the P/D connector
# (a sim replica always prefills and decodes) and the multi-node wiring of one replica.
_NO_EFFECT = ("kv_transfer_config", "nnodes", "master_addr", "node_rank", "headless")


@dataclass(frozen=True, kw_only=True)
class EngineFlags:
    """What a `vllm serve` command line says, as the simulator uses it."""

    config: ServingConfig
    served_model_name: str | None = None
    host: str | None = None
    port: int | None = None
    shutdown_timeout: float | None = None  # vLLM >= 0.18: drain on SIGTERM (server.py)
    ignored: tuple[str, ...] = ()  # flags the simulator does not know: warn, then go on
    no_effect: tuple[str, ...] = ()  # known flags that a simulator has no use for


class _BadFlags(Exception):
    """argparse wants to exit on a bad value; the caller gets an InputError instead."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise _BadFlags(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="vllm serve", add_help=False, allow_abbrev=False)
    p.add_argument("--model", default=None)
    p.add_argument("--served-model-name", nargs="+", default=None)
    p.add_argument("--host", default=None)
    p.add_argument("--port", type=int, default=None)
    p.add_argument("--shutdown-timeout", type=float, default=None)
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    p.add_argument("--data-parallel-size", "-dp", type=int, default=1)
    p.add_argument("--enable-expert-parallel", action="store_true")
    p.add_argument("--decode-context-parallel-size", "-dcp", type=int, default=1)
    p.add_argument("--quantization", "-q", default=None)
    p.add_argument("--kv-cache-dtype", default="auto")
    p.add_argument("--gpu-memory-utilization", type=float, default=None)
    p.add_argument("--max-num-seqs", type=int, default=None)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--enable-prefix-caching", dest="prefix_caching", action="store_true",
                   default=True)  # on by default in vLLM V1
    p.add_argument("--no-enable-prefix-caching", dest="prefix_caching", action="store_false")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--speculative-config", default=None)
    p.add_argument("--kv-transfer-config", default=None)
    p.add_argument("--nnodes", default=None)
    p.add_argument("--master-addr", default=None)
    p.add_argument("--node-rank", default=None)
    p.add_argument("--headless", action="store_true", default=None)
    return p


def parse_vllm_args(argv: Sequence[str], *, gpu: str, engine: str = "vllm") -> EngineFlags:
    """Read a `vllm serve` argv (with or without the leading `vllm serve`) on GPU `gpu`."""
    args = list(argv)
    while args and args[0] in ("vllm", "serve"):
        args.pop(0)
    # The model is positional only right after `serve`, as vLLM's own parser has it; taken by
    # hand so that the value of an unknown flag is never mistaken for it.
    positional = args.pop(0) if args and not args[0].startswith("-") else None
    try:
        ns, unknown = _parser().parse_known_args(args)
    except _BadFlags as exc:
        raise InputError("engine_args", " ".join(args), str(exc)) from None
    model = ns.model or positional
    if not model:
        raise InputError("model", None, "give the model as vLLM does: a positional id or --model")
    arch = catalog.load_model(model)
    hw = catalog.get_gpu(gpu)
    served_by = catalog.Engine(engine)
    facts = engine_facts(served_by)
    method, k, draft = _speculation(ns.speculative_config)
    worker = WorkerConfig(
        gpu=hw.key, tp=ns.tensor_parallel_size, pp=ns.pipeline_parallel_size,
        dp=ns.data_parallel_size, ep=ns.enable_expert_parallel,
        quant=_quant(ns.quantization, arch), kv_dtype=_kv_dtype(ns.kv_cache_dtype),
        spec_method=method, spec_k=k, draft_model=draft,
        max_num_seqs=ns.max_num_seqs or facts.default_max_num_seqs(hw),
        max_num_batched_tokens=(ns.max_num_batched_tokens
                                or facts.default_max_num_batched_tokens(hw)),
        prefix_caching=ns.prefix_caching,
        gpu_memory_utilization=(facts.gpu_memory_utilization
                                if ns.gpu_memory_utilization is None
                                else ns.gpu_memory_utilization),
        max_model_len=ns.max_model_len, cp=ns.decode_context_parallel_size)
    no_effect = tuple("--" + name.replace("_", "-") for name in _NO_EFFECT
                      if getattr(ns, name) is not None)
    return EngineFlags(
        config=ServingConfig(model=model, engine=served_by, worker=worker),
        served_model_name=ns.served_model_name[0] if ns.served_model_name else None,
        host=ns.host, port=ns.port, shutdown_timeout=ns.shutdown_timeout,
        ignored=tuple(unknown), no_effect=no_effect)


def _quant(flag: str | None, arch: catalog.ModelArch) -> catalog.QuantRecipe:
    # No flag: the engine reads the checkpoint's own format (bf16 for plain checkpoints).
    if flag is None:
        return perf_estimate.default_recipe(arch)
    return catalog.parse_recipe(flag, field="--quantization")


def _kv_dtype(flag: str) -> catalog.KvDtype:
    value = flag.strip().lower()
    if value in ("auto", "bf16", "bfloat16"):
        return catalog.KvDtype.BF16
    if value.startswith("fp8"):  # fp8, fp8_e4m3, fp8_e5m2
        return catalog.KvDtype.FP8
    raise InputError("--kv-cache-dtype", flag, "the simulator knows auto, bf16 and fp8 KV caches")


def _speculation(text: str | None) -> tuple[SpecMethod, int, str | None]:
    if text is None:
        return SpecMethod.NONE, 0, None
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError("--speculative-config", text, f"not JSON: {exc.msg}") from None
    if not isinstance(body, dict):
        raise InputError("--speculative-config", text, "must be a JSON object")
    name = body.get("method")
    model = body.get("model")
    if name is None:
        # Older vLLM inferred the method from the presence of a draft model.
        method = SpecMethod.DRAFT if model else None
    elif isinstance(name, str) and name.endswith("mtp"):
        method = SpecMethod.MTP
    else:
        method = _SPEC_METHODS.get(name)
    if method is None:
        raise InputError("--speculative-config", text,
                         f"unknown method {name!r}; one of {', '.join(sorted(_SPEC_METHODS))}")
    k = body.get("num_speculative_tokens")
    if not isinstance(k, int) or isinstance(k, bool):
        raise InputError("--speculative-config", text, "num_speculative_tokens must be an int")
    # EAGLE heads are priced from the target's own layers; only a draft model has an arch.
    draft = model if method is SpecMethod.DRAFT else None
    if method is SpecMethod.DRAFT and not model:
        raise InputError("--speculative-config", text, "draft_model needs a model")
    return method, k, draft
