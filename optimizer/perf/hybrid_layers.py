"""Attention that is not (only) softmax over the whole cache: Gated DeltaNet linear-attention
layers (Qwen3.5, Qwen3-Next) and the lightning indexer of DeepSeek sparse attention (GLM-5,
DeepSeek-V3.2). steps.py adds these per-layer costs to the step; counts in `HybridCounts`.

Gated DeltaNet (fla-org/flash-linear-attention `chunk_gated_delta_rule`, run by vLLM and
SGLang alike). Prefill works in chunks of 64 tokens: inside a chunk, the beta K K^T system
and the W/U recomputation (matmuls of width `CHUNK`); across chunks, the K x V state of every
value head is updated and read out (three K x V products per token) and stored once per chunk
for the output kernel. Cost is linear in tokens: no cached prefix is read, only the state.
Decode (`fused_recurrent` / fused sigmoid-gating update) reads and writes each sequence's
state once per layer: memory-bound on the state, whatever the context. The short conv1d keeps
`conv_kernel - 1` columns per channel. Projections: in_proj_qkvz and in_proj_ba (column
parallel), out_proj (row parallel).

DSA indexer (SGLang nsa_indexer.py, vLLM deepseek_v2.py Indexer): wq_b from the q latent, wk
and weights_proj from the hidden state, all ReplicatedLinear (no TP split). Every rank scores
each query against every cached index key (FP8 MQA logits over n_heads x head_dim, quadratic
at prefill), then takes the top-k; the MLA attention itself reads only those top-k entries
(steps.py passes `topk` as its window). The index cache is FP8 keys plus a float32 scale per
token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trilemma.optimizer.catalog.engines import Engine
from trilemma.optimizer.catalog.gpus import Gpu
from trilemma.optimizer.catalog.models import AttentionKind, ModelArch
from trilemma.optimizer.catalog.quantization import KvDtype
from trilemma.optimizer.perf.arrays import FloatArray
from trilemma.optimizer.perf.kernels import KernelModel

CHUNK = 64  # FLA's chunk size for the chunked delta rule (BT = 64)
ACT_BYTES = 2.0
MEMORY_EFFICIENCY = 0.7  # as the element-wise kernels in steps.py: streaming at 70% of peak
# Kernels a Gated DeltaNet layer launches beyond its GEMMs. Prefill: conv1d, gating, two
# l2-norms, cumsum, K K^T, solve_tril, W/U, state recurrence, output, gated RMSNorm.
# Decode: conv1d update, fused gating + recurrent update, gated RMSNorm.
GDN_PREFILL_KERNELS = 11
GDN_DECODE_KERNELS = 3
# The indexer's kernels beyond its GEMMs and logits (SGLang nsa_indexer.py forward_cuda): k
# LayerNorm, rope, two rope write-backs, Hadamard rotation and FP8 quantization of q and k, the
# head gates, the index-cache store and the top-k transform. A prefill whose context fits in
# the top-k skips the scoring (`_forward_cuda_k_only`): k's norm, rope, write-back, rotation,
# quantization and store only.
INDEXER_KERNELS = 11
INDEXER_K_ONLY_KERNELS = 6
INDEX_SCALE_BYTES = 4.0  # one float32 scale per FP8 index key
LOGIT_BYTES = 4.0


@dataclass(frozen=True, kw_only=True)
class HybridCounts:
    """Layers priced here rather than as full softmax attention."""

    linear: int  # Gated DeltaNet layers
    indexed: int  # layers whose MLA reads only the indexer's top-k (all layers of a DSA model)


def counts(arch: ModelArch) -> HybridCounts:
    linear = sum(k.attention is AttentionKind.LINEAR for k in arch.layer_kinds())
    return HybridCounts(linear=linear if arch.linear_attention else 0,
                        indexed=arch.num_layers if arch.indexer else 0)


def sparse_window(arch: ModelArch) -> int:
    """Keys a sparse-attention query reads at most (0: dense attention)."""
    return arch.indexer.topk if arch.indexer else 0


def gdn_gemms_ms(km: KernelModel, kernel: str, arch: ModelArch, tokens: np.ndarray,
                 tp: np.ndarray) -> FloatArray:
    """One linear-attention layer's projections: in_proj_qkvz + in_proj_ba, out_proj."""
    la = arch.linear_attention
    assert la is not None
    key = la.num_key_heads * la.key_head_dim
    value = la.num_value_heads * la.value_head_dim
    h = arch.hidden_size
    qkvz = km.gemm_ms(kernel, tokens, (2.0 * key + 2.0 * value) / tp, h)
    ba = km.gemm_ms(kernel, tokens, 2.0 * la.num_value_heads / tp, h)
    out = km.gemm_ms(kernel, tokens, h, value / tp)
    return qkvz + ba + out


def gdn_core_ms(km: KernelModel, gpu: Gpu, arch: ModelArch, tp: np.ndarray,
                pf_tokens: np.ndarray, dec_seqs: np.ndarray, launch_ms: float) -> FloatArray:
    """One linear-attention layer's conv1d and delta rule: chunked prefill of `pf_tokens`
    tokens plus the recurrent update of `dec_seqs` decoding sequences."""
    la = arch.linear_attention
    assert la is not None
    heads = np.maximum(la.num_value_heads / tp, 1.0)
    k_heads = np.maximum(la.num_key_heads / tp, 1.0)
    dk, dv = la.key_head_dim, la.value_head_dim
    conv_channels = 2.0 * k_heads * dk + heads * dv
    bw = gpu.memory_bw * MEMORY_EFFICIENCY
    # Prefill: the chunk-local systems and the state products, priced as the bf16 GEMMs they
    # are made of (m = tokens), plus the per-chunk states written and read back in bf16 and
    # the q, k, v, gate and output streams (each read or written about twice).
    m = np.maximum(pf_tokens, 1.0)
    intra = km.gemm_ms("bf16", m, heads * CHUNK, 2.0 * (dk + dv))
    state = km.gemm_ms("bf16", m, heads * dv, 3.0 * dk)
    moved = pf_tokens * (heads * dk * dv * ACT_BYTES * 2.0 / CHUNK
                         + 2.0 * ACT_BYTES * (conv_channels + 2.0 * heads * dv))
    prefill = intra + state + moved / bw * 1e3 + GDN_PREFILL_KERNELS * launch_ms
    # Decode: each sequence's state read and written, and its conv window.
    per_seq = (2.0 * heads * dk * dv * la.state_bytes_per_elem
               + 2.0 * conv_channels * (la.conv_kernel - 1) * ACT_BYTES)
    decode = dec_seqs * per_seq / bw * 1e3 + GDN_DECODE_KERNELS * launch_ms
    out: FloatArray = (np.where(pf_tokens > 0, prefill, 0.0)
                       + np.where(dec_seqs > 0, decode, 0.0))
    return out


def scores(arch: ModelArch, context: np.ndarray, engine: Engine) -> np.ndarray:
    """Whether a prefill reaching `context` tokens runs the indexer's scoring. SGLang skips
    the logits and top-k of a batch whose longest context fits in the top-k (every key is
    kept; nsa_indexer.py `skip_logits_computation`), computing and caching only the index
    keys; vLLM's sparse_attn_indexer scores every prefill chunk."""
    assert arch.indexer is not None
    if engine is not Engine.SGLANG:
        return np.ones_like(np.asarray(context), dtype=bool)
    return np.asarray(context > arch.indexer.topk)


def indexer_gemms_ms(km: KernelModel, kernel: str, arch: ModelArch, tokens: np.ndarray,
                     scoring: np.ndarray) -> FloatArray:
    """One layer's indexer projections; replicated, so every TP rank runs all of them. Every
    token's index key (wk); the queries (wq_b) and head gates (weights_proj) of the
    `scoring` tokens only."""
    ix = arch.indexer
    assert ix is not None
    q_in = arch.mla.q_lora_rank if arch.mla and arch.mla.q_lora_rank else arch.hidden_size
    h = arch.hidden_size
    key = km.gemm_ms(kernel, tokens, ix.head_dim, h)
    query = (km.gemm_ms(kernel, np.maximum(scoring, 1.0), ix.num_heads * ix.head_dim, q_in)
             + km.gemm_ms("bf16", np.maximum(scoring, 1.0), ix.num_heads, h))
    out: FloatArray = key + np.where(scoring > 0, query, 0.0)
    return out


def indexer_core_ms(km: KernelModel, gpu: Gpu, arch: ModelArch, *, pf_tokens: np.ndarray,
                    pf_keys: np.ndarray, pf_scored: np.ndarray, dec_seqs: np.ndarray,
                    dec_kv: np.ndarray, launch_ms: float) -> FloatArray:
    """One layer's indexer scoring and top-k. `pf_keys`: mean keys a prefill query scores
    (causal over its sequence and cached prefix); `pf_scored`: whether the prefill scores at
    all (`scores`). Decode always scans the whole index cache."""
    ix = arch.indexer
    assert ix is not None
    logits_kernel = "fp8" if gpu.supports("fp8") else "bf16"
    width = ix.num_heads * ix.head_dim
    bw = gpu.memory_bw * MEMORY_EFFICIENCY
    key_bytes = ix.head_dim + INDEX_SCALE_BYTES
    # Prefill: an FP8 GEMM of the new queries against their keys (all heads at once), the
    # logits written and read by the top-k.
    m = np.maximum(pf_tokens, 1.0)
    keys = np.maximum(pf_keys, 1.0)
    logits = km.gemm_ms(logits_kernel, m, keys, width)
    moved = pf_tokens * keys * 2.0 * LOGIT_BYTES
    scored = logits + moved / bw * 1e3 + INDEXER_KERNELS * launch_ms
    prefill = np.where(pf_scored, scored, INDEXER_K_ONLY_KERNELS * launch_ms)
    # Decode: each sequence's whole index cache read, its logits written and top-k'd.
    decode = (dec_seqs * dec_kv * (key_bytes + 2.0 * LOGIT_BYTES) / bw * 1e3
              + INDEXER_KERNELS * launch_ms)
    out: FloatArray = (np.where(pf_tokens > 0, prefill, 0.0)
                       + np.where(dec_seqs > 0, decode, 0.0))
    return out


def engine_kv_dtype(engine: Engine, arch: ModelArch, gpu: Gpu, requested: KvDtype) -> KvDtype:
    """The KV dtype the engine runs when left to its default. SGLang serves DSA models on
    Blackwell (sm100+) with an FP8 KV cache (server_args.py: `nsa` backend, kv_cache_dtype
    fp8_e4m3 for the FlashMLA sparse kernels); everything else keeps what was asked for."""
    if (engine is Engine.SGLANG and arch.indexer is not None and gpu.sm_version is not None
            and gpu.sm_version >= 100):
        return KvDtype.FP8
    return requested


def index_cache_bytes_per_token(arch: ModelArch) -> float:
    """Index-cache bytes one token adds to one layer (every TP rank holds all of it)."""
    return arch.indexer.head_dim + INDEX_SCALE_BYTES if arch.indexer else 0.0


def recurrent_state_bytes_per_gpu(arch: ModelArch, tp: np.ndarray) -> FloatArray:
    """One sequence's linear-attention state on one GPU: the value heads split over TP."""
    la = arch.linear_attention
    layers = counts(arch).linear
    if la is None or not layers:
        return np.zeros_like(np.asarray(tp, dtype=np.float64))
    heads = np.maximum(la.num_value_heads / tp, 1.0)
    k_heads = np.maximum(la.num_key_heads / tp, 1.0)
    state = heads * la.key_head_dim * la.value_head_dim * la.state_bytes_per_elem
    conv = ((2.0 * k_heads * la.key_head_dim + heads * la.value_head_dim)
            * (la.conv_kernel - 1) * ACT_BYTES)
    out: FloatArray = layers * (state + conv)
    return out
