"""Model catalog: Hugging Face config.json -> typed architecture, and derived sizes.

Bottom of the optimizer's data flow: perf/ reads a ModelArch to size weights, KV cache and
FLOPs. Bundled configs live in data/models/ (provenance in data/models/index.json, "sources");
any other model is a local config.json path. Nothing is downloaded.

CONTRACT (owned by the catalog helper; perf/ codes against these names):

@dataclass(frozen=True, kw_only=True)
class MoE:
    num_experts: int; experts_per_token: int
    expert_intermediate_size: int
    shared_experts: int                       # 0 if none
    shared_expert_intermediate_size: int      # per shared expert
    first_dense_layers: int                   # leading dense layers (first_k_dense_replace)
    dense_intermediate_size: int              # FFN width of those dense layers
    moe_layer_interval: int = 1               # every n-th layer is MoE (Llama-4 Maverick = 2)

@dataclass(frozen=True, kw_only=True)
class MLA:
    q_lora_rank: int | None; kv_lora_rank: int
    qk_rope_head_dim: int; qk_nope_head_dim: int; v_head_dim: int

@dataclass(frozen=True, kw_only=True)
class ModelArch:
    id: str                      # "meta-llama/Llama-3.1-70B"
    family: str                  # "llama3", "qwen3", "deepseek_v3", "gpt_oss" ... (quality lookups)
    architecture: str            # HF architectures[0]
    num_layers: int; hidden_size: int
    num_heads: int; num_kv_heads: int; head_dim: int
    intermediate_size: int       # dense FFN width (0 if every layer is MoE)
    vocab_size: int; tie_word_embeddings: bool
    moe: MoE | None; mla: MLA | None
    sliding_window: int | None           # window length in tokens
    sliding_layers: int                  # how many layers use the window (0 = none)
    gated_mlp: bool = True               # SwiGLU (3 matrices) vs plain (2)
    attention_bias: bool = False
    checkpoint_quant: str | None         # pre-quantized checkpoint's recipe ("fp8","nvfp4","mxfp4")
    max_position_embeddings: int
  properties / methods (all in parameters or bytes, no dtype knowledge beyond arguments):
    total_params, active_params -> int
    param_breakdown() -> ParamBreakdown(embedding, lm_head, attention, dense_mlp, routed_experts,
                                        shared_experts, router, norms)   (whole model)
    kv_bytes_per_token(kv_bytes: float) -> float   all layers; MLA stores kv_lora_rank+rope dims
    flops_per_token(context_len: float, phase) -> float   2*active linear params + attention term

load_model(id_or_path: str) -> ModelArch      bundled id, alias, or local config.json path;
                                               unknown id -> UnknownModelError that says how to
                                               pass a config.json
parse_hf_config(path | Mapping, model_id) -> ModelArch  malformed -> InputError(field=<json key>)
bundled_models() -> tuple[str, ...]

ADDED beyond the contract (defaults keep hand-built ModelArch valid):
  StepPhase (PREFILL, DECODE); AttentionKind (FULL, SLIDING, CHUNKED, LINEAR); LayerKind;
  LinearAttention, SparseIndexer.
  ModelArch fields: attention_kinds, full_attention_kv_heads, full_attention_head_dim, o_proj_bias,
    mlp_bias, qk_norm, attention_sinks, attention_output_gate, k_eq_v, linear_attention, indexer,
    nextn_layers, checkpoint_kv_quant, unquantized_parts, multimodal, source.
  ModelArch methods: layer_kinds(), layer_counts(), param_breakdown(active=False),
    active_params_with_embedding, mtp_params, kv_bytes(context_len, kv_bytes),
    recurrent_state_bytes(), flops_per_token(..., logits=True).
  Parameter counts cover the language model only: vision towers and MTP/nextn layers are left out
  (see mtp_params). active_params leaves out the input embedding table, a lookup and not a
  matmul; active_params_with_embedding adds it back (Qwen and Mistral publish that figure).
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# The building blocks live in layers.py; re-exported, as callers know them as models.MoE etc.
from trilemma.optimizer.catalog.layers import MLA as MLA
from trilemma.optimizer.catalog.layers import AttentionKind as AttentionKind
from trilemma.optimizer.catalog.layers import LayerKind as LayerKind
from trilemma.optimizer.catalog.layers import LinearAttention as LinearAttention
from trilemma.optimizer.catalog.layers import MoE as MoE
from trilemma.optimizer.catalog.layers import ParamBreakdown as ParamBreakdown
from trilemma.optimizer.catalog.layers import SparseIndexer as SparseIndexer
from trilemma.optimizer.catalog.layers import StepPhase as StepPhase
from trilemma.optimizer.catalog.layers import attended_keys
from trilemma.optimizer.errors import InputError


@dataclass(frozen=True, kw_only=True)
class ModelArch:
    id: str
    family: str
    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    moe: MoE | None
    mla: MLA | None
    sliding_window: int | None
    sliding_layers: int
    gated_mlp: bool = True
    attention_bias: bool = False  # biases on the q, k and v projections
    checkpoint_quant: str | None
    max_position_embeddings: int
    # Per-layer attention; empty means FULL everywhere except `sliding_layers` windowed layers.
    attention_kinds: tuple[AttentionKind, ...] = ()
    # Gemma-4 full-attention layers use a wider head and fewer KV heads than its sliding layers.
    full_attention_kv_heads: int | None = None
    full_attention_head_dim: int | None = None
    o_proj_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    # MiniMax-M2 (qk_norm_type "per_layer"): q and k are normed over all heads at once, so
    # a TP-sharded layer all-reduces their variances (vLLM MiniMaxText01RMSNormTP.forward_qk).
    qk_norm_spans_heads: bool = False
    attention_sinks: bool = False  # gpt-oss: one learned logit per head
    attention_output_gate: bool = False  # Qwen3.5: q_proj also emits a gate per head dim
    k_eq_v: bool = False  # Gemma-4: full-attention layers have no v_proj (V reuses K)
    linear_attention: LinearAttention | None = None
    indexer: SparseIndexer | None = None
    nextn_layers: int = 0  # MTP / nextn draft layers shipped with the checkpoint, not counted
    checkpoint_kv_quant: str | None = None
    unquantized_parts: frozenset[str] = frozenset()  # ParamBreakdown parts kept 16-bit
    multimodal: bool = False  # the checkpoint has a vision tower, left out of every count here
    source: str = ""

    def __post_init__(self) -> None:
        kinds = self.attention_kinds
        if kinds and len(kinds) != self.num_layers:
            raise InputError("layer_types", len(kinds), f"must list {self.num_layers} layers")
        if kinds and sum(k.windowed for k in kinds) != self.sliding_layers:
            raise InputError("sliding_layers", self.sliding_layers, "disagrees with layer_types")
        if self.sliding_layers and not self.sliding_window:
            raise InputError("sliding_window", self.sliding_window, "windowed layers need one")

    # --- structure ------------------------------------------------------------------------

    def layer_kinds(self) -> tuple[LayerKind, ...]:
        """One LayerKind per decoder layer, in order: the perf model builds its GEMMs from these."""
        return self._layers

    def layer_counts(self) -> dict[LayerKind, int]:
        """How many layers share each LayerKind, e.g. 3 dense + 58 MoE layers for DeepSeek-V3."""
        return dict(self._counts)

    @functools.cached_property
    def _counts(self) -> dict[LayerKind, int]:
        return dict(Counter(self._layers))

    @functools.cached_property
    def _layers(self) -> tuple[LayerKind, ...]:
        kinds = self.attention_kinds or tuple(
            AttentionKind.SLIDING if i < self.sliding_layers else AttentionKind.FULL
            for i in range(self.num_layers)
        )
        return tuple(self._layer(i, kind) for i, kind in enumerate(kinds))

    def _layer(self, index: int, kind: AttentionKind) -> LayerKind:
        kv_heads, head_dim = self.num_kv_heads, self.head_dim
        if kind is AttentionKind.FULL:
            kv_heads = self.full_attention_kv_heads or kv_heads
            head_dim = self.full_attention_head_dim or head_dim
        elif kind is AttentionKind.LINEAR:
            kv_heads = 0
        return LayerKind(
            attention=kind,
            window=self.sliding_window if kind.windowed else None,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            moe=self.moe is not None and self.moe.is_moe_layer(index),
        )

    # --- parameters -------------------------------------------------------------------------

    @property
    def total_params(self) -> int:
        return self._breakdown_total.total

    @property
    def active_params(self) -> int:
        """Parameters one token multiplies by: lm_head in, the embedding lookup table out."""
        return self._breakdown_active.total

    @property
    def active_params_with_embedding(self) -> int:
        extra = 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size
        return self.active_params + extra

    def param_breakdown(self, active: bool = False) -> ParamBreakdown:
        """Whole model by part; `active=True`: only what one token uses (see active_params)."""
        return self._breakdown_active if active else self._breakdown_total

    @functools.cached_property
    def _breakdown_total(self) -> ParamBreakdown:
        return self._count(active=False)

    @functools.cached_property
    def _breakdown_active(self) -> ParamBreakdown:
        return self._count(active=True)

    def _count(self, active: bool) -> ParamBreakdown:
        table = self.vocab_size * self.hidden_size
        parts: Counter[str] = Counter()
        for layer in self._layers:
            parts["attention"] += self._attention_params(layer)
            parts["norms"] += self._layer_norm_params(layer)
            if not layer.moe:
                parts["dense_mlp"] += self._ffn_params(self.intermediate_size)
                continue
            assert self.moe is not None
            moe = self.moe
            used = moe.experts_per_token if active else moe.num_experts
            parts["routed_experts"] += used * self._ffn_params(moe.expert_intermediate_size)
            parts["shared_experts"] += moe.shared_experts * self._ffn_params(
                moe.shared_expert_intermediate_size)
            parts["router"] += (self.hidden_size + moe.router_bias) * moe.num_experts
        return ParamBreakdown(
            embedding=0 if active else table,
            # Every token's logits use the head, tied or not; the total holds a tied matrix once.
            lm_head=table if active or not self.tie_word_embeddings else 0,
            attention=parts["attention"],
            dense_mlp=parts["dense_mlp"],
            routed_experts=parts["routed_experts"],
            shared_experts=parts["shared_experts"],
            router=parts["router"],
            norms=parts["norms"] + self.hidden_size,  # + the final norm before lm_head
        )

    def _ffn_params(self, width: int) -> int:
        matrices = 3 if self.gated_mlp else 2
        bias = (matrices - 1) * width + self.hidden_size if self.mlp_bias else 0
        return matrices * self.hidden_size * width + bias

    def _attention_params(self, layer: LayerKind) -> int:
        h, heads = self.hidden_size, self.num_heads
        if layer.attention is AttentionKind.LINEAR:
            return self._linear_attention_params()
        if self.mla is not None:
            return self._mla_params()
        q_out = heads * layer.head_dim * (2 if self.attention_output_gate else 1)
        kv_out = layer.num_kv_heads * layer.head_dim
        kv_out *= 1 if self.k_eq_v and layer.attention is AttentionKind.FULL else 2
        params = h * (q_out + kv_out) + heads * layer.head_dim * h
        params += (q_out + kv_out) * self.attention_bias + h * self.o_proj_bias
        return params + heads * self.attention_sinks

    def _mla_params(self) -> int:
        assert self.mla is not None
        m, h, heads = self.mla, self.hidden_size, self.num_heads
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        q_in = m.q_lora_rank or h
        q = (h * m.q_lora_rank if m.q_lora_rank else 0) + q_in * heads * qk
        kv = h * (m.kv_lora_rank + m.qk_rope_head_dim)
        kv += m.kv_lora_rank * heads * (m.qk_nope_head_dim + m.v_head_dim)
        params = q + kv + heads * m.v_head_dim * h
        if self.indexer is not None:
            ix = self.indexer
            # wq_b from the q latent, wk and per-head weights from the hidden state, k_norm w+b.
            params += q_in * ix.num_heads * ix.head_dim + h * (ix.head_dim + ix.num_heads)
            params += 2 * ix.head_dim
        return params

    def _linear_attention_params(self) -> int:
        la = self.linear_attention
        if la is None:
            raise InputError("linear_num_key_heads", None, "linear_attention layers need it")
        key = la.num_key_heads * la.key_head_dim
        value = la.num_value_heads * la.value_head_dim
        h = self.hidden_size
        in_proj = h * (2 * key + 2 * value + 2 * la.num_value_heads)  # q,k,v,z and beta,alpha
        conv = (2 * key + value) * la.conv_kernel
        # out_proj, then A_log and dt_bias per value head and the gated norm's weight.
        return in_proj + conv + value * h + 2 * la.num_value_heads + la.value_head_dim

    def _layer_norm_params(self, layer: LayerKind) -> int:
        # Pre-attention and pre-FFN RMSNorm. Gemma's extra sandwich norms (2 more per layer) are
        # left out: a few thousand parameters against billions.
        params = 2 * self.hidden_size
        if self.mla is not None and layer.attention is not AttentionKind.LINEAR:
            params += (self.mla.q_lora_rank or 0) + self.mla.kv_lora_rank
        elif self.qk_norm and layer.attention is not AttentionKind.LINEAR:
            params += 2 * layer.head_dim
        return params

    @property
    def mtp_params(self) -> int:
        """Parameters of the MTP/nextn layers, excluded from total_params.

        Each is one decoder layer like the last one, plus the projection of [embedding; hidden]
        back to hidden and three norms. Checkpoints also store a copy of the embedding and
        lm_head per MTP layer (DeepSeek-V3's 685B = 671B + 14B); that copy is not counted here.
        """
        if not self.nextn_layers:
            return 0
        last = self._layers[-1]
        layer = self._attention_params(last) + self._layer_norm_params(last)
        if last.moe:
            assert self.moe is not None
            layer += self.moe.num_experts * self._ffn_params(self.moe.expert_intermediate_size)
            layer += self.moe.shared_experts * self._ffn_params(
                self.moe.shared_expert_intermediate_size)
            layer += self.hidden_size * self.moe.num_experts
        else:
            layer += self._ffn_params(self.intermediate_size)
        h = self.hidden_size
        return self.nextn_layers * (layer + 2 * h * h + 3 * h)

    # --- KV cache ---------------------------------------------------------------------------

    def _kv_elems(self, layer: LayerKind) -> int:
        """Cache elements one token adds to one layer."""
        if layer.attention is AttentionKind.LINEAR:
            return 0
        if self.mla is not None:
            # One latent "head" shared by all heads; the DSA indexer caches its own key too.
            latent = self.mla.kv_lora_rank + self.mla.qk_rope_head_dim
            return latent + (self.indexer.head_dim if self.indexer else 0)
        # K and V both, also where Gemma-4 derives V from K: engines allocate the pair.
        return 2 * layer.num_kv_heads * layer.head_dim

    def kv_bytes_per_token(self, kv_bytes: float) -> float:
        """Cache bytes per token in all layers, windowed ones included (short-context cost)."""
        return kv_bytes * sum(self._kv_elems(layer) for layer in self._layers)

    def kv_bytes(self, context_len: float, kv_bytes: float) -> float:
        """Cache bytes of one sequence of `context_len` tokens: windowed layers keep at most the
        window, linear-attention layers their fixed state (recurrent_state_bytes)."""
        total = 0.0
        for layer, count in self._counts.items():
            tokens = min(context_len, layer.window) if layer.window else context_len
            total += count * self._kv_elems(layer) * tokens * kv_bytes
        return total + self.recurrent_state_bytes()

    def recurrent_state_bytes(self) -> float:
        """Fixed per-sequence state of the linear-attention layers (0 for other models)."""
        la = self.linear_attention
        layers = sum(k.attention is AttentionKind.LINEAR for k in self._layers)
        if la is None or not layers:
            return 0.0
        state = la.num_value_heads * la.key_head_dim * la.value_head_dim
        conv = (2 * la.num_key_heads * la.key_head_dim + la.num_value_heads * la.value_head_dim)
        return layers * (state + conv * (la.conv_kernel - 1)) * la.state_bytes_per_elem

    # --- FLOPs ------------------------------------------------------------------------------

    def flops_per_token(self, context_len: float, phase: StepPhase, *,
                        logits: bool = True) -> float:
        """Forward FLOPs for one token: 2 per active matmul parameter plus attention.

        DECODE: the new token attends to `context_len` cached tokens. PREFILL: the mean over
        the tokens of a `context_len`-token prompt (causal, so about half the prompt each).
        `logits=False` drops lm_head, which engines run only for a prompt's last token.
        """
        active = self._breakdown_active
        linear = active.total - active.norms - (0 if logits else active.lm_head)
        attention = sum(count * self._attention_flops(layer, context_len, phase)
                        for layer, count in self._counts.items())
        return 2.0 * linear + attention

    def _attention_flops(self, layer: LayerKind, ctx: float, phase: StepPhase) -> float:
        heads = self.num_heads
        if layer.attention is AttentionKind.LINEAR:
            la = self.linear_attention
            assert la is not None
            # State decay, rank-1 update and read-out per value head; the short conv. No context.
            conv = 2 * (2 * la.num_key_heads * la.key_head_dim + la.num_value_heads
                        * la.value_head_dim) * la.conv_kernel
            return 6.0 * la.num_value_heads * la.key_head_dim * la.value_head_dim + conv
        attended = attended_keys(layer.attention, layer.window, ctx, phase)
        if self.mla is None:
            return 4.0 * heads * layer.head_dim * attended  # QK^T and PV, 2 FLOPs per MAC
        m = self.mla
        if phase is StepPhase.DECODE:
            # Engines decode with the up-projections absorbed: scores over latent+rope, values
            # over the latent. Same matmul FLOPs (counted in active params), wider attention.
            per_token = 2 * heads * (2 * m.kv_lora_rank + m.qk_rope_head_dim)
        else:
            per_token = 2 * heads * (m.qk_nope_head_dim + m.qk_rope_head_dim + m.v_head_dim)
        if self.indexer is None:
            return per_token * attended
        ix = self.indexer
        # The indexer scores every token; the attention proper reads only the top-k.
        picked = attended_keys(AttentionKind.SLIDING, ix.topk, ctx, phase)
        return per_token * picked + 2.0 * ix.num_heads * ix.head_dim * attended


# --- reading configs: the file work lives in hf_config.py and bundled.py (they import this
# module's types, so they are imported late) ---


def parse_hf_config(
    source: str | os.PathLike[str] | Mapping[str, Any],
    model_id: str | None = None,
    *,
    hf_quant_config: str | os.PathLike[str] | Mapping[str, Any] | None = None,
) -> ModelArch:
    """Read a Hugging Face config.json: a path, a folder holding one, or the parsed mapping.

    Multimodal configs are read through their `text_config`. A path's ModelOpt companion
    (hf_quant_config.json beside it) is picked up unless `hf_quant_config` is given. Malformed
    input raises InputError whose field is the json key ("text_config.hidden_size").
    """
    from trilemma.optimizer.catalog import hf_config  # imported late: it imports this module

    return hf_config.parse_hf_config(source, model_id, hf_quant_config=hf_quant_config)


def load_model(id_or_path: str | os.PathLike[str]) -> ModelArch:
    """A bundled id or alias (any case, `--` for `/`), else a local config.json or its folder.

    Bundled models are parsed once per process; an unknown id raises UnknownModelError saying
    how to pass a config.json instead.
    """
    from trilemma.optimizer.catalog import bundled  # imported late: it imports this module

    return bundled.load_model(id_or_path)


def bundled_id(spelling: str) -> str | None:
    """The bundled id `spelling` names (any case, an alias), or None; reads no files, so it is
    safe on untrusted input."""
    from trilemma.optimizer.catalog import bundled

    return bundled.bundled_id(spelling)


def bundled_models() -> tuple[str, ...]:
    """Every id load_model knows without a path: bundled configs and their variants."""
    from trilemma.optimizer.catalog import bundled

    return bundled.bundled_models()
