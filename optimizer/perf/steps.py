"""Time of one engine step (one forward pass over a batch), built from per-layer operations.

A step carries `dec_seqs` decoding sequences (each verifying `q` tokens: 1 without
speculation, k+1 with it) at KV length `dec_kv`, plus a prefill chunk of `pf_tokens` tokens
over `pf_seqs` sequences whose context reaches `pf_kv` tokens. All counts are per attention
replica (per DP rank) and may be numpy arrays; times are milliseconds, summed over every layer
of the model (one pass through all pipeline stages).

Per layer: QKV and output GEMMs, attention (prefill: causal over the new tokens, the cached
prefix read not recomputed; decode: the KV bytes read), the MLP GEMMs or the fused MoE with
its router and shared experts, two TP all-reduces, the DP all-gather/reduce-scatter around
MoE layers, and the small element-wise kernels. Per step: lm_head, PP send/recv, and the
engine's fixed overhead.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from trilemma.optimizer.catalog.gpus import Gpu
from trilemma.optimizer.catalog.models import ModelArch
from trilemma.optimizer.catalog.quantization import KvDtype, QuantRecipe
from trilemma.optimizer.perf import (
    context_parallel,
    deepep,
    dp_lockstep,
    hybrid_layers,
    kernel_forms,
    kernels,
    memory,
)
from trilemma.optimizer.perf.arrays import FloatArray
from trilemma.optimizer.perf.engine import EngineFacts

ACT_BYTES = 2.0  # activations travel in bf16


@dataclass(frozen=True, kw_only=True)
class StepTime:
    """Milliseconds per step by operation family (arrays)."""

    gemm: FloatArray
    attention: FloatArray
    moe: FloatArray
    comm: FloatArray
    other: FloatArray

    @property
    def total(self) -> FloatArray:
        return self.gemm + self.attention + self.moe + self.comm + self.other


@dataclass(frozen=True, kw_only=True)
class LayerCounts:
    """How many layers of each kind the model has: the step sums per-kind costs."""

    dense: int
    moe: int
    full_attention: int
    sliding_attention: int
    linear_attention: int = 0  # Gated DeltaNet layers: no KV cache, priced in hybrid_layers




def layer_counts(arch: ModelArch) -> LayerCounts:
    if arch.moe is None:
        moe_layers = 0
    else:
        interval = max(arch.moe.moe_layer_interval, 1)
        moe_layers = (arch.num_layers - arch.moe.first_dense_layers) // interval
    linear = hybrid_layers.counts(arch).linear
    return LayerCounts(dense=arch.num_layers - moe_layers, moe=moe_layers,
                       full_attention=arch.num_layers - arch.sliding_layers - linear,
                       sliding_attention=arch.sliding_layers, linear_attention=linear)


def gemm_kernel(arch: ModelArch, recipe: QuantRecipe, gpu: Gpu, part: str = "") -> str:
    """Calibration key of the GEMM kernel vLLM runs for `part` of the model.

    A checkpoint served in its own format leaves the parts its quantization config excludes
    in bf16 (gpt-oss attention, Kimi-K2.5 everything but the experts).
    """
    if arch.checkpoint_quant == recipe.value and part in arch.unquantized_parts:
        return "bf16"
    if recipe is QuantRecipe.MXFP4 and part == "routed_experts" and not gpu.supports("fp4"):
        # Without fp4 tensor cores vLLM runs MXFP4 experts as W4A16 (Triton / Marlin), which
        # AIConfigurator measured as w4a16_mxfp4; Blackwell runs them natively.
        return "mxfp4"
    key = recipe.gemm_kernel_key(gpu)
    # Block-scaled fp8 checkpoints (DeepSeek, Qwen3-FP8, MiniMax) run vLLM's block-scaled
    # kernels; fp8 quantized on the fly from bf16 uses per-tensor scales.
    if key == "fp8" and arch.checkpoint_quant == "fp8":
        return "fp8_block"
    return key


class StepModel:
    """Step times for one (model, GPU, quantization, KV dtype) under one engine.

    Construct once per group of candidates; `step` is vectorized over everything else.
    """

    def __init__(self, arch: ModelArch, gpu: Gpu, recipe: QuantRecipe, kv: KvDtype,
                 facts: EngineFacts) -> None:
        self.arch = arch
        self.gpu = gpu
        self.recipe = recipe
        self.kv = kv
        self.facts = facts
        # Both engines capture their decode passes in CUDA graphs: no eager CPU floors. Each
        # runs its own kernels where they were measured (perf/engine_kernels.py).
        self.km = kernels.kernel_model(gpu.key, datasheet=kernels_datasheet(gpu),
                                       cuda_graphs=True, engine=facts.engine.value)
        self.layers = layer_counts(arch)
        self.hybrid = hybrid_layers.counts(arch)
        self.attn_kernel = gemm_kernel(arch, recipe, gpu, "attention")
        self.mlp_kernel = gemm_kernel(arch, recipe, gpu, "dense_mlp")
        self.shared_kernel = gemm_kernel(arch, recipe, gpu, "shared_experts")
        self.moe_kernel = gemm_kernel(arch, recipe, gpu, "routed_experts")
        # The measured MLA modules (projections + attention) have DeepSeek-V3's geometry;
        # other MLA models are priced from generic GEMMs and attention.
        self.mla_module = arch.mla is not None and _has_dsv3_geometry(arch)
        # SGLang runs DeepSeek/Qwen3 MoE over DeepEP's all-to-all under attention DP.
        self.deepep = deepep.DeepEP.for_model(self.km, gpu, arch, facts)

    # The public entry point of the hot path.
    def step(self, *, tp: npt.ArrayLike, dp: npt.ArrayLike, ep: npt.ArrayLike,
             pp: npt.ArrayLike, dec_seqs: npt.ArrayLike, dec_kv: npt.ArrayLike,
             q: npt.ArrayLike = 1.0, pf_tokens: npt.ArrayLike = 0.0,
             pf_seqs: npt.ArrayLike = 0.0, pf_kv: npt.ArrayLike = 0.0,
             cp: npt.ArrayLike = 1.0, pf_ranks: npt.ArrayLike | None = None) -> StepTime:
        """Scalars or arrays in (they broadcast), arrays out. `cp`: decode context parallel
        ranks within the TP group (perf/context_parallel.py); 1 is none. `pf_ranks`: how
        many attention-DP ranks carry such a prefill chunk in this step (None: all of them;
        every rank carries the decode batch)."""
        a = self.arch
        L = self.layers
        f64 = np.float64
        tp = np.asarray(tp, dtype=f64)
        dp = np.asarray(dp, dtype=f64)
        pp = np.asarray(pp, dtype=f64)
        ep = np.asarray(ep, dtype=bool)
        dec_seqs = np.asarray(dec_seqs, dtype=f64)
        dec_kv = np.asarray(dec_kv, dtype=f64)
        q = np.asarray(q, dtype=f64)
        pf_tokens = np.asarray(pf_tokens, dtype=f64)
        pf_seqs = np.asarray(pf_seqs, dtype=f64)
        pf_kv = np.asarray(pf_kv, dtype=f64)
        cp = np.asarray(cp, dtype=f64)
        tokens = np.maximum(dec_seqs * q + pf_tokens, 1.0)
        # The tokens every DP rank brings to the MoE layers (perf/dp_lockstep.py).
        gathered = dp_lockstep.moe_tokens(tokens, dec_seqs * q, pf_tokens, dp, pf_ranks)
        # DCP: the decode attention kernels see the heads of tp/cp ranks over 1/cp of the KV.
        dec_div, dec_kv_rank = context_parallel.decode_split(tp, cp, dec_kv)
        h = a.hidden_size

        if self.mla_module:
            gemm = np.zeros_like(tokens)
            attn = self._mla_module(tp, dec_seqs, (dec_div, dec_kv_rank), q, pf_tokens,
                                    pf_seqs, pf_kv)
        else:
            gemm = self._attention_gemms(tokens, tp) * (a.num_layers - L.linear_attention)
            attn = self._attention_core(tp, dec_seqs, (dec_div, dec_kv_rank), q, pf_tokens,
                                        pf_seqs, pf_kv)
        # Where the prefill chunk's sequences end (pf_kv may be a mean below one prompt).
        pf_end = np.maximum(pf_kv, pf_tokens / np.maximum(pf_seqs, 1.0))
        gemm = gemm + self._hybrid_gemms(tokens, tp, dec_seqs * q, pf_tokens, pf_end)
        attn = attn + self._hybrid_core(tp, dec_seqs * q, dec_kv, pf_tokens, pf_seqs, pf_end)
        mlp_dense = self._dense_mlp(tokens, tp, a.intermediate_size, self.mlp_kernel)
        gemm = gemm + mlp_dense * L.dense
        moe = self._moe_layer(tokens, gathered, tp, dp, ep) * L.moe

        # Two all-reduces per layer over the TP group (after attention, after the MLP).
        # Collectives are priced only where a layout has them: the hot path skips the rest.
        msg = tokens * h * ACT_BYTES
        comm = np.zeros(np.broadcast(tp, tokens).shape)
        if np.any(tp > 1):
            comm = comm + np.where(tp > 1,
                                   2.0 * a.num_layers * self.km.allreduce_ms(tp, msg), 0.0)
        if a.qk_norm_spans_heads and np.any(tp > 1):
            # q/k norms over all heads: one all-reduce of two fp32 variances per token.
            comm = comm + np.where(tp > 1, a.num_layers * self.km.allreduce_ms(
                tp, tokens * 2.0 * 4.0), 0.0)
        if L.moe and np.any(dp > 1):
            comm = comm + np.where(dp > 1, L.moe * self._dp_moe_comm(
                tokens, gathered, pf_tokens > 0.0, tp * dp, ep), 0.0)
        if np.any(pp > 1):
            # Pipeline: each stage boundary sends the hidden states of the micro-batch, over
            # NVLink inside the domain (an NVL72 rack spans trays), else the scale-out network.
            inter_node = tp * dp * pp > self.gpu.nvlink_reach(self.gpu.gpus_per_node)
            comm = comm + np.where(pp > 1, (pp - 1) * self.km.p2p_ms(msg, inter_node), 0.0)
        if np.any(cp > 1):
            cached = pf_seqs * np.maximum(pf_kv - pf_tokens / np.maximum(pf_seqs, 1.0), 0.0)
            comm = comm + np.where(cp > 1, self._context_parallel_comm(
                tp, cp, tokens, dec_seqs * q, cached), 0.0)

        gemm = gemm + self.km.gemm_ms("bf16", np.maximum(dec_seqs * q + pf_seqs, 1.0),
                                      a.vocab_size / tp, h)  # the LM head's logits rows

        other = self._elementwise(tokens, tp) * a.num_layers
        other = other + self.facts.exposed_step_overhead_ms(gemm + attn + moe + comm + other)
        return StepTime(gemm=gemm, attention=attn, moe=moe, comm=comm, other=other)

    def _dp_moe_comm(self, tokens: np.ndarray, gathered: np.ndarray, prefill: np.ndarray,
                     group: np.ndarray, ep: np.ndarray) -> FloatArray:
        """One MoE layer's traffic under attention DP: every rank's tokens gathered into the
        layer and scattered back, or (SGLang, DeepEP's models, EP) dispatched only to the
        ranks holding their experts and combined back (perf/deepep.py)."""
        msg = gathered * self.arch.hidden_size * ACT_BYTES
        out: FloatArray = self.km.allgather_ms(group, msg) + self.km.reduce_scatter_ms(group, msg)
        if self.deepep is not None and np.any(ep):
            out = np.where(ep, self.deepep.layer_ms(tokens, prefill, group), out)
        return out

    def _attention_gemms(self, tokens: np.ndarray, tp: np.ndarray) -> FloatArray:
        a = self.arch
        k = self.attn_kernel
        if a.mla is not None:
            return self._mla_gemms(tokens, tp)
        heads = a.num_heads / tp
        kv_heads = np.maximum(a.num_kv_heads / tp, 1.0)
        # Qwen3.5's gated attention: q_proj also emits a sigmoid gate as wide as the queries.
        q_heads = heads * (2.0 if a.attention_output_gate else 1.0)
        qkv = self.km.gemm_ms(k, tokens, (q_heads + 2.0 * kv_heads) * a.head_dim, a.hidden_size)
        out = self.km.gemm_ms(k, tokens, a.hidden_size, heads * a.head_dim)
        return qkv + out

    def _mla_gemms(self, tokens: np.ndarray, tp: np.ndarray) -> FloatArray:
        """DeepSeek MLA projections: q down/up (or plain q), kv down, kv up, output."""
        a = self.arch
        m = a.mla
        assert m is not None
        k = self.attn_kernel
        heads = a.num_heads / tp
        qk_dim = m.qk_nope_head_dim + m.qk_rope_head_dim
        if m.q_lora_rank:
            q = self.km.gemm_ms(k, tokens, m.q_lora_rank, a.hidden_size) + self.km.gemm_ms(
                k, tokens, heads * qk_dim, m.q_lora_rank)
        else:
            q = self.km.gemm_ms(k, tokens, heads * qk_dim, a.hidden_size)
        kv_down = self.km.gemm_ms(k, tokens, m.kv_lora_rank + m.qk_rope_head_dim, a.hidden_size)
        kv_up = self.km.gemm_ms(k, tokens, heads * (m.qk_nope_head_dim + m.v_head_dim),
                                m.kv_lora_rank)
        out = self.km.gemm_ms(k, tokens, a.hidden_size, heads * m.v_head_dim)
        return q + kv_down + kv_up + out

    def _attention_core(self, tp: np.ndarray, dec_seqs: np.ndarray,
                        dec_split: tuple[np.ndarray, np.ndarray], q: np.ndarray,
                        pf_tokens: np.ndarray, pf_seqs: np.ndarray,
                        pf_kv: np.ndarray) -> FloatArray:
        """Attention kernels per step; `dec_split` is (head divisor, KV tokens per rank) of
        the decode kernel, (tp, dec_kv) without context parallelism."""
        a = self.arch
        dec_div, dec_kv = dec_split
        L = self.layers
        kv = self.kv.value
        if a.mla is not None:
            heads = a.num_heads / tp
            m = a.mla
            kv_heads = np.ones_like(heads)
            head_dim = m.kv_lora_rank + m.qk_rope_head_dim
        else:
            heads = a.num_heads / tp
            kv_heads = np.maximum(a.num_kv_heads / tp, 1.0)
            head_dim = a.head_dim
        has_pf = pf_seqs > 0
        pf_b = np.maximum(pf_seqs, 1.0)
        pf_q = np.maximum(pf_tokens / pf_b, 1.0)
        pf_ctx = np.maximum(pf_kv, pf_q)
        has_dec = dec_seqs > 0
        dec_b = np.maximum(dec_seqs, 1.0)
        # Speculative verification reads each sequence's KV once for its q tokens; the extra
        # query rows cost compute that is small next to the KV read at decode batch sizes.
        dec_scale = 1.0 + 0.1 * (q - 1.0)
        total = np.zeros(np.broadcast(tp, dec_seqs, pf_tokens).shape)
        # DSA: the MLA reads only the indexer's top-k keys, a window of topk keys per query.
        for layers, window in ((L.full_attention, hybrid_layers.sparse_window(a)),
                               (L.sliding_attention, a.sliding_window or 0)):
            if not layers:
                continue
            ctx = self.km.context_attention_ms(pf_b, pf_q, pf_ctx, heads, kv_heads, head_dim,
                                               kv, window)
            dec_heads = a.num_heads / dec_div
            dec_kv_heads = np.ones_like(dec_heads) if a.mla is not None else np.maximum(
                a.num_kv_heads / dec_div, 1.0)
            dec = self.km.decode_attention_ms(dec_b, dec_kv, dec_heads, dec_kv_heads, head_dim,
                                              kv, window) * dec_scale
            total = total + layers * (np.where(has_pf, ctx, 0.0) + np.where(has_dec, dec, 0.0))
        return total

    def _mla_module(self, tp: np.ndarray, dec_seqs: np.ndarray,
                    dec_split: tuple[np.ndarray, np.ndarray], q: np.ndarray,
                    pf_tokens: np.ndarray, pf_seqs: np.ndarray,
                    pf_kv: np.ndarray) -> FloatArray:
        """Whole MLA attention modules per layer, from the measured DeepSeek-V3 tables;
        `dec_split` as in _attention_core."""
        a = self.arch
        dec_div, dec_kv = dec_split
        m = a.mla
        assert m is not None
        kv = self.kv.value
        heads = a.num_heads / tp
        pf_b = np.maximum(pf_seqs, 1.0)
        pf_q = np.maximum(pf_tokens / pf_b, 1.0)
        pf_ctx = np.maximum(pf_kv, pf_q)
        ctx = self.km.mla_context_ms(self.attn_kernel, pf_b, pf_q, heads, kv)
        # The module tables have no cached prefix: add the attention over it, priced by the
        # generic kernel on the decompressed heads.
        qk = m.qk_nope_head_dim + m.qk_rope_head_dim
        prefix = (self.km.context_attention_ms(pf_b, pf_q, pf_ctx, heads, heads, qk, kv)
                  - self.km.context_attention_ms(pf_b, pf_q, pf_q, heads, heads, qk, kv))
        ctx = ctx + np.maximum(prefix, 0.0)
        dec = self.km.mla_decode_ms(self.attn_kernel, np.maximum(dec_seqs, 1.0), dec_kv,
                                    a.num_heads / dec_div, kv) * (1.0 + 0.1 * (q - 1.0))
        per_layer = np.where(pf_seqs > 0, ctx, 0.0) + np.where(dec_seqs > 0, dec, 0.0)
        return per_layer * a.num_layers

    def _hybrid_gemms(self, tokens: np.ndarray, tp: np.ndarray, dec_rows: np.ndarray,
                      pf_tokens: np.ndarray, pf_end: np.ndarray) -> FloatArray:
        """Projections of the Gated DeltaNet layers and of the DSA indexer (hybrid_layers);
        `pf_end`: the context the prefill chunk's sequences reach."""
        a, H = self.arch, self.hybrid
        out: FloatArray = np.zeros(np.broadcast(tp, tokens).shape)
        if H.linear:
            out = out + H.linear * hybrid_layers.gdn_gemms_ms(self.km, self.attn_kernel, a,
                                                              tokens, tp)
        if H.indexed:
            scored = hybrid_layers.scores(a, pf_end, self.facts.engine)
            scoring = dec_rows + np.where(scored, pf_tokens, 0.0)
            out = out + H.indexed * hybrid_layers.indexer_gemms_ms(self.km, self.attn_kernel,
                                                                   a, tokens, scoring)
        return out

    def _hybrid_core(self, tp: np.ndarray, dec_rows: np.ndarray, dec_kv: np.ndarray,
                     pf_tokens: np.ndarray, pf_seqs: np.ndarray,
                     pf_end: np.ndarray) -> FloatArray:
        """The delta rule of the linear-attention layers and the indexer's scoring and top-k
        (hybrid_layers); `dec_rows` counts verified tokens, each a state update or a scan."""
        a, H = self.arch, self.hybrid
        launch = self.facts.kernel_launch_us / 1e3
        out: FloatArray = np.zeros(np.broadcast(tp, dec_rows, pf_tokens).shape)
        if H.linear:
            out = out + H.linear * hybrid_layers.gdn_core_ms(self.km, self.gpu, a, tp,
                                                             pf_tokens, dec_rows, launch)
        if H.indexed:
            # A prefill query scores its cached prefix and, causally, half its own prompt.
            per_seq = pf_tokens / np.maximum(pf_seqs, 1.0)
            keys = np.maximum(pf_end - 0.5 * per_seq, 0.5 * per_seq)
            out = out + H.indexed * hybrid_layers.indexer_core_ms(
                self.km, self.gpu, a, pf_tokens=pf_tokens, pf_keys=keys,
                pf_scored=hybrid_layers.scores(a, pf_end, self.facts.engine),
                dec_seqs=dec_rows, dec_kv=dec_kv, launch_ms=launch)
        return out

    def _context_parallel_comm(self, tp: np.ndarray, cp: np.ndarray, tokens: np.ndarray,
                               dec_tokens: np.ndarray, cached: np.ndarray) -> FloatArray:
        """DCP's collectives over the cp ranks, every layer (vLLM's default ag_rs backend):
        the query all-gather and partial-output reduce-scatter around the sharded-cache
        attention. MLA runs it for the decode tokens (absorbed) and gathers the cached
        context's latent for prefill (mla_attention.py); GQA runs every token through it
        (flash_attn.py _forward_with_dcp)."""
        a = self.arch
        rows = dec_tokens if a.mla is not None else tokens
        gather, scatter = context_parallel.exchange_bytes(a, tp, cp, rows)
        ms = np.where(rows > 0, self.km.allgather_ms(cp, gather)
                      + self.km.reduce_scatter_ms(cp, scatter), 0.0)
        per_layer_kv = memory.per_layer_kv_bytes(a, self.kv, tp)
        gathered = context_parallel.context_gather_bytes(a, per_layer_kv, cached)
        if np.any(gathered > 0):
            ms = ms + np.where(gathered > 0, self.km.allgather_ms(cp, gathered), 0.0)
        out: FloatArray = self.layers.full_attention * ms
        return out

    def _dense_mlp(self, tokens: np.ndarray, tp: np.ndarray, width: float,
                   kernel: str) -> FloatArray:
        if width <= 0:
            return np.zeros_like(tokens)
        a = self.arch
        up = (2.0 if a.gated_mlp else 1.0) * width / tp
        return self.km.gemm_ms(kernel, tokens, up, a.hidden_size) + self.km.gemm_ms(
            kernel, tokens, a.hidden_size, width / tp)

    def _moe_layer(self, tokens: np.ndarray, gathered: np.ndarray, tp: np.ndarray,
                   dp: np.ndarray, ep: np.ndarray) -> FloatArray:
        a = self.arch
        moe = a.moe
        if moe is None:
            return np.zeros_like(tokens)
        group = tp * dp
        moe_tp = np.where(ep, 1.0, group)
        moe_ep = np.where(ep, group, 1.0)
        # Every rank's tokens meet in the MoE layer under attention DP.
        experts = self.km.moe_ms(self.moe_kernel, gathered, a.hidden_size,
                                 moe.expert_intermediate_size, moe.experts_per_token,
                                 moe.num_experts, moe_tp, moe_ep)
        router = self.km.gemm_ms("bf16", tokens, moe.num_experts, a.hidden_size)
        shared: FloatArray = np.zeros_like(tokens)
        if moe.shared_experts:
            shared = self._dense_mlp(tokens, tp,
                                     moe.shared_experts * moe.shared_expert_intermediate_size,
                                     self.shared_kernel)
        return experts + router + shared

    def _elementwise(self, tokens: np.ndarray, tp: np.ndarray) -> FloatArray:
        """Norms, rotary, activation and quantization kernels: launch floor + bytes moved."""
        a = self.arch
        width = a.intermediate_size or (a.moe.expert_intermediate_size if a.moe else 0)
        moved = tokens * ACT_BYTES * (8.0 * a.hidden_size + 3.0 * width / tp)
        launch = self.facts.elementwise_kernels_per_layer * self.facts.kernel_launch_us / 1e3
        return launch + moved / (self.gpu.memory_bw * 0.7) * 1e3


def _has_dsv3_geometry(arch: ModelArch) -> bool:
    m = arch.mla
    g = kernel_forms.DSV3_MLA
    return m is not None and (arch.hidden_size, m.q_lora_rank, m.kv_lora_rank,
                              m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim) == (
        g["hidden"], g["q_lora_rank"], g["kv_lora_rank"], g["qk_nope_head_dim"],
        g["qk_rope_head_dim"], g["v_head_dim"])


def kernels_datasheet(gpu: Gpu) -> kernels.DatasheetRates:
    return kernels.DatasheetRates(dense_flops=gpu.dense_flops, memory_bw=gpu.memory_bw,
                                  intra_node_bw=gpu.intra_node_bw,
                                  inter_node_bw=gpu.inter_node_bw,
                                  nvlink_domain=gpu.scale_up_gpus,
                                  scale_out_bw=gpu.scale_out_bw,
                                  extrapolate_from=gpu.extrapolated_from,
                                  softmax_exp_ratio=gpu.softmax_exp_ratio)
