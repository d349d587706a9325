"""Which fit serves a kernel that has none of its own: rules deriving it from a measured
sibling (another precision, the other KV width, a module without its projections) or from the
datasheet. kernels.KernelModel applies them once per (family, kernel) and caches the result.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from trilemma.optimizer.perf import kernel_forms as kf


@dataclass(frozen=True)
class Fit:
    """A form's parameters (in *_PARAMS order) and constants, ready for the hot path."""

    params: tuple[float, ...]
    constants: Mapping[str, Any]
    provenance: str

    def replace(self, provenance: str, *, params: tuple[float, ...] | None = None,
                **constants: float | bool) -> Fit:
        return Fit(self.params if params is None else params,
                    {**self.constants, **constants}, provenance)


class FitSource(Protocol):
    """What a rule reads of a kernel model: its own fits and the datasheet peaks."""

    @property
    def calibrated(self) -> bool: ...

    def fit(self, key: str, derived: bool = False) -> Fit | None:
        """The fit stored under `key`; `derived` relabels it as extrapolated/datasheet."""
        ...

    def measured(self, key: str) -> Fit | None:
        """The fit stored under `key`, as it is."""
        ...

    def peak(self, precision: str) -> float | None: ...

    def scaled(self, fit: Fit, form_params: tuple[str, ...], name: str, ratio: float,
               **constants: float | bool) -> Fit: ...


Rule = Callable[[FitSource, str], Fit | None]


def _gemm_rule(km: FitSource, kernel: str) -> Fit | None:
    fit = km.fit(f"gemm/{kernel}")
    if fit is not None:
        return fit
    bf16, fp8 = km.measured("gemm/bf16"), km.measured("gemm/fp8")
    native = km.peak(kf.COMPUTE_PRECISION[kernel])
    p = kf.GEMM_PARAMS
    a, w = kf.ACT_BYTES[kernel], kf.WEIGHT_BYTES[kernel]
    fp8_peak, bf16_peak = km.peak("fp8"), km.peak("bf16")
    if native and kernel in ("int8", "fp4") and fp8 is not None and fp8_peak:
        # Same quantize-then-GEMM structure as fp8, at this format's peak.
        return km.scaled(fp8, p, "flops", native / fp8_peak, a_bytes=a, w_bytes=w)
    label = "extrapolated" if km.calibrated else "datasheet"
    if native and kernel == "fp8_block" and fp8 is not None:
        return fp8.replace(label, a_bytes=a, w_bytes=w)
    if native and kernel in ("int8", "fp8") and bf16 is not None and bf16_peak:
        return km.scaled(bf16, p, "flops", native / bf16_peak, a_bytes=a, w_bytes=w)
    if bf16 is None:
        return None
    # Weight-only: 4-bit (w4a16, mxfp4) everywhere, and fp8/fp4 weights on GPUs without those
    # tensor cores, which vLLM runs as Marlin W8A16 / W4A16: bf16 math, narrow weight reads.
    return bf16.replace(label, a_bytes=2.0, w_bytes=w)


def _attention_rule(family: str) -> Rule:
    def rule(km: FitSource, kv: str) -> Fit | None:
        fit = km.fit(f"{family}/{kv}")
        if fit is not None:
            return fit
        other = km.fit(f"{family}/{'bf16' if kv == 'fp8' else 'fp8'}", derived=True)
        # The same kernel reading KV elements of the other width.
        return None if other is None else other.replace(other.provenance,
                                                        kv_bytes=kf.KV_BYTES[kv])
    return rule


def _moe_rule(km: FitSource, kernel: str) -> Fit | None:
    fit = km.fit(f"moe/{kernel}")
    if fit is not None:
        return fit
    label = "extrapolated" if km.calibrated else "datasheet"
    w = kf.WEIGHT_BYTES[kernel]
    native = km.peak(kf.COMPUTE_PRECISION[kernel])
    fp8 = km.measured("moe/fp8") or km.measured("moe/fp8_block")
    fp8_peak = km.peak("fp8")
    if native and kernel in ("int8", "fp4") and fp8 is not None and fp8_peak:
        return km.scaled(fp8, kf.MOE_PARAMS, "flops", native / fp8_peak, w_bytes=w)
    if native and kernel in ("fp8", "fp8_block") and fp8 is not None:
        return fp8.replace(label, w_bytes=w)
    # 4-bit experts (and fp8/fp4 without the tensor cores) run Marlin-style weight-only
    # kernels: the measured w4a16/mxfp4 fit if there is one, else the bf16 fit.
    for key in ("moe/w4a16", "moe/mxfp4", "moe/bf16"):
        base = km.measured(key)
        if base is not None and (kernel in ("w4a16", "mxfp4", "fp4") or key == "moe/bf16"):
            return base.replace(label, w_bytes=w)
    return None


def _mla_rule(family: str) -> Rule:
    def rule(km: FitSource, kernel: str) -> Fit | None:
        fit = km.fit(f"{family}/{kernel}")
        if fit is not None:
            return fit
        gemm, _, kv = kernel.partition("/")
        label = "extrapolated" if km.calibrated else "datasheet"
        other_kv = "bf16" if kv == "fp8" else "fp8"
        w_bytes, kv_bytes = kf.WEIGHT_BYTES[gemm], kf.KV_BYTES[kv]
        # Another measured module: same KV first, then the projections' width changed.
        for key in (f"{family}/bf16/{kv}", f"{family}/{gemm}/{other_kv}",
                    f"{family}/bf16/{other_kv}"):
            base = km.measured(key)
            if base is not None:
                return base.replace(label, w_bytes=w_bytes, kv_bytes=kv_bytes)
        # A100: only the attention kernel was measured; kernels.py adds the projections.
        for key in (f"{family}_core/{kv}", f"{family}_core/{other_kv}"):
            base = km.measured(key)
            if base is not None:
                return base.replace(label, core_only=True, w_bytes=w_bytes, kv_bytes=kv_bytes)
        return None
    return rule


RULES: dict[str, Rule] = {
    "gemm": _gemm_rule, "moe": _moe_rule,
    "context_attention": _attention_rule("context_attention"),
    "decode_attention": _attention_rule("decode_attention"),
    "mla_context": _mla_rule("mla_context"), "mla_decode": _mla_rule("mla_decode"),
}
