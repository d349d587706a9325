"""Turns AIConfigurator's measured kernel tables into fit problems: rows, shapes, a form.

Calibration-time only (pandas); `fitting.py` drives it. Each `FitProblem` names the form in
`kernel_forms.py` it fits, the shape columns that form reads, the constants it needs, and the
provenance of the rows (table, engine version, kernel sources, domain filter). The choices
of which rows to keep are here, each with its reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trilemma.optimizer.perf import kernel_forms as kf

# AIConfigurator's dtype names -> the kernel keys of kernels.py.
GEMM_KEYS = {"bfloat16": "bf16", "fp8": "fp8", "fp8_block": "fp8_block", "nvfp4": "fp4"}
MOE_KEYS = {"bfloat16": "bf16", "fp8": "fp8", "fp8_block": "fp8_block", "int4_wo": "w4a16",
            "w4a16_mxfp4": "mxfp4", "nvfp4": "fp4"}
KV_KEYS = {"bfloat16": "bf16", "fp8": "fp8"}
COMM_OPS = {"all_reduce": "allreduce", "all_gather": "allgather",
            "reduce_scatter": "reduce_scatter", "alltoall": "alltoall"}
NCCL_DTYPE_BYTES = {"half": 2.0, "int8": 1.0}

# Kernel sources that serve under this share of a table's rows are a special-case backend
# (FlashAttention-4 for head_dim 512 on Hopper): one smooth form cannot serve both, and the
# mainstream shapes matter more.
MINORITY_SHARE = 0.05
# GEMM shapes below this n or k are not projections of any served model; their latency is
# launch-bound noise that would pull the fit away from real shapes.
GEMM_MIN_NK = 128


@dataclass(kw_only=True)
class FitProblem:
    """One fit: measured rows, the form and its constants, and where the rows came from."""

    key: str                       # "gemm/bf16", "decode_attention/fp8", "comm/allreduce/8"
    form: str                      # name of the *_PARAMS tuple family in kernel_forms
    predict: Callable[[Any], np.ndarray]  # params -> ms for every row
    latency_ms: np.ndarray
    x0: dict[str, float]
    fixed: dict[str, float] = field(default_factory=dict)
    constants: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    shapes: tuple[np.ndarray, ...] | None = None  # GEMM (m, n, k) per row, for the residuals


def _col(df: Any, name: str) -> np.ndarray:
    # df is a pandas DataFrame; pandas is imported only where the tables are read.
    column: np.ndarray = df[name].to_numpy(dtype=np.float64)
    return column


def _sources(df: Any) -> dict[str, int]:
    return {str(k): int(v) for k, v in df["kernel_source"].value_counts().sort_index().items()}


def _drop_minority_sources(df: Any) -> tuple[Any, list[str]]:
    share = df["kernel_source"].value_counts(normalize=True)
    minor = sorted(str(s) for s in share[share < MINORITY_SHARE].index)
    return df[~df["kernel_source"].isin(minor)], minor


def _meta(df: Any, table: Path, aic_root: Path, version: str, domain: str,
          **extra: Any) -> dict[str, Any]:
    return {"table": table.relative_to(aic_root).as_posix(), "version": version,
            "kernel_source": _sources(df), "domain": domain, **extra}


def _roofline_x0(flop: np.ndarray, moved: np.ndarray, ms: np.ndarray) -> tuple[float, float]:
    """Start rates at the best achieved FLOP/s and bytes/s: fixed by the data, no randomness."""
    s = ms * 1e-3
    return float(np.quantile(flop / s, 0.95)), float(np.quantile(moved / s, 0.95))


def gemm_problems(df: Any, table: Path, aic_root: Path, version: str) -> Iterator[FitProblem]:
    for dtype, key in GEMM_KEYS.items():
        d = df[df["gemm_dtype"] == dtype]
        d = d[(d["n"] >= GEMM_MIN_NK) & (d["k"] >= GEMM_MIN_NK)]
        domain = f"n >= {GEMM_MIN_NK}, k >= {GEMM_MIN_NK}"
        if dtype == "fp8_block":
            # Block-scaled checkpoints have 128-aligned dims; vLLM sends unaligned shapes to a
            # CUTLASS fallback no served model reaches.
            d = d[(d["n"] % 128 == 0) & (d["k"] % 128 == 0)]
            domain += ", n % 128 == 0, k % 128 == 0"
        if d.empty:
            continue
        m, n, k = _col(d, "m"), _col(d, "n"), _col(d, "k")
        a_bytes, w_bytes = kf.ACT_BYTES[key], kf.WEIGHT_BYTES[key]
        m_switch = _m_switch(d)
        ms = _col(d, "latency")
        floor = float(ms.min())  # start the fixed costs at the table's floor: the right basin
        flops0, bw0 = _roofline_x0(2 * m * n * k, a_bytes * m * k + w_bytes * n * k, ms)
        fixed = {} if m_switch < math.inf else {"host_large_ms": 1e-4}
        const = {"a_bytes": a_bytes, "w_bytes": w_bytes,
                 "m_switch": None if m_switch == math.inf else m_switch}

        def predict(x: Any, m: Any = m, n: Any = n, k: Any = k, a: float = a_bytes,
                    w: float = w_bytes, sw: float = m_switch) -> np.ndarray:
            return kf.gemm_ms(x, m, n, k, a_bytes=a, w_bytes=w, m_switch=sw)

        yield FitProblem(
            key=f"gemm/{key}", form="gemm", predict=predict, latency_ms=ms,
            x0={"host_ms": floor, "host_large_ms": floor, "launch_ms": floor / 2, "flops": flops0,
                "mem_bw": bw0, "sharpness": 3.0, "m_half": 16.0, "prep_bytes": 1.0},
            fixed=fixed, constants=const, meta=_meta(d, table, aic_root, version, domain),
            shapes=(m, n, k))


def _m_switch(d: Any) -> float:
    """The m where vLLM's dispatcher changes library, if the table shows one cleanly."""
    ranges = sorted((float(g["m"].min()), float(g["m"].max()))
                    for _, g in d.groupby("kernel_source"))
    if len(ranges) == 2 and ranges[0][1] < ranges[1][0]:
        return 0.5 * (ranges[0][1] + ranges[1][0])
    return math.inf


def attention_problems(df: Any, phase: str, table: Path, aic_root: Path,
                       version: str) -> Iterator[FitProblem]:
    if "window_size" not in df:
        df = df.assign(window_size=0)
    for dtype, kv in KV_KEYS.items():
        d = df[df["kv_cache_dtype"] == dtype]
        if d.empty:
            continue
        d, dropped = _drop_minority_sources(d)
        kv_bytes = kf.KV_BYTES[kv]
        b, h = _col(d, "batch_size"), _col(d, "num_heads")
        hkv, hd, w = _col(d, "num_key_value_heads"), _col(d, "head_dim"), _col(d, "window_size")
        ms = _col(d, "latency")
        meta = _meta(d, table, aic_root, version, "all rows of the dispatched backends",
                     dropped_sources=dropped)
        if phase == "context":
            s = _col(d, "isl")  # step is 0 in every row: no cached prefix was measured
            pairs = b * h * kf.causal_pairs(s, s, w)
            flops0, bw0 = _roofline_x0(4 * hd * pairs, 2 * b * hkv * hd * kv_bytes * s, ms)

            def context(x: Any, b: Any = b, s: Any = s, h: Any = h, hkv: Any = hkv,
                        hd: Any = hd, w: Any = w, kb: float = kv_bytes) -> np.ndarray:
                return kf.context_attention_ms(x, b, s, s, h, hkv, hd, w, kv_bytes=kb)

            yield FitProblem(
                key=f"context_attention/{kv}", form="context", predict=context,
                latency_ms=ms, constants={"kv_bytes": kv_bytes}, meta=meta,
                x0={"host_ms": float(ms.min()), "launch_ms": float(ms.min()) / 2,
                    "flops": flops0, "exp_rate": flops0 / 64.0, "mem_bw": bw0, "sharpness": 3.0,
                    "tile_s": 1e-8})
        else:
            kv_len = _col(d, "step") + 1.0  # step = past tokens; the new token attends too
            rows = b * hkv * np.where(w > 0, np.minimum(kv_len, w), kv_len)
            flops0, bw0 = _roofline_x0(4 * b * h * hd * rows / (b * hkv),
                                       2 * rows * hd * kv_bytes, ms)

            def decode(x: Any, b: Any = b, kv_len: Any = kv_len, h: Any = h, hkv: Any = hkv,
                       hd: Any = hd, w: Any = w, kb: float = kv_bytes) -> np.ndarray:
                return kf.decode_attention_ms(x, b, kv_len, h, hkv, hd, w, kv_bytes=kb)

            yield FitProblem(
                key=f"decode_attention/{kv}", form="decode", predict=decode, latency_ms=ms,
                constants={"kv_bytes": kv_bytes}, meta=meta,
                x0={"host_ms": float(ms.min()), "launch_ms": float(ms.min()) / 2,
                    "flops": flops0, "mem_bw": bw0, "sharpness": 3.0, "seq_s": 1e-8,
                    "rows_half": 1e4})


def mla_problems(df: Any, phase: str, table: Path, aic_root: Path, version: str,
                 *, module: bool) -> Iterator[FitProblem]:
    """DeepSeek-V3 MLA: whole modules (projections + attention) or, on A100, the kernel alone.

    Only mla_dtype bfloat16 rows: fp8 prefill attention is an opt-in vLLM setting.
    """
    if "mla_dtype" in df:
        df = df[df["mla_dtype"] == "bfloat16"]
    if "gemm_type" not in df:
        df = df.assign(gemm_type="none")
    geometry = kf.DSV3_MLA
    for (gemm_type, dtype), d in df.groupby(["gemm_type", "kv_cache_dtype"], sort=True):
        kv = KV_KEYS[str(dtype)]
        gemm = GEMM_KEYS.get(str(gemm_type), "none")
        kv_bytes = kf.KV_BYTES[kv]
        b, h, ms = _col(d, "batch_size"), _col(d, "num_heads"), _col(d, "latency")
        if phase == "context":
            feats = kf.mla_context_features(b, _col(d, "isl"), h, kv_bytes, geometry)
        else:
            # Module tables log the KV length in `step`; the A100 kernel table logs past tokens.
            kv_len = _col(d, "step") + (0.0 if module else 1.0)
            feats = kf.mla_decode_features(b, kv_len, h, kv_bytes, geometry)
        tokens, weights, flop, moved, tiles = feats
        if not module:
            weights = np.zeros_like(weights)
        w_bytes = kf.WEIGHT_BYTES.get(gemm, 2.0)
        family = f"mla_{phase if phase == 'context' else 'decode'}"
        key = f"{family}/{gemm}/{kv}" if module else f"{family}_core/{kv}"
        a_flops0, bw0 = _roofline_x0(flop, moved, ms)
        # Without projections the GEMM terms vanish: pin their unidentifiable parameters.
        fixed = {} if module else {"gemm_flops": 0.0, "m_half": 1.0}

        def predict(x: Any, f: tuple[Any, ...] = (tokens, weights, flop, moved, tiles),
                    wb: float = w_bytes) -> np.ndarray:
            return kf.mla_module_ms(x, *f, w_bytes=wb, hidden=geometry["hidden"])

        yield FitProblem(
            key=key, form="mla", predict=predict, latency_ms=ms, fixed=fixed,
            constants={"kv_bytes": kv_bytes, "w_bytes": w_bytes, "geometry": "deepseek_v3"},
            x0={"host_ms": float(ms.min()), "launch_ms": float(ms.min()) / 2,
                "gemm_flops": a_flops0,
                "attn_flops": a_flops0, "mem_bw": bw0, "sharpness": 3.0, "m_half": 16.0,
                "tile_s": 1e-8},
            meta=_meta(d, table, aic_root, version,
                       "DeepSeek-V3 module, mla_dtype bfloat16" if module
                       else "attention kernel only (no projections)"))


def moe_problems(df: Any, table: Path, aic_root: Path, version: str) -> Iterator[FitProblem]:
    # Rows logged by a development build of vLLM are not the released engine.
    df = df[df["version"] == version]
    for dtype, key in MOE_KEYS.items():
        d = df[df["moe_dtype"] == dtype]
        if d.empty:
            continue
        cols = [_col(d, c) for c in ("num_tokens", "hidden_size", "inter_size", "topk",
                                     "num_experts", "moe_tp_size", "moe_ep_size")]
        dist = d["distribution"].to_numpy()
        if not set(dist) <= set(kf.DISTRIBUTIONS):
            raise ValueError(f"unknown MoE distribution in {table}: {sorted(set(dist))}")
        w_bytes = kf.WEIGHT_BYTES[key]
        ms = _col(d, "latency")
        t, hid, inter, topk, _, tp, ep = cols
        flops0, bw0 = _roofline_x0(6 * t * topk * hid * inter / (tp * ep),
                                   3 * hid * inter / tp * w_bytes * np.minimum(t * topk, 8), ms)
        is101, is12 = dist == "power_law_1.01", dist == "power_law_1.2"

        def predict(x: Any, cols: list[np.ndarray] = cols, is101: Any = is101, is12: Any = is12,
                    wb: float = w_bytes) -> np.ndarray:
            skew = np.where(is101, x[6], np.where(is12, x[7], 1.0))
            tokens, hidden, inter_size, k, experts, moe_tp, moe_ep = cols
            return kf.moe_ms(x, tokens, hidden, inter_size, k, experts, moe_tp, moe_ep, skew,
                             w_bytes=wb)

        yield FitProblem(
            key=f"moe/{key}", form="moe", predict=predict, latency_ms=ms,
            constants={"w_bytes": w_bytes},
            # A table without EP rows cannot see the EP floor: pinned to none.
            fixed={} if np.any(ep > 1) else {"ep_launch_ms": 1e-5},
            x0={"launch_ms": float(ms.min()), "ep_launch_ms": 0.1 * float(ms.min()),
                "flops": flops0, "mem_bw": bw0, "sharpness": 3.0,
                "m_half": 16.0, "act_bytes": 1.0, "skew_pl101": 2.0, "skew_pl12": 2.0},
            meta=_meta(d, table, aic_root, version,
                       f"engine version {version} rows, all distributions"))


def comm_problems(df: Any, table: Path, aic_root: Path, version: str,
                  *, custom: bool) -> Iterator[FitProblem]:
    """NCCL collectives (nccl-tests, bytes = elements x dtype) or vLLM's graph-mode all-reduce.

    The custom all-reduce table is what vLLM's own dispatcher does under CUDA graphs
    (custom one-shot/two-shot kernels for small messages, NCCL above its buffer); eager rows
    are dropped because decode runs in graphs.
    """
    if custom:
        df = df[df["kernel_source"] == "vLLM_custom_graph"].assign(op_name="all_reduce")
        df = df.assign(bytes=df["message_size"].to_numpy(dtype=np.float64) * 2.0)
        domain = "CUDA-graph mode, bf16"
    else:
        scale = df["nccl_dtype"].map(NCCL_DTYPE_BYTES).to_numpy(dtype=np.float64)
        df = df.assign(bytes=df["message_size"].to_numpy(dtype=np.float64) * scale)
        domain = "half and int8 rows, message_bytes = elements x dtype bytes"
    for (op, n), d in df.groupby(["op_name", "num_gpus"], sort=True):
        name = "custom_allreduce" if custom else COMM_OPS[str(op)]
        yield _line_problem(f"comm/{name}/{int(n)}", _col(d, "bytes"), _col(d, "latency"),
                            _meta(d, table, aic_root, version, domain))


def _line_problem(key: str, size: np.ndarray, ms: np.ndarray,
                  meta: dict[str, Any]) -> FitProblem:
    """Latency against bytes moved in the collectives' form (two latency-bandwidth lines),
    started from the table's floor and its best achieved rate."""
    def predict(x: Any, size: Any = size) -> np.ndarray:
        return kf.collective_ms(x, size)

    lat = float(ms.min())
    bw = float(np.max(size / (ms * 1e-3)))
    return FitProblem(
        key=key, form="comm", predict=predict, latency_ms=ms,
        x0={"alpha_ms": lat, "alg_bw": bw / 4.0, "alpha2_ms": 3.0 * lat, "alg_bw2": bw},
        meta=meta)


# DeepEP's tables (SGLang's all-to-all for expert parallelism) were measured on one 8-GPU node.
DEEPEP_RANKS = 8
# Normal mode reserves SMs for the transfer; DeepEP's Buffer (and SGLang, which keeps it) uses
# 20, as AIConfigurator's own SGLang model assumes (aiconfigurator_core sdk/config.py `sms`).
DEEPEP_NORMAL_SMS = 20
# (mode, table file, (dispatch column, combine column)); latencies in microseconds.
DEEPEP_TABLES = (
    ("normal", "wideep_deepep_normal_perf.parquet",
     ("dispatch_transmit_us", "combine_transmit_us")),
    ("low_latency", "wideep_deepep_ll_perf.parquet", ("dispatch_avg_t_us", "combine_avg_t_us")),
)


def deepep_problems(df: Any, mode: str, columns: tuple[str, str], table: Path, aic_root: Path,
                    version: str) -> Iterator[FitProblem]:
    """DeepEP dispatch and combine latency against the payload, in the collectives' form."""
    domain = f"node_num 1 ({DEEPEP_RANKS} ranks)"
    if mode == "normal":
        df = df[df["dispatch_sms"] == DEEPEP_NORMAL_SMS]
        domain += f", {DEEPEP_NORMAL_SMS} SMs"
    df = df[df["node_num"] == 1]
    payload = kf.deepep_payload_bytes(_col(df, "num_token"), _col(df, "hidden_size"),
                                      _col(df, "num_topk"), DEEPEP_RANKS)
    for op, column in zip(("dispatch", "combine"), columns, strict=True):
        yield _line_problem(f"deepep/{mode}/{op}", payload, _col(df, column) * 1e-3,
                            _meta(df, table, aic_root, version, domain))
