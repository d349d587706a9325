"""GPU memory of one replica: weights, activations, runtime reserves, and what is left for KV.

Everything is per GPU, vectorized over layouts and engine limits. "Does not fit" is a result
(`MemoryBreakdown.fits` False with a reason), never an exception: the search prunes on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from trilemma.optimizer.catalog.gpus import Gpu
from trilemma.optimizer.catalog.models import ModelArch
from trilemma.optimizer.catalog.quantization import KvDtype, QuantRecipe
from trilemma.optimizer.perf import hybrid_layers
from trilemma.optimizer.perf.arrays import BoolArray, FloatArray
from trilemma.optimizer.perf.engine import EngineFacts

BF16_BYTES = 2.0
# Sampling upcasts the logits of every scheduled sequence to float32.
LOGIT_BYTES = 4.0


@dataclass(frozen=True, kw_only=True)
class MemoryBreakdown:
    """Bytes per GPU (arrays broadcast over the candidates)."""

    capacity: FloatArray          # HBM x gpu_memory_utilization
    weights: FloatArray
    activations: FloatArray
    runtime: FloatArray           # CUDA context, graphs, NCCL buffers
    kv_cache: FloatArray          # what remains for KV blocks (may be negative)
    state_pool: FloatArray        # SGLang's recurrent-state pool of a hybrid model (else 0)
    kv_bytes_per_token: FloatArray  # per GPU, full-attention layers of one stage
    max_seqs: FloatArray          # sequences of the given length that fit in the KV cache
    kv_tokens: FloatArray         # KV capacity in tokens at that length

    @property
    def fits(self) -> BoolArray:
        return self.max_seqs >= 1


@dataclass(frozen=True, kw_only=True)
class WeightBytes:
    """Bytes per parameter by component: quantization leaves some parts in bf16."""

    attention: float
    mlp: float
    shared: float
    experts: float


def weight_bytes(arch: ModelArch, recipe: QuantRecipe) -> WeightBytes:
    """A checkpoint in its own format keeps the parts its quantization config excludes in bf16
    (gpt-oss: everything but the experts); a recipe applied on the fly covers every linear."""
    w = recipe.weight_bytes
    if arch.checkpoint_quant != recipe.value:
        return WeightBytes(attention=w, mlp=w, shared=w, experts=w)
    kept = arch.unquantized_parts

    def part(name: str) -> float:
        return BF16_BYTES if name in kept else w

    return WeightBytes(attention=part("attention"), mlp=part("dense_mlp"),
                       shared=part("shared_experts"), experts=part("routed_experts"))


def weights_per_gpu(arch: ModelArch, recipe: QuantRecipe, tp: npt.ArrayLike,
                    pp: npt.ArrayLike, dp: npt.ArrayLike) -> FloatArray:
    """Weight bytes on the most loaded GPU of a replica.

    Attention and dense MLP are sliced over tp and replicated over dp; routed experts are spread
    over all tp*dp GPUs of a stage (tensor- or expert-parallel alike); embeddings and lm_head are
    vocab-parallel over tp and live on the first and last pipeline stage.
    """
    b = arch.param_breakdown()
    wb = weight_bytes(arch, recipe)
    tp = np.asarray(tp, dtype=np.float64)
    pp = np.asarray(pp, dtype=np.float64)
    dp = np.asarray(dp, dtype=np.float64)
    layers = (b.attention * wb.attention + b.dense_mlp * wb.mlp
              + b.shared_experts * wb.shared) / tp
    layers = layers + b.routed_experts * wb.experts / (tp * dp)
    layers = layers + (b.router + b.norms) * BF16_BYTES
    vocab = np.where(pp > 1, max(b.embedding, b.lm_head), b.embedding + b.lm_head)
    total: FloatArray = layers / pp + vocab * BF16_BYTES / tp
    return total


def kv_bytes_per_token_per_gpu(arch: ModelArch, kv: KvDtype, tp: npt.ArrayLike,
                               pp: npt.ArrayLike, cp: npt.ArrayLike = 1) -> FloatArray:
    """KV bytes one token costs on one GPU, summed over the full-attention layers of a stage
    (linear-attention layers keep no KV). Decode context parallelism spreads a sequence's
    tokens over cp ranks: 1/cp per GPU."""
    full_layers = _full_layers(arch)
    return (per_layer_kv_bytes(arch, kv, tp) * full_layers
            / (np.asarray(pp, dtype=np.float64) * np.asarray(cp, dtype=np.float64)))


def per_layer_kv_bytes(arch: ModelArch, kv: KvDtype, tp: npt.ArrayLike) -> FloatArray:
    tp = np.asarray(tp, dtype=np.float64)
    if arch.mla is not None:
        # The MLA latent has no heads to slice: every TP rank keeps the whole of it, and the
        # replicated DSA indexer its FP8 index keys beside it.
        latent = (arch.mla.kv_lora_rank + arch.mla.qk_rope_head_dim) * kv.bytes
        return np.full(tp.shape, latent + hybrid_layers.index_cache_bytes_per_token(arch))
    kv_heads = np.maximum(arch.num_kv_heads / tp, 1.0)
    return 2.0 * kv_heads * arch.head_dim * kv.bytes


def kv_bytes_per_seq(arch: ModelArch, kv: KvDtype, tp: npt.ArrayLike, pp: npt.ArrayLike,
                     seq_len: npt.ArrayLike, block: int, cp: npt.ArrayLike = 1) -> FloatArray:
    """Bytes one sequence of `seq_len` tokens holds on one GPU; sliding layers keep a window.
    Under decode context parallelism each of cp ranks holds 1/cp of its tokens, in blocks."""
    seq_len = np.asarray(seq_len, dtype=np.float64) / np.asarray(cp, dtype=np.float64)
    blocks = np.ceil(seq_len / block) * block
    per_layer = per_layer_kv_bytes(arch, kv, tp)
    full = _full_layers(arch) * blocks
    window = arch.sliding_window or 0
    sliding = arch.sliding_layers * np.minimum(blocks, window + block)
    held: FloatArray = full + sliding
    return per_layer * held / np.asarray(pp, dtype=np.float64)


def _full_layers(arch: ModelArch) -> int:
    return arch.num_layers - arch.sliding_layers - hybrid_layers.counts(arch).linear


def state_pool_bytes(rest: FloatArray, per_seq_state: FloatArray,
                     state_ratio: float | None) -> FloatArray:
    """The recurrent-state pool a hybrid (linear-attention) model sets aside out of the
    memory left after weights. SGLang splits that memory up front, `state_ratio` : 1 between
    the state pool and the KV pool (`--mamba-full-memory-ratio`, 0.9); vLLM's hybrid
    allocator keeps states in the KV pool itself (None: no separate pool)."""
    rest = np.maximum(rest, 0.0)
    if state_ratio is None:
        return np.zeros_like(rest)
    out: FloatArray = np.where(per_seq_state > 0, rest * state_ratio / (1.0 + state_ratio), 0.0)
    return out


def seqs_that_fit(kv_pool: FloatArray, state_pool: FloatArray, per_seq_kv: FloatArray,
                  per_seq_state: FloatArray) -> FloatArray:
    """Sequences that fit: each holds its KV and, in a hybrid model, its recurrent state,
    either in their own pools (SGLang) or in one shared pool (`state_pool` 0)."""
    kv_pool = np.maximum(kv_pool, 0.0)
    shared = np.floor(kv_pool / (per_seq_kv + per_seq_state))
    split = np.minimum(np.floor(kv_pool / per_seq_kv),
                       np.floor(state_pool / np.maximum(per_seq_state, 1e-9)))
    out: FloatArray = np.where(state_pool > 0, split, shared)
    return out


def activations_per_gpu(arch: ModelArch, tp: npt.ArrayLike, dp: npt.ArrayLike,
                        max_batched_tokens: npt.ArrayLike,
                        max_seqs: npt.ArrayLike) -> FloatArray:
    """Peak activation bytes of vLLM's profiling run (a forward pass at the token budget).

    The largest live tensors: the residual stream and its normed copy, the QKV output, the MLP
    (or fused-MoE) intermediate, and float32 logits for max_num_seqs sequences in the sampler.
    """
    tp = np.asarray(tp, dtype=np.float64)
    dp = np.asarray(dp, dtype=np.float64)
    tokens = np.asarray(max_batched_tokens, dtype=np.float64)
    h = arch.hidden_size
    qkv = (arch.num_heads + 2 * arch.num_kv_heads) * arch.head_dim / tp
    mlp = 3.0 * arch.intermediate_size / tp
    if arch.moe is not None:
        moe = arch.moe
        # Fused MoE keeps gate/up outputs for every (token, chosen expert) pair of its shard.
        routed = moe.experts_per_token * 3.0 * moe.expert_intermediate_size / (tp * dp)
        mlp = np.maximum(mlp, np.maximum(routed, 2.0 * h * moe.experts_per_token / (tp * dp)))
    per_token: FloatArray = (4.0 * h + qkv + mlp) * BF16_BYTES
    logits: FloatArray = (np.asarray(max_seqs, dtype=np.float64) * arch.vocab_size / tp
                          * LOGIT_BYTES)
    return tokens * per_token + logits


def breakdown(arch: ModelArch, gpu: Gpu, recipe: QuantRecipe, kv: KvDtype, facts: EngineFacts,
              *, tp: npt.ArrayLike, pp: npt.ArrayLike, dp: npt.ArrayLike,
              seq_len: npt.ArrayLike, max_batched_tokens: npt.ArrayLike,
              max_num_seqs: npt.ArrayLike,
              gpu_memory_utilization: float | None = None,
              cp: npt.ArrayLike = 1) -> MemoryBreakdown:
    """Per-GPU memory of the layouts. `cp` (decode context parallel ranks, within TP) shards
    the KV cache only: weights, activations and buffers are those of the TP layout."""
    util = facts.gpu_memory_utilization if gpu_memory_utilization is None \
        else gpu_memory_utilization
    tp, pp, dp, seq_len, max_batched_tokens, max_num_seqs = np.broadcast_arrays(
        *(np.asarray(x, dtype=np.float64)
          for x in (tp, pp, dp, seq_len, max_batched_tokens, max_num_seqs)))
    capacity = np.full(tp.shape, gpu.memory_bytes * util)
    weights = weights_per_gpu(arch, recipe, tp, pp, dp)
    acts = activations_per_gpu(arch, tp, dp, max_batched_tokens, max_num_seqs)
    runtime = facts.runtime_memory_bytes + facts.nccl_bytes(tp * dp)
    rest = capacity - weights - acts - runtime
    per_seq = kv_bytes_per_seq(arch, kv, tp, pp, seq_len, facts.block_size, cp)
    state = hybrid_layers.recurrent_state_bytes_per_gpu(arch, tp) / pp
    state_pool = state_pool_bytes(rest, state, facts.state_memory_ratio)
    kv_cache = rest - state_pool
    max_seqs = seqs_that_fit(kv_cache, state_pool, per_seq, state)
    return MemoryBreakdown(
        capacity=capacity,
        weights=weights,
        activations=acts,
        runtime=runtime,
        kv_cache=kv_cache,
        state_pool=state_pool,
        kv_bytes_per_token=kv_bytes_per_token_per_gpu(arch, kv, tp, pp, cp),
        max_seqs=max_seqs,
        kv_tokens=max_seqs * seq_len,
    )
