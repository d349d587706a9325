"""The parametric latency forms of each kernel family: ONE implementation for fit and runtime.

`fitting.py` fits these functions to the measured AIConfigurator tables; `kernels.py` evaluates
them with the fitted parameters in the search's hot path. Every function takes its parameters
as a sequence in the order of the matching `*_PARAMS` tuple (a numpy vector while fitting, a
tuple at runtime) and numpy arrays for the shape, and returns milliseconds. Numpy only.

Shared anatomy, chosen from the residuals of simpler forms:
- Rates are absolute (FLOP/s, bytes/s) so a calibrated GPU needs no datasheet.
- Compute and memory time combine by a smooth max `(a**p + b**p)**(1/p)`: p -> inf is the
  ideal roofline; a finite fitted p is the overlap loss near the ridge point.
- `launch_ms` adds to device time; `host_ms` is overlapped with it (smooth max again): some
  vLLM paths (block-scaled fp8 GEMM, MLA modules) sit at a CPU-side floor of 50-200 us that
  vanishes once the device work is longer, which an additive constant cannot express.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

Params = Sequence[float] | np.ndarray
# Shapes and times: float64 arrays, so that numpy's stubs keep the dtype through arithmetic.
Array = npt.NDArray[np.float64]

# Bytes per element of the operands each kernel key reads. Scales are included: fp8 block
# scales (fp32 per 1x128 activation group / 128x128 weight tile), int4 group-128 bf16 scales,
# nvfp4 e4m3 per 16, mxfp4 e8m0 per 32.
ACT_BYTES: dict[str, float] = {
    "bf16": 2.0, "fp8": 1.0, "fp8_block": 1.03125, "int8": 1.0, "w4a16": 2.0,
    "fp4": 0.5625, "mxfp4": 2.0,
}
WEIGHT_BYTES: dict[str, float] = {
    "bf16": 2.0, "fp8": 1.0, "fp8_block": 1.0, "int8": 1.0, "w4a16": 0.515625,
    "fp4": 0.5625, "mxfp4": 0.53125,
}
# The tensor-core format each kernel computes in (the datasheet peak its FLOP rate scales with).
COMPUTE_PRECISION: dict[str, str] = {
    "bf16": "bf16", "fp8": "fp8", "fp8_block": "fp8", "int8": "int8", "w4a16": "bf16",
    "fp4": "fp4", "mxfp4": "bf16",
}
KV_BYTES: dict[str, float] = {"bf16": 2.0, "fp8": 1.0}

# Flash-attention query tile: work is issued per (sequence, kv head, 128 query rows).
ATTN_TILE = 128.0


def smooth_max(a: Array | float, b: Array | float, p: float) -> Array:
    """(a^p + b^p)^(1/p): the roofline max with a fitted overlap loss near the ridge."""
    # A host floor `a` is a float; at least one side is an array, so the result is one.
    out: Array = (a**p + b**p) ** (1.0 / p)
    return out


# --- GEMM ------------------------------------------------------------------------------------

GEMM_PARAMS = ("host_ms", "host_large_ms", "launch_ms", "flops", "mem_bw", "sharpness",
               "m_half", "prep_bytes")


def gemm_ms(x: Params, m: Array, n: Array, k: Array, *, a_bytes: float, w_bytes: float,
            m_switch: float) -> Array:
    """C[m,n] = A[m,k] W[n,k]^T: roofline with tile fill in m and an activation-prep pass.

    `flops * m/(m+m_half)` is the tile fill of small-m problems; `prep_bytes` per activation
    element is the quantization pass fp8/fp4 kernels run on A first (0 for bf16). The host
    floor switches at `m_switch` because vLLM dispatches block-fp8 to a different library
    (FlashInfer below, DeepGEMM above) with a different fixed cost.
    """
    host, host_large, launch, flops, bw, p, m_half, prep = x
    f = 2.0 * m * n * k
    moved = a_bytes * m * k + w_bytes * n * k + 2.0 * m * n
    t_compute = f * (m + m_half) / (flops * m)
    device = launch + 1e3 * (smooth_max(t_compute, moved / bw, p) + prep * m * k / bw)
    if host == 0 and host_large == 0:
        return device  # CUDA-graph replay: no host floor, and no pow to pay for it
    floor = np.where(m > m_switch, host_large, host) if m_switch < np.inf else host
    return smooth_max(floor, device, p)


# GEMM residual grid: what a smooth form cannot follow (tile and split-k heuristics, library
# switches) is kept as the median log-ratio measured/predicted per (m, n*k) cell.
RESIDUAL_LOG2_M_EDGES = (1.0, 3.0, 5.0, 7.0, 9.0, 11.0, 13.0)
RESIDUAL_LOG2_NK_EDGES = (22.0, 24.0, 26.0, 28.0)


def gemm_residual_cells(m: Array, n: Array, k: Array) -> tuple[Array, Array]:
    """Row and column of each shape's cell in the residual grid.

    Same as searchsorted on the edges (which are evenly spaced, 2 apart), in arithmetic: the
    hot path calls this for every GEMM of every candidate.
    """
    e_m, e_nk = RESIDUAL_LOG2_M_EDGES, RESIDUAL_LOG2_NK_EDGES
    i = np.ceil((np.log2(np.maximum(m, 1.0)) - e_m[0]) * 0.5)
    j = np.ceil((np.log2(np.maximum(n * k, 1.0)) - e_nk[0]) * 0.5)
    return (np.clip(i, 0, len(e_m)).astype(np.intp), np.clip(j, 0, len(e_nk)).astype(np.intp))


def gemm_residual_factor(log_ratio: Sequence[Sequence[float]] | np.ndarray, m: Array, n: Array,
                         k: Array) -> Array:
    """exp(median log(measured/form)) of each shape's cell; 1 where the grid is empty."""
    i, j = gemm_residual_cells(m, n, k)
    cells: Array = np.asarray(log_ratio, dtype=np.float64)[i, j]
    return np.exp(cells)


# --- Attention --------------------------------------------------------------------------------

CONTEXT_PARAMS = ("host_ms", "launch_ms", "flops", "exp_rate", "mem_bw", "sharpness", "tile_s")


def causal_pairs(kv_len: Array, q_len: Array, window: Array) -> Array:
    """(query, key) pairs of q_len new tokens at the end of kv_len under a causal (window) mask.

    P(x) = sum_{i=1..x} min(i, w) is the pair count of the first x positions; the new tokens
    contribute P(kv) - P(kv - q). window <= 0 means no window.
    """
    def upto(x: Array) -> Array:
        w = np.where(window > 0, np.minimum(window, x), x)  # no window: w = x, the full triangle
        return 0.5 * w * (w + 1.0) + (x - w) * w

    return upto(kv_len) - upto(kv_len - q_len)


def context_attention_ms(x: Params, batch: Array, q_len: Array, kv_len: Array, heads: Array,
                         kv_heads: Array, head_dim: Array, window: Array, *,
                         kv_bytes: float) -> Array:
    """Prefill attention: matmul FLOPs plus a softmax term, vs bytes; per-tile overhead.

    The softmax costs per (query, key) pair independently of head_dim, which is why
    head_dim 64 runs at a lower FLOP rate than 128 (`exp_rate`, pairs/s). Every query tile of
    every (sequence, kv head) pays `tile_s` of prologue: the whole cost of short prompts.
    """
    host, launch, flops, exp_rate, bw, p, tile_s = x
    pairs = batch * heads * causal_pairs(kv_len, q_len, window)
    t_compute = 4.0 * head_dim * pairs / flops + pairs / exp_rate
    moved = batch * (4.0 * q_len * heads * head_dim + 2.0 * kv_heads * head_dim * kv_bytes
                     * kv_len)
    tiles = batch * kv_heads * np.ceil(q_len / ATTN_TILE)
    device = launch + 1e3 * (smooth_max(t_compute, moved / bw, p) + tile_s * tiles)
    return device if host == 0 else smooth_max(host, device, p)


DECODE_PARAMS = ("host_ms", "launch_ms", "flops", "mem_bw", "sharpness", "seq_s", "rows_half")


def decode_attention_ms(x: Params, batch: Array, kv_len: Array, heads: Array, kv_heads: Array,
                        head_dim: Array, window: Array, *, kv_bytes: float) -> Array:
    """One query token per sequence: the KV read at a bandwidth that needs enough rows in flight.

    `rows_half` (KV rows of all sequences and kv heads) is where half of `mem_bw` is reached;
    `seq_s` is the per (sequence, kv head) work-unit cost that dominates large batches of
    short contexts.
    """
    host, launch, flops, bw, p, seq_s, rows_half = x
    span = np.where(window > 0, np.minimum(kv_len, window), kv_len)
    rows = batch * kv_heads * span
    moved = 2.0 * rows * head_dim * kv_bytes + 4.0 * batch * heads * head_dim
    t_compute = 4.0 * batch * heads * head_dim * span / flops
    t_memory = moved * (rows + rows_half) / (bw * rows)
    device = launch + 1e3 * (smooth_max(t_compute, t_memory, p) + seq_s * batch * kv_heads)
    return device if host == 0 else smooth_max(host, device, p)


# --- MLA (DeepSeek multi-head latent attention) ------------------------------------------------

MLA_PARAMS = ("host_ms", "launch_ms", "gemm_flops", "attn_flops", "mem_bw", "sharpness",
              "m_half", "tile_s")

# DeepSeek-V3 geometry: the only MLA model AIConfigurator profiled (Kimi K2 shares it).
DSV3_MLA: dict[str, float] = {
    "hidden": 7168.0, "q_lora_rank": 1536.0, "kv_lora_rank": 512.0, "qk_nope_head_dim": 128.0,
    "qk_rope_head_dim": 64.0, "v_head_dim": 128.0,
}


def mla_projection_weights(heads: Array, geometry: dict[str, float]) -> Array:
    """Parameters of the module's projections (fused q_a/kv_a, q_b, kv_b, o) for local heads.

    Prefill expands the latent KV with kv_b; decode folds kv_b into two per-head BMMs against
    the latent, as vLLM does: the same parameter count applied to the new tokens either way,
    so the projection FLOPs are 2 x tokens x weights in both phases.
    """
    g = geometry
    qk = g["qk_nope_head_dim"] + g["qk_rope_head_dim"]
    down = g["hidden"] * (g["q_lora_rank"] + g["kv_lora_rank"] + g["qk_rope_head_dim"])
    q_up = g["q_lora_rank"] * heads * qk
    kv_up = heads * g["kv_lora_rank"] * (g["qk_nope_head_dim"] + g["v_head_dim"])
    out = heads * g["v_head_dim"] * g["hidden"]
    return down + q_up + kv_up + out


def mla_context_features(batch: Array, seq_len: Array, heads: Array, kv_bytes: float,
                         geometry: dict[str, float]) -> tuple[Array, ...]:
    """(tokens, weights, attention FLOPs, attention bytes, tiles) of a prefill without prefix.

    Prefill runs MHA over expanded per-head K (nope+rope) and V: causal pairs x (qk + v) MACs.
    """
    g = geometry
    qk = g["qk_nope_head_dim"] + g["qk_rope_head_dim"]
    v = g["v_head_dim"]
    tokens = batch * seq_len
    pairs = batch * heads * 0.5 * seq_len * (seq_len + 1.0)
    flop = 2.0 * pairs * (qk + v)
    moved = tokens * (heads * (2.0 * qk + 2.0 * v) * 2.0
                      + (g["kv_lora_rank"] + g["qk_rope_head_dim"]) * kv_bytes)
    tiles = batch * heads * np.ceil(seq_len / ATTN_TILE)
    return tokens, mla_projection_weights(heads, g), flop, moved, tiles


def mla_decode_features(batch: Array, kv_len: Array, heads: Array, kv_bytes: float,
                        geometry: dict[str, float]) -> tuple[Array, ...]:
    """(tokens, weights, attention FLOPs, attention bytes, tiles) of one decode step.

    Absorbed decode attends over the shared latent (kv_lora + rope per token, one "head"):
    scores over kv_lora+rope and the value sum over kv_lora, for every local head.
    """
    g = geometry
    latent = g["kv_lora_rank"] + g["qk_rope_head_dim"]
    flop = 2.0 * batch * heads * kv_len * (latent + g["kv_lora_rank"])
    moved = batch * kv_len * latent * kv_bytes + batch * heads * (latent + g["kv_lora_rank"]) * 4.0
    return batch, mla_projection_weights(heads, g), flop, moved, batch


def mla_module_ms(x: Params, tokens: Array, weights: Array, attn_flop: Array,
                  attn_bytes: Array, attn_tiles: Array, *, w_bytes: float,
                  hidden: float) -> Array:
    """Projection GEMMs (a roofline with tile fill) plus the attention core, after launch.

    `weights` = 0 prices the attention kernel alone (the A100 tables measure only that).
    """
    host, launch, g_flops, a_flops, bw, p, m_half, tile_s = x
    g_time = 2.0 * tokens * weights * (tokens + m_half) / (g_flops * tokens)
    g_moved = weights * w_bytes + np.where(weights > 0, 8.0 * tokens * hidden, 0.0)
    attn = smooth_max(attn_flop / a_flops, attn_bytes / bw, p) + tile_s * attn_tiles
    device = launch + 1e3 * (smooth_max(g_time, g_moved / bw, p) + attn)
    return device if host == 0 else smooth_max(host, device, p)


# --- MoE ----------------------------------------------------------------------------------------

MOE_PARAMS = ("launch_ms", "flops", "mem_bw", "sharpness", "m_half", "act_bytes",
              "skew_pl101", "skew_pl12", "ep_launch_ms")
DISTRIBUTIONS = ("balanced", "power_law_1.01", "power_law_1.2")


def moe_ms(x: Params, tokens: Array, hidden: Array, inter: Array, topk: Array,
           experts: Array, moe_tp: Array, moe_ep: Array, skew: Array | float, *,
           w_bytes: float) -> Array:
    """Fused MoE on the busiest EP rank: expert GEMMs on the experts actually touched.

    Routing skew (>= 1; 1 = balanced) does two things AIConfigurator's power-law tables show:
    the busiest rank gets `skew` times its fair share of the tokens x topk picks, and picks
    collide on popular experts, so they touch as many distinct experts as `fair / skew`
    uniform picks would (why skewed routing is cheaper at small batches; at large batches
    every expert is hit either way). Touched experts set the weight bytes read, picks per
    touched expert the tile fill. `act_bytes` per (pick x (hidden + inter))
    element is the traffic of the permute, activation and un-permute passes, which run over
    all picks, not only the local ones (a local-only variant fitted worse on 19 of 21 tables).
    `ep_launch_ms` is the fixed cost expert parallelism adds (mapping global expert ids to
    local ones and masking the picks other ranks own): the tables' EP rows sit at a floor up
    to 1.7x their TP rows' (gpt-oss MXFP4 on H100: 67 vs 39 us), which one launch term
    cannot hold for both.
    """
    launch, flops, bw, p, m_half, act_bytes, _, _, ep_launch = x
    launch = launch + np.where(moe_ep > 1.0, ep_launch, 0.0)
    local_experts = experts / moe_ep
    local_inter = inter / moe_tp
    fair = tokens * topk / moe_ep
    picks = fair * skew
    touched = local_experts * -np.expm1(-fair / (skew * local_experts))
    per_expert = picks / touched
    f = 6.0 * picks * hidden * local_inter
    t_compute = f * (per_expert + m_half) / (flops * per_expert)
    moved = (3.0 * touched * hidden * local_inter * w_bytes
             + 2.0 * act_bytes * tokens * topk * (hidden + local_inter))
    return launch + 1e3 * smooth_max(t_compute, moved / bw, p)


def moe_skew(x: Params, distribution: str) -> float:
    """The skew parameter of a routing distribution name (1.0 for balanced)."""
    if distribution == "balanced":
        return 1.0
    return float(x[MOE_PARAMS.index("skew_pl101" if distribution == "power_law_1.01"
                                    else "skew_pl12")])


# --- Collectives --------------------------------------------------------------------------------

COMM_PARAMS = ("alpha_ms", "alg_bw", "alpha2_ms", "alg_bw2")


def collective_ms(x: Params | Sequence[Array], message_bytes: Array) -> Array:
    """min over two algorithms of (latency + bytes / bandwidth), as a smooth minimum.

    The rates are algorithm bandwidths: message bytes per second (not NCCL's bus bandwidth).

    NCCL (LL vs Simple protocols) and vLLM's custom all-reduce (one-shot vs two-shot, then
    NCCL above its buffer) each switch algorithm with the message size; two lines capture it.

    The parameters may be arrays too: one set per GPU count, indexed per candidate.
    """
    a1, b1, a2, b2 = x
    r1 = 1.0 / (a1 + 1e3 * message_bytes / b1)
    r2 = 1.0 / (a2 + 1e3 * message_bytes / b2)
    r1 *= r1
    r2 *= r2
    # (t1^-4 + t2^-4)^(-1/4) by squaring and square roots: several times cheaper than pow.
    return 1.0 / np.sqrt(np.sqrt(r1 * r1 + r2 * r2))


def deepep_payload_bytes(tokens: Any, hidden: Any, topk: Any, ranks: Any) -> np.ndarray:
    """Bytes one rank sends in a dispatch (and gets back in the combine): each token goes once
    to every rank that holds one of its top-k experts, min(topk, ranks) at most and
    ranks x (1 - (1 - 1/ranks)^topk) under uniform routing, in bf16 (DeepEP's low-latency
    dispatch sends fp8: its fitted rate is then per bf16-equivalent byte)."""
    ranks = np.maximum(np.asarray(ranks, dtype=np.float64), 1.0)
    distinct = ranks * (1.0 - (1.0 - 1.0 / ranks) ** np.asarray(topk, dtype=np.float64))
    out: np.ndarray = np.asarray(tokens, dtype=np.float64) * hidden * distinct * 2.0
    return out


# --- Shared bookkeeping --------------------------------------------------------------------------

FORM_PARAMS: dict[str, tuple[str, ...]] = {
    "gemm": GEMM_PARAMS, "context": CONTEXT_PARAMS, "decode": DECODE_PARAMS, "mla": MLA_PARAMS,
    "moe": MOE_PARAMS, "comm": COMM_PARAMS,
}
# The datasheet figure each rate parameter is measured against: the calibrated GPUs' ratios
# (efficiencies) become the defaults of GPUs that have only a datasheet.
RATE_REFERENCE: dict[str, str] = {
    "flops": "compute", "gemm_flops": "compute", "attn_flops": "bf16", "exp_rate": "bf16",
    "mem_bw": "memory_bw", "alg_bw": "intra_node_bw", "alg_bw2": "intra_node_bw",
}


def rate_reference(param: str, fit_key: str, sheet: Mapping[str, Any]) -> float | None:
    """The datasheet rate a parameter of fit `fit_key` ("family/kernel[/...]") scales with.

    None for parameters that are not rates, or when the sheet lacks the precision.
    """
    ref = RATE_REFERENCE.get(param)
    if ref is None:
        return None
    flops: Mapping[str, float] = sheet["dense_flops"]
    if ref == "compute":
        parts = fit_key.split("/")
        kernel = parts[1] if len(parts) > 1 else "bf16"
        if fit_key.startswith(("context_attention", "decode_attention")) or kernel == "none":
            kernel = "bf16"  # attention runs its matmuls in bf16 whatever the KV dtype
        return flops.get(COMPUTE_PRECISION.get(kernel, "bf16"))
    if ref == "bf16":
        return flops.get("bf16")
    return float(sheet[ref])
