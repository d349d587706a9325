"""Kernel costs in milliseconds: the calibrated forms evaluated for one GPU, vectorized.

Bottom of perf/: `steps.py` prices a model's layers with these functions for arrays of
candidates at once. Parameters come from data/calibration.json (fitted by `fitting.py` to
NVIDIA AIConfigurator's measured vLLM kernel tables); the forms are `kernel_forms.py`, the
same code the fit used. Depends on numpy, the standard library and that JSON only.

Provenance of a (family, kernel) on a GPU:
- "fitted": a fit to that GPU's measured table for that kernel.
- "extrapolated": a measured family of the same GPU with a principled change — another
  operand width (w4a16 = the bf16 fit reading 4-bit weights; fp8 on A100 = Marlin W8A16),
  a compute rate scaled by the datasheet peak ratio (int8 from fp8 or bf16), fp8 KV from
  the bf16-KV fit with half the KV bytes, MLA on A100 = measured attention kernel + GEMMs,
  intra-node p2p from the 2-GPU all-gather.
  A GPU with a calibrated sibling (`extrapolate_from`: B300/GB200/GB300 from B200) is
  "extrapolated" throughout: the sibling's fits, rates scaled by the datasheets' ratio.
- "datasheet": a GPU without calibration; every form runs with the median efficiencies of
  the calibrated GPUs (`datasheet_defaults` in the JSON) times the caller's datasheet rates.
  Inter-node p2p is "datasheet" everywhere: no inter-node table was measured.
Collectives inside an NVLink domain wider than a node (NVL72) keep the NVLink rate.
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from trilemma.optimizer.errors import InputError
from trilemma.optimizer.perf import engine_kernels, graph_floor, kernel_rules
from trilemma.optimizer.perf import kernel_forms as kf
from trilemma.optimizer.perf.arrays import FloatArray
from trilemma.optimizer.perf.kernel_rules import Fit

GEMM_KERNELS = ("bf16", "fp8", "fp8_block", "int8", "w4a16", "fp4", "mxfp4")
MOE_KERNELS = GEMM_KERNELS
KV_DTYPES = {"bf16": "bf16", "bfloat16": "bf16", "fp8": "fp8"}
# AIConfigurator's default node: 8 GPUs, 10 us per inter-node hop (systems/*.yaml).
GPUS_PER_NODE = 8
P2P_LATENCY_MS = 0.01
MAX_GPUS = 4096  # collective groups beyond this are priced as this many GPUs
_COLLECTIVES = ("allreduce", "allgather", "reduce_scatter", "alltoall")
# Bytes each GPU sends over its slowest link per message byte in a ring (NCCL's busbw factor,
# the limit n -> inf of 2(n-1)/n and (n-1)/n).
_RING_FACTOR = {"allreduce": 2.0, "allgather": 1.0, "reduce_scatter": 1.0, "alltoall": 1.0}


@dataclass(frozen=True, kw_only=True)
class DatasheetRates:
    """Peak rates of a GPU without calibration (the GPU catalog supplies them).

    dense_flops: FLOP/s per precision key ("bf16", "fp8", "int8", "fp4"); a key that is
    absent is not native and its kernels fall back to weight-only bf16 GEMMs.
    memory_bw, intra_node_bw, inter_node_bw: bytes/s (per GPU, one direction for links).
    nvlink_domain: GPUs one NVLink domain joins (72 for an NVL72 rack); scale_out_bw: bytes/s
    between domains (None: inter_node_bw). extrapolate_from: a calibrated GPU whose fits carry
    over at these rates; softmax_exp_ratio: its published SFU exponential-rate change.
    """

    dense_flops: Mapping[str, float]
    memory_bw: float
    intra_node_bw: float
    inter_node_bw: float
    nvlink_domain: int = GPUS_PER_NODE
    scale_out_bw: float | None = None
    extrapolate_from: str | None = None
    softmax_exp_ratio: float = 1.0

    def as_sheet(self) -> dict[str, Any]:
        return {"dense_flops": dict(self.dense_flops), "memory_bw": self.memory_bw,
                "intra_node_bw": self.intra_node_bw, "inter_node_bw": self.inter_node_bw,
                "gpus_per_node": GPUS_PER_NODE, "p2p_latency_ms": P2P_LATENCY_MS,
                "nvlink_domain": self.nvlink_domain, "scale_out_bw": self.scale_out_bw}

    def key(self) -> tuple[Any, ...]:
        return (tuple(sorted(self.dense_flops.items())), self.memory_bw, self.intra_node_bw,
                self.inter_node_bw, self.nvlink_domain, self.scale_out_bw,
                self.extrapolate_from, self.softmax_exp_ratio)


def _f64(x: Any) -> FloatArray:
    return np.asarray(x, dtype=np.float64)


def _out(x: Any) -> FloatArray:
    """Results are float64 arrays, 0-d for all-scalar arguments."""
    return np.asarray(x, dtype=np.float64)


def _count(x: Any) -> FloatArray:
    """Counts (tokens, sequences, heads) below 1 are priced as 1: no zero divides."""
    return np.maximum(np.asarray(x, dtype=np.float64), 1.0)


class KernelModel:
    """Kernel times (ms) on one GPU; every numeric argument may be an array (broadcast)."""

    def __init__(self, gpu: str, *, calibrated: bool, fits: Mapping[str, Fit],
                 sheet: Mapping[str, Any], extrapolated: bool = False) -> None:
        self.gpu = gpu
        self.calibrated = calibrated
        self._own = "extrapolated" if extrapolated else "fitted"  # a sibling's fits
        self._fits = dict(fits)
        self._sheet = sheet
        self._resolved: dict[tuple[str, str], Fit | None] = {}
        self._comm: dict[str, tuple[list[np.ndarray], np.ndarray, np.ndarray, np.ndarray]] = {}

    # --- resolution: which fit serves a (family, kernel), and how it was obtained -----------

    def _resolve(self, family: str, kernel: str) -> Fit | None:
        key = (family, kernel)
        if key not in self._resolved:
            rule = kernel_rules.RULES.get(family)
            self._resolved[key] = rule(self, kernel) if rule else None
        return self._resolved[key]

    def fit(self, key: str, derived: bool = False) -> Fit | None:
        fit = self._fits.get(key)
        if fit is None or not derived:
            return fit
        return fit.replace("extrapolated" if self.calibrated else "datasheet")

    def measured(self, key: str) -> Fit | None:
        return self._fits.get(key)

    def peak(self, precision: str) -> float | None:
        value = self._sheet["dense_flops"].get(precision)
        return float(value) if value else None

    def scaled(self, fit: Fit, form_params: tuple[str, ...], name: str, ratio: float,
               **constants: float | bool) -> Fit:
        params = list(fit.params)
        params[form_params.index(name)] *= ratio
        return fit.replace("extrapolated" if self.calibrated else "datasheet",
                           params=tuple(params), **constants)

    def provenance(self, family: str, kernel: str) -> str:
        """How a family's times for `kernel` (or kv dtype) were obtained: fitted, extrapolated,
        or datasheet (see the module docstring).

        Families: gemm, moe, context_attention, decode_attention, attention (both),
        mla_context, mla_decode, mla (both; kernel "gemm/kv" or a kv dtype), allreduce,
        allgather, reduce_scatter, alltoall, comm (kernel = one of those), p2p ("intra" or
        "inter").
        """
        if family == "attention":
            return _weakest(self.provenance("context_attention", kernel),
                            self.provenance("decode_attention", kernel))
        if family == "mla":
            return _weakest(self.provenance("mla_context", kernel),
                            self.provenance("mla_decode", kernel))
        if family == "comm":
            return self.provenance(kernel, "")
        if family == "p2p":
            if kernel == "inter":
                return "datasheet"
            return "extrapolated" if self.calibrated else "datasheet"
        if family in _COLLECTIVES:
            return self._own if self.calibrated else "datasheet"
        fit = self._resolve(family, _normalize(family, kernel))
        if fit is None:
            raise InputError("kernel", kernel, f"no {family} model for it on {self.gpu}")
        return fit.provenance

    def _need(self, family: str, kernel: str, allowed: tuple[str, ...]) -> Fit:
        fit = self._resolved.get((family, kernel))
        if fit is None:
            if kernel not in allowed:
                raise InputError("kernel", kernel, f"{family} kernels are {', '.join(allowed)}")
            fit = self._resolve(family, kernel)
            if fit is None:
                raise InputError("kernel", kernel, f"no {family} model for it on {self.gpu}")
        return fit

    # --- compute ------------------------------------------------------------------------------

    def gemm_ms(self, kernel: str, m: Any, n: Any, k: Any) -> FloatArray:
        """Dense GEMM of m tokens through an n x k weight (vLLM's linear layer for `kernel`)."""
        f = self._need("gemm", kernel, GEMM_KERNELS)
        c = f.constants
        m, n, k = _count(m), _f64(n), _f64(k)
        t = kf.gemm_ms(f.params, m, n, k, a_bytes=c["a_bytes"], w_bytes=c["w_bytes"],
                       m_switch=c["m_switch"])
        grid = c.get("residual_log_ratio")
        if grid is not None:
            t = t * kf.gemm_residual_factor(grid, m, n, k)
        return _out(t)

    def context_attention_ms(self, batch: Any, q_len: Any, kv_len: Any, num_heads: Any,
                             num_kv_heads: Any, head_dim: Any, kv_dtype: str,
                             window: Any = 0) -> FloatArray:
        """Prefill attention: q_len new tokens per sequence attending to kv_len tokens in all
        (kv_len - q_len cached). Measured only without a prefix; the prefix enters through the
        causal pair count and the KV bytes read."""
        f = self._need("context_attention", _kv(kv_dtype), ("bf16", "fp8"))
        q = _count(q_len)
        return _out(kf.context_attention_ms(
            f.params, _count(batch), q, np.maximum(_f64(kv_len), q), _count(num_heads),
            _count(num_kv_heads), _f64(head_dim), _f64(window), kv_bytes=f.constants["kv_bytes"]))

    def decode_attention_ms(self, batch: Any, kv_len: Any, num_heads: Any, num_kv_heads: Any,
                            head_dim: Any, kv_dtype: str, window: Any = 0) -> FloatArray:
        """One new token per sequence attending to kv_len tokens (itself included)."""
        f = self._need("decode_attention", _kv(kv_dtype), ("bf16", "fp8"))
        return _out(kf.decode_attention_ms(
            f.params, _count(batch), _count(kv_len), _count(num_heads), _count(num_kv_heads),
            _f64(head_dim), _f64(window), kv_bytes=f.constants["kv_bytes"]))

    def mla_context_ms(self, gemm: str, batch: Any, seq_len: Any, num_heads: Any,
                       kv_dtype: str) -> FloatArray:
        """A whole DeepSeek-V3 MLA attention module over a prompt (no cached prefix).

        Includes what vLLM's DeepseekV2MLAAttention.forward runs: the fused q_a/kv_a down
        projection, both latent norms, q_b, kv_b, rotary, the causal attention kernel and
        o_proj, with `gemm` the projections' kernel key and num_heads the heads on this GPU
        (128 / TP). Excludes the TP all-reduce after o_proj. DeepSeek-V3 geometry (hidden
        7168, q_lora 1536, kv_lora 512, rope 64, nope 128, v 128; Kimi K2 shares it).
        """
        return self._mla("mla_context", gemm, _count(batch), _count(seq_len),
                         _count(num_heads), kv_dtype)

    def mla_decode_ms(self, gemm: str, batch: Any, kv_len: Any, num_heads: Any,
                      kv_dtype: str) -> FloatArray:
        """The same module for one decode token per sequence over kv_len cached tokens
        (kv_b absorbed into per-head BMMs against the latent cache, as vLLM runs it)."""
        return self._mla("mla_decode", gemm, _count(batch), _count(kv_len),
                         _count(num_heads), kv_dtype)

    def _mla(self, family: str, gemm: str, batch: np.ndarray, length: np.ndarray,
             heads: np.ndarray, kv_dtype: str) -> FloatArray:
        kernel = f"{gemm}/{_kv(kv_dtype)}"
        if gemm not in GEMM_KERNELS:
            raise InputError("kernel", gemm, f"MLA projection kernels are {GEMM_KERNELS}")
        f = self._need(family, kernel, (kernel,))
        c = f.constants
        features = (kf.mla_context_features if family == "mla_context"
                    else kf.mla_decode_features)
        tokens, weights, flop, moved, tiles = features(batch, length, heads, c["kv_bytes"],
                                                       kf.DSV3_MLA)
        if c.get("core_only"):
            core = kf.mla_module_ms(f.params, tokens, 0.0 * weights, flop, moved, tiles,
                                    w_bytes=c["w_bytes"], hidden=kf.DSV3_MLA["hidden"])
            return _out(core + self._mla_projections(gemm, tokens, heads))
        return _out(kf.mla_module_ms(f.params, tokens, weights, flop, moved, tiles,
                                     w_bytes=c["w_bytes"], hidden=kf.DSV3_MLA["hidden"]))

    def _mla_projections(self, gemm: str, tokens: np.ndarray, heads: np.ndarray) -> FloatArray:
        g = kf.DSV3_MLA
        qk = g["qk_nope_head_dim"] + g["qk_rope_head_dim"]
        shapes = ((g["q_lora_rank"] + g["kv_lora_rank"] + g["qk_rope_head_dim"], g["hidden"]),
                  (heads * qk, g["q_lora_rank"]),
                  (heads * (g["qk_nope_head_dim"] + g["v_head_dim"]), g["kv_lora_rank"]),
                  (g["hidden"], heads * g["v_head_dim"]))
        return sum((self.gemm_ms(gemm, tokens, n, k) for n, k in shapes),
                   start=np.zeros_like(tokens))

    def moe_ms(self, kernel: str, num_tokens: Any, hidden: Any, inter: Any, topk: Any,
               num_experts: Any, moe_tp: Any, moe_ep: Any,
               imbalance: str = "power_law_1.01") -> FloatArray:
        """vLLM's fused MoE on the busiest EP rank. num_tokens counts every token entering
        the layer (all DP ranks under attention DP); inter is the full expert width (split by
        moe_tp); imbalance names AIConfigurator's routing distributions: "balanced",
        "power_law_1.01" (heavy skew) or "power_law_1.2"."""
        f = self._need("moe", kernel, MOE_KERNELS)
        if imbalance not in kf.DISTRIBUTIONS:
            raise InputError("imbalance", imbalance, f"one of {', '.join(kf.DISTRIBUTIONS)}")
        return _out(kf.moe_ms(f.params, _count(num_tokens), _f64(hidden), _f64(inter),
                              _count(topk), _count(num_experts), _count(moe_tp), _count(moe_ep),
                              kf.moe_skew(f.params, imbalance), w_bytes=f.constants["w_bytes"]))

    # --- communication ------------------------------------------------------------------------

    def allreduce_ms(self, n_gpus: Any, message_bytes: Any) -> FloatArray:
        """What vLLM runs: its custom all-reduce under CUDA graphs (NCCL above the custom
        buffer, by vLLM's own dispatch, inside the measurement); NCCL where vLLM has no
        custom all-reduce (PCIe GPUs such as L40S). n_gpus is rounded to an integer; 1 or
        fewer costs nothing; past GPUS_PER_NODE the inter-node links are added."""
        return self._collective("allreduce", n_gpus, message_bytes)

    def allgather_ms(self, n_gpus: Any, message_bytes: Any) -> FloatArray:
        """NCCL all-gather; message_bytes is the gathered buffer (nccl-tests' size)."""
        return self._collective("allgather", n_gpus, message_bytes)

    def reduce_scatter_ms(self, n_gpus: Any, message_bytes: Any) -> FloatArray:
        """NCCL reduce-scatter; message_bytes is the full input buffer."""
        return self._collective("reduce_scatter", n_gpus, message_bytes)

    def alltoall_ms(self, n_gpus: Any, message_bytes: Any) -> FloatArray:
        """NCCL all-to-all; message_bytes is each rank's whole send buffer."""
        return self._collective("alltoall", n_gpus, message_bytes)

    def p2p_ms(self, message_bytes: Any, inter_node: Any) -> FloatArray:
        """Send message_bytes to one peer: inside the NVLink domain from the 2-GPU all-gather
        (which moves half its buffer each way), across domains at the datasheet scale-out
        rate (`inter_node` says which)."""
        b = _f64(message_bytes)
        intra = self._collective("allgather", 2.0, 2.0 * b)
        inter = self._sheet["p2p_latency_ms"] + 1e3 * b / _scale_out(self._sheet)
        return _out(np.where(np.asarray(inter_node, dtype=bool), inter, intra))

    def _collective(self, op: str, n_gpus: Any, message_bytes: Any) -> FloatArray:
        params, offset, slope, alone = self._comm_table(op)
        # GPU counts are integers: index per-count tables instead of interpolating per call.
        idx = np.clip(np.rint(_f64(n_gpus)), 0, len(alone) - 1).astype(np.intp)
        b = _f64(message_bytes)
        t = kf.collective_ms([c[idx] for c in params], b) + offset[idx] + slope[idx] * b
        return _out(np.where(alone[idx], 0.0, t))

    def _comm_table(self, op: str) -> tuple[list[np.ndarray], np.ndarray, np.ndarray,
                                            np.ndarray]:
        """Per GPU count 0..MAX_GPUS: form parameters, inter-domain offset and slope, n <= 1.

        The parameters interpolate in log2(n) between the measured counts (2, 4, 8). Past 8 in
        an NVLink domain (NVL72) NCCL keeps the NVLink bus rate: each GPU moves (n-1)/n of the
        buffer (measured: 7/8), one hop latency per doubling. Past the domain the ring crosses
        the scale-out links: their bandwidth and a hop latency per doubling (datasheet).
        """
        table = self._comm.get(op)
        if table is None:
            rows = self._comm_rows(op)
            grid = np.log2([float(n) for n, _ in rows])
            gpn = float(self._sheet["gpus_per_node"])
            top = min(2.0 ** grid[-1], gpn)
            domain = max(float(self._sheet.get("nvlink_domain", gpn)), top)
            n = np.arange(MAX_GPUS + 1, dtype=np.float64)
            inside = np.log2(np.clip(n, 2.0 ** grid[0], top))
            params = [np.interp(inside, grid, [f.params[i] for _, f in rows])
                      for i in range(len(kf.COMM_PARAMS))]
            wide = np.clip(n, top, domain)
            for i in (kf.COMM_PARAMS.index("alg_bw"), kf.COMM_PARAMS.index("alg_bw2")):
                params[i] = params[i] * ((top - 1.0) / top) / ((wide - 1.0) / wide)
            lat = self._sheet["p2p_latency_ms"]
            across = n > domain
            hops = np.log2(np.maximum(n / domain, 1.0))
            offset = lat * np.log2(wide / top) + np.where(across, lat * hops, 0.0)
            slope = np.where(across, 1e3 * _RING_FACTOR[op] / _scale_out(self._sheet), 0.0)
            table = (params, offset, slope, n <= 1.0)
            self._comm[op] = table
        return table

    def _comm_rows(self, op: str) -> list[tuple[int, Fit]]:
        names = ["custom_allreduce", "allreduce"] if op == "allreduce" else [op]
        for name in names:
            prefix = f"comm/{name}/"
            rows = sorted((int(k[len(prefix):]), f) for k, f in self._fits.items()
                          if k.startswith(prefix))
            if rows:
                return rows
        raise InputError("gpu", self.gpu, f"no {op} model")


def _scale_out(sheet: Mapping[str, Any]) -> float:
    """Bytes/s between NVLink domains: the sheet's scale-out rate, else its inter-node one."""
    return float(sheet.get("scale_out_bw") or sheet["inter_node_bw"])


def _weakest(a: str, b: str) -> str:
    order = ("fitted", "extrapolated", "datasheet")
    return order[max(order.index(a), order.index(b))]


def _kv(kv_dtype: str) -> str:
    kv = KV_DTYPES.get(kv_dtype)
    if kv is None:
        raise InputError("kv_dtype", kv_dtype, "one of bf16, fp8")
    return kv


def _normalize(family: str, kernel: str) -> str:
    if family in ("context_attention", "decode_attention"):
        return _kv(kernel)
    if family in ("mla_context", "mla_decode"):
        gemm, _, kv = kernel.rpartition("/")
        gemm = gemm or "bf16"
        if gemm not in GEMM_KERNELS:
            raise InputError("kernel", gemm, f"MLA projection kernels are {GEMM_KERNELS}")
        return f"{gemm}/{_kv(kv)}"
    if family in ("gemm", "moe") and kernel not in GEMM_KERNELS:
        raise InputError("kernel", kernel, f"{family} kernels are {', '.join(GEMM_KERNELS)}")
    if family not in kernel_rules.RULES:
        raise InputError("family", family, "not a kernel family")
    return kernel


# --- Loading -----------------------------------------------------------------------------------

@functools.cache
def calibration() -> dict[str, Any]:
    """The shipped calibration document (parsed once)."""
    data = importlib.resources.files("trilemma.optimizer.perf") / "data" / "calibration.json"
    doc: dict[str, Any] = json.loads(data.read_text(encoding="utf-8"))
    return doc


def calibrated_gpus() -> tuple[str, ...]:
    return tuple(sorted(calibration()["gpus"]))


# CPU-side floors the profiles measured in eager mode; a CUDA-graph replay does not pay them.
_HOST_PARAMS = ("host_ms", "host_large_ms")


def _to_fit(entry: Mapping[str, Any], provenance: str,
            params: Mapping[str, float] | None = None, *, cuda_graphs: bool = False,
            floor_ms: float = 0.0) -> Fit:
    names = kf.FORM_PARAMS[entry["form"]]
    values = dict(entry["params"] if params is None else params)
    if cuda_graphs:  # the host floors go; a device floor the fit could not see comes back
        values.update({n: 0.0 for n in _HOST_PARAMS if n in values})
        values = graph_floor.with_floor(values, entry["form"], floor_ms)
    constants = dict(entry["constants"])
    if "m_switch" in constants and constants["m_switch"] is None:
        constants["m_switch"] = math.inf
    return Fit(tuple(float(values[n]) for n in names), constants, provenance)


def _datasheet_fits(sheet: dict[str, Any], cuda_graphs: bool) -> dict[str, Fit]:
    """Median calibrated efficiencies times this GPU's datasheet rates, per fit key."""
    fits: dict[str, Fit] = {}
    for key, entry in calibration()["datasheet_defaults"].items():
        params = dict(entry["params"])
        for name in entry["relative"]:
            ref = kf.rate_reference(name, key, sheet)
            if ref is None:
                break  # a precision this GPU lacks: the resolution rules fall back
            params[name] = params[name] * ref
        else:
            fits[key] = _to_fit(entry, "datasheet", params, cuda_graphs=cuda_graphs)
    return fits


def _extrapolated_fits(base: Mapping[str, Any], sheet: dict[str, Any], exp_ratio: float,
                       cuda_graphs: bool) -> dict[str, Fit]:
    """A calibrated sibling's fits, its efficiencies kept, each rate times the ratio of the
    datasheet figure it scales with (kf.RATE_REFERENCE: 1.5x the fp4 peak, 1.5x the fp4 GEMM
    roofline). The softmax exponential rate (SFUs) follows the clock like bf16, times
    `exp_ratio` (2x on Blackwell Ultra). A fit of a precision this GPU lacks is dropped: the
    resolution rules fall back as on any GPU."""
    fits: dict[str, Fit] = {}
    floor = graph_floor.device_floor_ms(base["fits"])
    for key, entry in base["fits"].items():
        params = dict(entry["params"])
        for name in params:
            if name not in kf.RATE_REFERENCE:
                continue
            new = kf.rate_reference(name, key, sheet)
            old = kf.rate_reference(name, key, base["datasheet"])
            if not new or not old:
                break
            params[name] *= new / old * (exp_ratio if name == "exp_rate" else 1.0)
        else:
            fits[key] = _to_fit(entry, "extrapolated", params, cuda_graphs=cuda_graphs,
                                floor_ms=floor)
    return fits


_MODELS: dict[tuple[Any, ...], KernelModel] = {}


def kernel_model(gpu_key: str, *, datasheet: DatasheetRates | None = None,
                 cuda_graphs: bool = False, engine: str = "vllm") -> KernelModel:
    """The kernel model of a GPU: calibrated when the JSON has it (then `datasheet` is not
    needed and not used), else datasheet rooflines from `datasheet`. Cached per key.
    `cuda_graphs=True` prices a CUDA-graph replay, as vLLM runs its steps: the eager host
    floors (60-200 us for block-fp8 GEMMs) vanish, device floors stay (perf/graph_floor.py).
    `engine`: whose kernels (perf/engine_kernels.py); a sibling-extrapolated GPU inherits
    the engine's fits of its sibling."""
    cache_key = (gpu_key, cuda_graphs, engine, datasheet.key() if datasheet else None)
    model = _MODELS.get(cache_key)
    if model is None:
        gpus = engine_kernels.gpus(calibration(), engine)
        if gpu_key in gpus:
            entry, floor = gpus[gpu_key], graph_floor.device_floor_ms(gpus[gpu_key]["fits"])
            fits = {k: _to_fit(f, "fitted", cuda_graphs=cuda_graphs, floor_ms=floor)
                    for k, f in entry["fits"].items()}
            model = KernelModel(gpu_key, calibrated=True, fits=fits, sheet=entry["datasheet"])
        elif datasheet is None:
            raise InputError("gpu", gpu_key, "no calibration for it and no datasheet rates; "
                             f"calibrated GPUs: {', '.join(sorted(gpus))}")
        else:
            sheet = datasheet.as_sheet()
            base = gpus.get(datasheet.extrapolate_from or "")
            if base is not None:
                fits = _extrapolated_fits(base, sheet, datasheet.softmax_exp_ratio, cuda_graphs)
                model = KernelModel(gpu_key, calibrated=True, fits=fits, sheet=sheet,
                                    extrapolated=True)
            else:
                model = KernelModel(gpu_key, calibrated=False,
                                    fits=_datasheet_fits(sheet, cuda_graphs), sheet=sheet)
        _MODELS[cache_key] = model
    return model
