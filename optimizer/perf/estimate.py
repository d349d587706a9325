"""One configuration in, one explained prediction out: the facade behind `trilemma estimate`.

Resolves names through the catalogs, checks the layout, and asks the step and closed-loop
models for the numbers; every figure is labelled with how it was obtained (fitted kernel
tables, extrapolation from a neighbouring kernel, or datasheet rooflines).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from trilemma.optimizer.catalog import gpus, models, quantization, speculation
from trilemma.optimizer.catalog.gpus import Gpu
from trilemma.optimizer.catalog.models import ModelArch
from trilemma.optimizer.catalog.quantization import KvDtype, QuantRecipe
from trilemma.optimizer.catalog.speculation import SpecConfig, SpecMethod
from trilemma.optimizer.errors import InputError
from trilemma.optimizer.perf import latency, parallelism
from trilemma.optimizer.perf.engine import Engine, engine_facts
from trilemma.optimizer.perf.parallelism import Parallelism
from trilemma.optimizer.perf.steps import StepModel


@dataclass(frozen=True, kw_only=True)
class Config:
    """A fully resolved serving configuration of one replica."""

    arch: ModelArch
    gpu: Gpu
    par: Parallelism
    quant: QuantRecipe
    kv: KvDtype
    spec: SpecConfig = field(default_factory=lambda: SpecConfig(method=SpecMethod.NONE, k=0))
    engine: Engine = Engine.VLLM
    max_num_batched_tokens: int | None = None
    max_num_seqs: int | None = None
    draft: ModelArch | None = None


def resolve(*, model: str, gpu: str, tp: int = 1, pp: int = 1, dp: int = 1, ep: bool = False,
            quant: str | None = None, kv_dtype: str = "bf16", spec: str = "none",
            engine: str = "vllm", max_num_batched_tokens: int | None = None,
            max_num_seqs: int | None = None) -> Config:
    """Names from a user (CLI, spec file) -> a checked Config, or InputError naming the field."""
    arch = models.load_model(model)
    hw = gpus.get_gpu(gpu)
    par = Parallelism(tp=tp, pp=pp, dp=dp, ep=ep)
    parallelism.check(arch, par)
    recipe = (quantization.parse_recipe(quant, field="quant") if quant
              else default_recipe(arch))
    why = recipe.unsupported_reason(hw)
    if why:
        raise InputError("quant", recipe.value, why)
    try:
        kv = KvDtype(kv_dtype)
    except ValueError:
        raise InputError("kv_dtype", kv_dtype,
                         f"must be one of {', '.join(k.value for k in KvDtype)}") from None
    if not kv.supported_on(hw):
        raise InputError("kv_dtype", kv_dtype, f"{hw.name} has no {kv.value} KV-cache support")
    sc = speculation.parse_spec(spec, field="spec")
    draft = models.load_model(sc.draft_model) if sc.draft_model else None
    if sc.method is SpecMethod.MTP and arch.nextn_layers == 0:
        raise InputError("spec", spec, f"{arch.id} ships no multi-token-prediction layers")
    try:
        eng = Engine(engine)
    except ValueError:
        raise InputError("engine", engine, "must be vllm or sglang") from None
    for name, value in (("max_num_batched_tokens", max_num_batched_tokens),
                        ("max_num_seqs", max_num_seqs)):
        if value is not None and value < 1:
            raise InputError(name, value, "must be a positive integer")
    return Config(arch=arch, gpu=hw, par=par, quant=recipe, kv=kv, spec=sc, engine=eng,
                  max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                  draft=draft)


def default_recipe(arch: ModelArch) -> QuantRecipe:
    """A pre-quantized checkpoint runs in its own format; anything else in bf16."""
    if arch.checkpoint_quant:
        for recipe in QuantRecipe:
            if arch.checkpoint_quant.startswith(recipe.value):
                return recipe
    return QuantRecipe.BF16


def step_model(cfg: Config) -> StepModel:
    return StepModel(cfg.arch, cfg.gpu, cfg.quant, cfg.kv, engine_facts(cfg.engine))


def draft_step_model(cfg: Config) -> StepModel | None:
    if cfg.draft is None:
        return None
    return StepModel(cfg.draft, cfg.gpu, cfg.quant, cfg.kv, engine_facts(cfg.engine))


@dataclass(frozen=True, kw_only=True)
class Estimate:
    """Scalar predictions for one configuration and workload."""

    config: Config
    fits: bool
    ttft_ms: float
    tpot_ms: float
    e2e_ms: float
    requests_per_s: float
    output_tokens_per_s: float
    output_tokens_per_s_per_gpu: float
    decode_step_ms: float
    mixed_step_ms: float
    tokens_per_step: float
    memory: dict[str, float]
    max_seqs: int
    kv_tokens: int
    provenance: dict[str, str]


def provenance(cfg: Config, sm: StepModel | None = None) -> dict[str, str]:
    """Which parts of the prediction rest on measured kernels, extrapolation, or datasheets."""
    sm = sm or step_model(cfg)
    km = sm.km
    out = {
        "gemm": km.provenance("gemm", sm.attn_kernel),
        "attention": km.provenance("mla" if cfg.arch.mla else "attention", cfg.kv.value),
        "communication": km.provenance("comm", "allreduce"),
    }
    if cfg.arch.moe is not None:
        out["moe"] = km.provenance("moe", sm.moe_kernel)
    if cfg.gpu.extrapolated_from:
        out["kernels"] = cfg.gpu.kernels  # which calibrated GPU every figure rests on
    return out


def closed_loop(cfg: Config, *, concurrency: int, prompt_tokens: int, output_tokens: int,
                cached_tokens: int = 0, output_predictability: float = 0.5) -> Estimate:
    for name, value in (("concurrency", concurrency), ("prompt_tokens", prompt_tokens),
                        ("output_tokens", output_tokens)):
        if value < 1:
            raise InputError(name, value, "must be a positive integer")
    if not 0 <= cached_tokens < prompt_tokens:
        raise InputError("cached_tokens", cached_tokens,
                         "cached prefix tokens must be in [0, prompt_tokens)")
    if not 0.0 <= output_predictability <= 1.0:
        raise InputError("output_predictability", output_predictability, "must be between 0 and 1")
    sm = step_model(cfg)
    r = latency.closed_loop(
        sm, tp=cfg.par.tp, pp=cfg.par.pp, dp=cfg.par.dp, ep=cfg.par.ep,
        concurrency=concurrency, prompt_tokens=prompt_tokens, output_tokens=output_tokens,
        cached_tokens=cached_tokens,
        max_batched_tokens=cfg.max_num_batched_tokens, max_num_seqs=cfg.max_num_seqs,
        spec=cfg.spec, output_predictability=output_predictability, draft=draft_step_model(cfg))
    m = r.memory
    return Estimate(
        config=cfg, fits=bool(m.fits), ttft_ms=float(r.ttft_ms), tpot_ms=float(r.tpot_ms),
        e2e_ms=float(r.e2e_ms), requests_per_s=float(r.requests_per_s),
        output_tokens_per_s=float(r.output_tokens_per_s),
        output_tokens_per_s_per_gpu=float(r.output_tokens_per_s_per_gpu),
        decode_step_ms=float(r.decode_step_ms), mixed_step_ms=float(r.mixed_step_ms),
        tokens_per_step=float(r.tokens_per_step),
        memory={"capacity": float(m.capacity), "weights": float(m.weights),
                "activations": float(m.activations), "runtime": float(m.runtime),
                "kv_cache": float(m.kv_cache)},
        max_seqs=int(m.max_seqs), kv_tokens=int(m.kv_tokens), provenance=provenance(cfg, sm))


def decode_step_ms(cfg: Config, *, batch: int, kv_len: int) -> float:
    """One decode step of `batch` sequences at KV length `kv_len` (ms)."""
    sm = step_model(cfg)
    t = sm.step(tp=cfg.par.tp, dp=cfg.par.dp, ep=cfg.par.ep, pp=cfg.par.pp,
                dec_seqs=np.float64(batch), dec_kv=np.float64(kv_len))
    return float(t.total)


def prefill_ms(cfg: Config, *, batch: int, prompt_tokens: int, cached_tokens: int = 0) -> float:
    """One prefill pass over `batch` prompts of `prompt_tokens` tokens, `cached_tokens` of them
    reused (ms)."""
    sm = step_model(cfg)
    new = max(prompt_tokens - cached_tokens, 1)
    t = sm.step(tp=cfg.par.tp, dp=cfg.par.dp, ep=cfg.par.ep, pp=cfg.par.pp,
                dec_seqs=np.float64(0.0), dec_kv=np.float64(0.0),
                pf_tokens=np.float64(batch * new), pf_seqs=np.float64(batch),
                pf_kv=np.float64(prompt_tokens))
    return float(t.total)
