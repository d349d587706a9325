"""Context parallelism: which engines can split a sequence's context over GPUs, and its cost.

Two kinds exist in the engines, with different effects:

- Decode context parallel (DCP): the KV cache of every sequence is sharded token-wise over
  `cp` ranks, so each GPU holds 1/cp of it and a decode step reads 1/cp of it. The ranks are
  the tensor-parallel ranks that would otherwise hold the same KV (every TP rank for MLA,
  whose latent has no heads to slice; the replicated KV heads when TP exceeds the KV heads):
  no extra GPUs. Per layer each rank gathers the queries of its DCP group, attends to its
  shard with the group's heads, and the partial outputs are reduce-scattered back (softmax
  statistics alongside). Prefill attends to the same sharded cache: the query gather and
  output scatter are paid per prefill token too, and MLA's prefill gathers the cached
  context's latent back from the shards (it runs on the decompressed heads).
- Prefill context parallel (PCP): the tokens of one prompt split over extra ranks, KV
  exchanged by ring or all-gather. Neither pinned engine can run it on these models (below),
  so the search never offers it; there is no model of its cost to trust.

What the pinned releases run (read from their sources; `perf/releases.py` pins them):

- vLLM v0.24.0 has `--decode-context-parallel-size` (`-dcp`; vllm/config/parallel.py:
  "reuse the GPUs of TP group, and tp_size needs to be divisible by dcp_size"; GQA/MQA limits
  in vllm/config/model.py: tp > total KV heads, dcp <= tp // kv_heads, q-per-kv heads
  divisible by dcp). Hybrid KV cache groups (sliding-window or linear-attention layers beside
  full attention) refuse it (vllm/v1/core/kv_cache_utils.py). Its
  `--prefill-context-parallel-size` exists but no CUDA attention backend sets `supports_pcp`
  (vllm/v1/attention/backend.py, asserted in vllm/v1/worker/cp_utils.py): not offered.
- SGLang v0.5.9 has `--attn-cp-size` / `--enable-nsa-prefill-context-parallel`, wired only
  into DeepSeek sparse-attention (NSA) prefill at tp 8 (python/sglang/srt/server_args.py,
  "still under experiment"; models/deepseek_v2.py): not a decode KV shard, and no catalog
  model's step is priced with NSA, so SGLang is offered no context parallelism.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from trilemma.optimizer.catalog.engines import Engine
from trilemma.optimizer.catalog.models import ModelArch
from trilemma.optimizer.perf.arrays import FloatArray

# The search offers CP only where the mean prompt reaches this many tokens: about where this
# module's own step model breaks even. DeepSeek-V3 fp8 at TP8 on H100, a decode step of 64
# sequences: 44.7 ms at 4k context without DCP, 46.0-53.3 ms with cp 2-8; at 16k 54.2 against
# 50.8 (cp 2); at 64k 92.1 against 61.1 (cp 4). Below it the two collectives per layer that
# DCP adds cost more than the split KV read saves, and a sequence's KV is a small share of a
# GPU (the batch is bounded by max_num_seqs, not the cache); enumerating CP there would only
# multiply the search's grid by layouts that never win.
LONG_PROMPT_TOKENS = 16384

# Engines whose pinned release runs decode context parallelism (see the module docstring).
DECODE_CP_ENGINES = frozenset({Engine.VLLM})


def supports_decode_cp(engine: Engine) -> bool:
    return engine in DECODE_CP_ENGINES


def feasible(arch: ModelArch, engine: Engine, tp: npt.ArrayLike,
             cp: npt.ArrayLike) -> np.ndarray:
    """Vectorized: True where `engine` runs `arch` at tensor parallel tp with DCP cp."""
    tp, cp = np.broadcast_arrays(np.asarray(tp, dtype=np.int64), np.asarray(cp, dtype=np.int64))
    one: np.ndarray = cp == 1
    if not supports_decode_cp(engine) or arch.sliding_layers or arch.linear_attention:
        return one
    ok = (cp >= 1) & (tp % np.maximum(cp, 1) == 0)
    if arch.mla is None:
        kv = arch.num_kv_heads
        q_per_kv = arch.num_heads // kv
        ok &= (tp > kv) & (cp <= tp // kv) & (q_per_kv % np.maximum(cp, 1) == 0)
    out: np.ndarray = one | ok
    return out


def reason(arch: ModelArch, engine: Engine, tp: int, cp: int) -> str:
    """Why (engine, arch, tp) cannot shard its KV over cp ranks; '' where it can."""
    if cp == 1:
        return ""
    if not supports_decode_cp(engine):
        return (f"{engine.value}'s pinned release has no decode context parallelism "
                "for this model")
    if arch.sliding_layers or arch.linear_attention:
        return f"{arch.id} has hybrid KV cache groups, which vLLM's DCP refuses"
    if cp < 1 or tp % cp:
        return f"must divide tensor parallel {tp} (DCP reuses the TP ranks)"
    if arch.mla is None and not bool(feasible(arch, engine, tp, cp)):
        return (f"with {arch.num_kv_heads} KV heads of {arch.id}, tp {tp} must exceed them "
                f"and cp must divide both tp // KV heads and the query heads per KV head")
    return ""


def ladder(ranks: tuple[int, ...], mean_prompt_tokens: float) -> tuple[int, ...]:
    """The cp values the search enumerates: `ranks` for long prompts, else no CP."""
    if mean_prompt_tokens < LONG_PROMPT_TOKENS:
        return (1,)
    return tuple(sorted({1, *ranks}))


def decode_split(tp: np.ndarray, cp: np.ndarray, kv_len: np.ndarray) -> tuple[FloatArray,
                                                                              FloatArray]:
    """(head divisor, KV tokens) one rank's attention kernel sees: the heads of tp/cp ranks
    (queries gathered over the DCP group) against 1/cp of the context."""
    div: FloatArray = tp / cp
    # A mean, not a count: vLLM interleaves tokens over the ranks, so shards differ by <= 1.
    tokens: FloatArray = kv_len / cp
    return div, tokens


def exchange_bytes(arch: ModelArch, tp: np.ndarray, cp: np.ndarray,
                   tokens: np.ndarray) -> tuple[FloatArray, FloatArray]:
    """(query all-gather, output reduce-scatter) buffers of one layer for `tokens` query rows,
    in bf16, as the collectives size them: the heads of the cp ranks of a DCP group, the
    outputs with their softmax LSE."""
    heads = arch.num_heads / tp * cp
    if arch.mla is not None:
        m = arch.mla
        # Decode runs MLA absorbed: queries and outputs live in the latent space.
        q_dim: float = m.kv_lora_rank + m.qk_rope_head_dim
        o_dim: float = m.kv_lora_rank
    else:
        q_dim = o_dim = arch.head_dim
    gather: FloatArray = tokens * heads * q_dim * 2.0
    scatter: FloatArray = tokens * heads * (o_dim + 2.0) * 2.0
    return gather, scatter


def context_gather_bytes(arch: ModelArch, kv_bytes_per_layer: FloatArray,
                         tokens: np.ndarray) -> FloatArray:
    """Bytes per layer an MLA prefill gathers from the DCP shards to attend to `tokens` of
    cached context (vllm/model_executor/layers/attention/mla_attention.py gathers each
    context chunk); GQA attends to its shard in place and gathers none."""
    if arch.mla is None:
        return np.zeros(np.shape(tokens))
    out: FloatArray = tokens * kv_bytes_per_layer
    return out
