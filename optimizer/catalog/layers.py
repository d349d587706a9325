"""The building blocks of a model architecture: layer kinds, MoE, MLA and other attention
variants, the parameter breakdown, and how many keys a query attends to.

models.ModelArch is made of these and re-exports them (callers name them `models.MoE`, ...);
kept apart so that models.py holds the architecture and its arithmetic.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass


class StepPhase(enum.Enum):
    """Which forward pass flops_per_token describes."""

    PREFILL = "prefill"
    DECODE = "decode"


class AttentionKind(enum.Enum):
    """How a layer attends; the value is the Hugging Face `layer_types` spelling."""

    FULL = "full_attention"
    SLIDING = "sliding_attention"  # the last `window` tokens (gpt-oss, Gemma, Mistral)
    CHUNKED = "chunked_attention"  # within fixed blocks of `window` tokens (Llama-4 local layers)
    LINEAR = "linear_attention"  # recurrent state of fixed size, no KV cache (Qwen3.5 DeltaNet)

    @property
    def windowed(self) -> bool:
        return self in (AttentionKind.SLIDING, AttentionKind.CHUNKED)


@dataclass(frozen=True, kw_only=True)
class MoE:
    num_experts: int
    experts_per_token: int
    expert_intermediate_size: int
    shared_experts: int
    shared_expert_intermediate_size: int
    first_dense_layers: int
    dense_intermediate_size: int
    moe_layer_interval: int = 1
    router_bias: bool = False  # gpt-oss router bias, DeepSeek/MiniMax score-correction bias

    def is_moe_layer(self, index: int) -> bool:
        """HF convention: after the leading dense layers, every `interval`-th layer (1-based)."""
        offset = index - self.first_dense_layers
        return offset >= 0 and (offset + 1) % self.moe_layer_interval == 0


@dataclass(frozen=True, kw_only=True)
class MLA:
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int


@dataclass(frozen=True, kw_only=True)
class LinearAttention:
    """Gated DeltaNet dimensions (Qwen3.5 / Qwen3-Next `linear_*` keys)."""

    num_key_heads: int
    num_value_heads: int
    key_head_dim: int
    value_head_dim: int
    conv_kernel: int
    state_bytes_per_elem: float = 4.0  # config's mamba_ssm_dtype; engines keep the state in fp32


@dataclass(frozen=True, kw_only=True)
class SparseIndexer:
    """DeepSeek sparse attention (GLM-5, DeepSeek-V3.2): a light indexer picks `topk` tokens."""

    num_heads: int
    head_dim: int
    topk: int


@dataclass(frozen=True, kw_only=True)
class LayerKind:
    """What one decoder layer needs for GEMM shapes and attention cost; hashable, so countable."""

    attention: AttentionKind
    window: int | None  # tokens a SLIDING or CHUNKED layer keeps; None otherwise
    num_kv_heads: int  # GQA KV heads (MLA: num_heads; LINEAR: 0)
    head_dim: int
    moe: bool  # routed experts (plus any shared experts) instead of a dense FFN


@dataclass(frozen=True, kw_only=True)
class ParamBreakdown:
    embedding: int
    lm_head: int  # 0 when tied to the embedding (then `embedding` is the shared matrix)
    attention: int  # projections, biases, sinks, MLA low-rank pairs, indexer, DeltaNet
    dense_mlp: int
    routed_experts: int
    shared_experts: int
    router: int
    norms: int

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in dataclasses.fields(self))


def attended_keys(kind: AttentionKind, window: int | None, ctx: float, phase: StepPhase) -> float:
    """Mean number of keys one query reads."""
    if ctx <= 0:
        return 0.0
    w = window if kind.windowed and window else None
    if phase is StepPhase.DECODE:
        if w is None or ctx <= w:
            return float(ctx)
        # A chunked layer sees the current chunk only: on average half of it.
        return float(w) if kind is AttentionKind.SLIDING else (w + 1) / 2
    if w is None or ctx <= w:
        return (ctx + 1) / 2
    if kind is AttentionKind.SLIDING:
        return (w * (w + 1) / 2 + (ctx - w) * w) / ctx
    chunks, rest = divmod(ctx, w)
    return (chunks * w * (w + 1) / 2 + rest * (rest + 1) / 2) / ctx
