"""A roofline stand-in for `perf.steps.StepModel`: same `step(...)` call, datasheet physics.

For the simulator's tests and benchmark, which need step times with the right shape (memory-
bound decode, compute-bound prefill, attention growing with the KV read) but not calibrated
ones, and must run where the fitted kernel tables are absent. Never use it for a prediction:
it knows no kernel efficiencies, communication or MoE (nor context parallelism: `cp` is taken
for the call's sake and changes nothing).

It carries the attributes the perf layer reads from a step model (`arch`, `gpu`, `recipe`,
`kv`, `facts`), so `perf.latency.closed_loop` and `cluster.engine_config` accept it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from trilemma.optimizer.catalog.gpus import Gpu
from trilemma.optimizer.catalog.models import ModelArch
from trilemma.optimizer.catalog.quantization import KvDtype, QuantRecipe
from trilemma.optimizer.perf.arrays import FloatArray
from trilemma.optimizer.perf.engine import EngineFacts

# Shares of the datasheet peaks that large kernels reach on Hopper (typical vLLM profiles).
_BANDWIDTH_EFFICIENCY = 0.8
_COMPUTE_EFFICIENCY = 0.7


@dataclass(frozen=True, kw_only=True)
class ToyStepTime:
    gemm: FloatArray
    attention: FloatArray
    other: FloatArray

    @property
    def total(self) -> FloatArray:
        return self.gemm + self.attention + self.other


class RooflineStepModel:
    """Step times of a dense transformer from its parameter count and the GPU's peaks."""

    def __init__(self, arch: ModelArch, gpu: Gpu, facts: EngineFacts, *,
                 recipe: QuantRecipe = QuantRecipe.BF16, kv: KvDtype = KvDtype.BF16) -> None:
        self.arch = arch
        self.gpu = gpu
        self.facts = facts
        self.recipe = recipe
        self.kv = kv
        self._params = float(arch.active_params)
        self._kv_token_bytes = float(arch.kv_bytes_per_token(kv.bytes))
        self._bw = gpu.memory_bw * _BANDWIDTH_EFFICIENCY
        self._flops = gpu.dense_flops["bf16"] * _COMPUTE_EFFICIENCY
        # Attention FLOPs per (query token x context token): QK^T and PV over all layers.
        self._attn_flops = 4.0 * arch.num_layers * arch.num_heads * arch.head_dim

    def step(self, *, tp: Any, dp: Any, ep: Any, pp: Any, dec_seqs: Any, dec_kv: Any,
             q: Any = 1.0, pf_tokens: Any = 0.0, pf_seqs: Any = 0.0,
             pf_kv: Any = 0.0, cp: Any = 1.0) -> ToyStepTime:
        f64 = np.float64
        tp = np.asarray(tp, dtype=f64)
        dec = np.asarray(dec_seqs, dtype=f64)
        kv = np.asarray(dec_kv, dtype=f64)
        q = np.asarray(q, dtype=f64)
        pf_tokens = np.asarray(pf_tokens, dtype=f64)
        pf_seqs = np.asarray(pf_seqs, dtype=f64)
        pf_kv = np.asarray(pf_kv, dtype=f64)
        tokens = np.maximum(dec * q + pf_tokens, 1.0)
        weights = self._params * self.recipe.weight_bytes / tp
        gemm = np.maximum(weights / self._bw, 2.0 * self._params / tp * tokens / self._flops)
        dec_read = dec * kv * self._kv_token_bytes / tp / self._bw
        dec_math = dec * q * kv * self._attn_flops / tp / self._flops
        per_seq = pf_tokens / np.maximum(pf_seqs, 1.0)
        ctx = np.maximum(pf_kv, per_seq)
        # Causal: each new token attends to the cached context and half of its own chunk.
        pf_math = pf_tokens * (ctx - 0.5 * per_seq) * self._attn_flops / tp / self._flops
        attention = np.maximum(dec_read, dec_math) + np.where(pf_seqs > 0, pf_math, 0.0)
        other = np.full(np.shape(gemm), self.facts.step_overhead_ms / 1e3)
        return ToyStepTime(gemm=gemm * 1e3, attention=attention * 1e3, other=other * 1e3)


class LinearStepModel:
    """The smallest step model with the right call: a fixed cost, a cost per token in the
    batch, and a cost per KV token the decodes read. Tests use it where they need step times
    they can work out by hand."""

    def __init__(self, *, base_ms: float = 5.0, per_token_ms: float = 0.02,
                 per_kv_token_ms: float = 1e-5) -> None:
        self.base_ms = base_ms
        self.per_token_ms = per_token_ms
        self.per_kv_token_ms = per_kv_token_ms

    def step(self, *, tp: Any, dp: Any, ep: Any, pp: Any, dec_seqs: Any, dec_kv: Any,
             q: Any = 1.0, pf_tokens: Any = 0.0, pf_seqs: Any = 0.0,
             pf_kv: Any = 0.0, cp: Any = 1.0) -> ToyStepTime:
        dec = np.asarray(dec_seqs, dtype=np.float64)
        tokens = dec * np.asarray(q, dtype=np.float64) + np.asarray(pf_tokens, dtype=np.float64)
        gemm = self.per_token_ms * tokens
        attention = self.per_kv_token_ms * dec * np.asarray(dec_kv, dtype=np.float64)
        shape = np.broadcast(gemm, attention, np.asarray(pf_seqs), np.asarray(pf_kv)).shape
        return ToyStepTime(gemm=np.broadcast_to(gemm, shape),
                           attention=np.broadcast_to(attention, shape),
                           other=np.full(shape, self.base_ms))
