"""Quantization recipes and KV-cache dtypes: closed sets that carry their facts.

A recipe knows its weight bytes, the number format its GEMMs run in on a given GPU, the key of
the calibration table perf/ reads for those GEMMs, which GPUs a serving engine (vLLM) can run it
on and why not elsewhere, and its accuracy cost versus bf16 (data/quant_quality.yaml, built from
published evaluations by build_quant_quality.py). Sits on gpus.py; perf/ reads it.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trilemma.optimizer.catalog.data_files import read_yaml
from trilemma.optimizer.catalog.gpus import Arch, Gpu
from trilemma.optimizer.errors import InputError

QUALITY_FILE = "quant_quality.yaml"


class Precision(enum.StrEnum):
    """A number format: what tensor cores consume, or (INT4) how weights are stored.

    A StrEnum so that `gpu.supports(Precision.FP8)` and `gpu.dense_flops[Precision.FP8]` work.
    """

    BF16 = "bf16"
    FP8 = "fp8"
    INT8 = "int8"
    FP4 = "fp4"
    # Storage only: no engine here runs int4 x int4 GEMMs, so no GPU lists int4 FLOP/s and
    # int4 weights are dequantized to bf16 in the GEMM (W4A16).
    INT4 = "int4"

    @property
    def bytes(self) -> float:
        return _PRECISION_BYTES[self]

    @property
    def key(self) -> str:
        """The key of Gpu.dense_flops for this format."""
        return self.value


_PRECISION_BYTES: dict[Precision, float] = {
    Precision.BF16: 2.0,
    Precision.FP8: 1.0,
    Precision.INT8: 1.0,
    Precision.FP4: 0.5,
    Precision.INT4: 0.5,
}


@dataclass(frozen=True, kw_only=True)
class _RecipeFacts:
    weight_bytes: float
    weight_precision: Precision
    archs: frozenset[Arch]  # where vLLM runs it
    unsupported_why: str  # why not, elsewhere


_NVIDIA_SM80_PLUS = frozenset({Arch.AMPERE, Arch.ADA, Arch.HOPPER, Arch.BLACKWELL})
_FP8_ARCHS = frozenset({Arch.ADA, Arch.HOPPER, Arch.BLACKWELL, Arch.CDNA3})


class QuantRecipe(enum.StrEnum):
    """How linear-layer weights (and activations) are quantized. CLI value == enum value."""

    BF16 = "bf16"  # weights bf16, activations bf16
    FP8 = "fp8"  # W8A8 fp8 (e4m3), per-tensor or block scales
    INT8 = "int8"  # W8A8 int8 (SmoothQuant-style)
    INT4 = "int4"  # W4A16 AWQ/GPTQ (Marlin kernels): 4-bit weights, bf16 math
    NVFP4 = "nvfp4"  # W4A4 NVIDIA fp4 (Blackwell only)
    MXFP4 = "mxfp4"  # OCP MX fp4 weights: W4A4 on Blackwell; W4A16 (Marlin/Triton) elsewhere

    @property
    def weight_bytes(self) -> float:
        """Bytes per linear-layer weight, scales included."""
        return _RECIPES[self].weight_bytes

    @property
    def weight_precision(self) -> Precision:
        return _RECIPES[self].weight_precision

    def unsupported_reason(self, gpu: Gpu) -> str | None:
        """Why vLLM cannot run this recipe on `gpu`, or None when it can."""
        facts = _RECIPES[self]
        if gpu.arch in facts.archs:
            return None
        return f"{self.value} is not supported on {gpu.name}: {facts.unsupported_why}"

    def supported_on(self, gpu: Gpu) -> bool:
        return self.unsupported_reason(gpu) is None

    def compute_precision(self, gpu: Gpu) -> Precision:
        """The number format the GEMMs run in on `gpu` (INT4 -> BF16; MXFP4 -> FP4 on Blackwell).

        Raises InputError(field="quant") when the recipe does not run on `gpu` at all, so a
        caller cannot price a configuration that would not start.
        """
        self._require(gpu)
        if self is QuantRecipe.MXFP4:
            return Precision.FP4 if gpu.arch is Arch.BLACKWELL else Precision.BF16
        return _COMPUTE[self]

    def gemm_kernel_key(self, gpu: Gpu) -> str:
        """Calibration-table key for this recipe's GEMMs: bf16 | fp8 | int8 | w4a16 | fp4."""
        precision = self.compute_precision(gpu)
        if precision is Precision.BF16 and self.weight_precision is not Precision.BF16:
            return "w4a16"  # 4-bit weights dequantized in a bf16 GEMM (Marlin / Triton)
        return precision.key

    def _require(self, gpu: Gpu) -> None:
        why = self.unsupported_reason(gpu)
        if why is not None:
            raise InputError("quant", self.value, why)


# Weight bytes include the scales the format carries:
#   int4: 0.5 + one bf16 scale and one 4-bit zero point per group of 128 (AWQ) = 0.5195;
#         GPTQ's symmetric variant (no zero point) is 0.5156. Checkpoints with group 32 (Kimi
#         K2.5) carry 0.5625; the difference is under 10% of weight memory.
#   nvfp4: 0.5 + one fp8 (e4m3) scale per 16 elements = 0.5625 (plus a negligible fp32 per tensor).
#   mxfp4: 0.5 + one e8m0 scale per 32 elements = 0.53125.
#   fp8 block scales (one fp32 per 128x128 tile) add 0.0002 B: negligible.
_RECIPES: dict[QuantRecipe, _RecipeFacts] = {
    QuantRecipe.BF16: _RecipeFacts(
        weight_bytes=2.0,
        weight_precision=Precision.BF16,
        archs=frozenset(Arch),
        unsupported_why="",
    ),
    QuantRecipe.FP8: _RecipeFacts(
        weight_bytes=1.0,
        weight_precision=Precision.FP8,
        archs=_FP8_ARCHS,
        unsupported_why=(
            "fp8 W8A8 needs fp8 tensor cores (NVIDIA sm89+: Ada, Hopper, Blackwell; AMD "
            "MI300-series), per vLLM's quantization hardware table. vLLM can still load an fp8 "
            "checkpoint there as weight-only W8A16 through FP8 Marlin, which this recipe does "
            "not model: use bf16 or int4 instead"
        ),
    ),
    QuantRecipe.INT8: _RecipeFacts(
        weight_bytes=1.0,
        weight_precision=Precision.INT8,
        # Blackwell has int8 tensor cores, but vLLM's CUTLASS int8 GEMMs are not built for
        # sm100/sm120 (vllm-project/vllm#25935 makes it fail early; #54311 tracks the Triton
        # fallback), so a W8A8 int8 checkpoint does not start there today. ROCm runs int8 via
        # AITER / Triton scaled-mm (vllm-project/vllm#15433, #9857).
        archs=frozenset({Arch.AMPERE, Arch.ADA, Arch.HOPPER, Arch.CDNA3}),
        unsupported_why=(
            "vLLM's int8 W8A8 GEMMs run on NVIDIA Ampere/Ada/Hopper and AMD MI300-series; on "
            "Blackwell (sm100/sm120) its CUTLASS int8 kernels are not built (vllm-project/vllm"
            "#25935): use fp8 or nvfp4 instead"
        ),
    ),
    QuantRecipe.INT4: _RecipeFacts(
        weight_bytes=0.51953125,
        weight_precision=Precision.INT4,
        # NVIDIA: Marlin W4A16 kernels need sm80+ (vLLM hardware table); AIC measured int4
        # weight-only MoE kernels on H100/H200/B200/L40S with vLLM 0.24.
        # AMD: uncertain. vLLM's hardware table (v0.14) marks AWQ/GPTQ unsupported on AMD GPUs,
        # yet vLLM ships a Triton AWQ GEMM for ROCm (vllm-project/vllm#7386, "not fully
        # optimized") and Kimi K2.5's int4 checkpoint is served on MI325X (Vultr ROCm
        # cookbook). We allow it; the w4a16 timing is a datasheet estimate there.
        archs=_NVIDIA_SM80_PLUS | {Arch.CDNA3},
        unsupported_why="W4A16 Marlin kernels need NVIDIA sm80+ (or AMD MI300-series via Triton)",
    ),
    QuantRecipe.NVFP4: _RecipeFacts(
        weight_bytes=0.5625,
        weight_precision=Precision.FP4,
        archs=frozenset({Arch.BLACKWELL}),
        unsupported_why=(
            "nvfp4 W4A4 needs Blackwell fp4 tensor cores (B200, B300, GB200, GB300, "
            "RTX PRO 6000); use fp8 or int4 instead"
        ),
    ),
    QuantRecipe.MXFP4: _RecipeFacts(
        weight_bytes=0.53125,
        weight_precision=Precision.FP4,
        # Native fp4 math on Blackwell; elsewhere vLLM dequantizes MXFP4 weights into bf16
        # GEMMs: Marlin on Ampere/Ada/Hopper (vLLM gpt-oss recipe; AIC measured w4a16_mxfp4
        # MoE kernels on H100/H200/L40S), Triton on MI300X/MI325X (vLLM gpt-oss recipe).
        archs=_NVIDIA_SM80_PLUS | {Arch.CDNA3},
        unsupported_why="MXFP4 needs NVIDIA sm80+ (Marlin W4A16) or AMD MI300-series (Triton)",
    ),
}

_COMPUTE: dict[QuantRecipe, Precision] = {
    QuantRecipe.BF16: Precision.BF16,
    QuantRecipe.FP8: Precision.FP8,
    QuantRecipe.INT8: Precision.INT8,
    QuantRecipe.INT4: Precision.BF16,
    QuantRecipe.NVFP4: Precision.FP4,
}


class KvDtype(enum.StrEnum):
    """The KV-cache element type."""

    BF16 = "bf16"
    FP8 = "fp8"

    @property
    def bytes(self) -> float:
        return 2.0 if self is KvDtype.BF16 else 1.0

    def supported_on(self, gpu: Gpu) -> bool:
        """fp8 KV needs fp8 hardware (sm89+, MI300-series).

        vLLM can store an fp8 KV cache on Ampere too, dequantizing in software in some
        attention backends, but the measured A100 profiles (AIC, vLLM 0.14) hold only bf16 KV
        and the saving there is capacity, not speed. We refuse it on A100 rather than price a
        path nobody measured.
        """
        return self is KvDtype.BF16 or gpu.supports(Precision.FP8)


_RECIPE_ALIASES = {
    "bfloat16": QuantRecipe.BF16,
    "awq": QuantRecipe.INT4,
    "gptq": QuantRecipe.INT4,
    "w4a16": QuantRecipe.INT4,
}


def parse_recipe(text: str, field: str = "quant") -> QuantRecipe:
    """A recipe from user text ("fp8", "INT4", "awq"); InputError listing the valid values."""
    name = text.strip().lower() if isinstance(text, str) else ""
    try:
        return QuantRecipe(name)
    except ValueError:
        pass
    if name in _RECIPE_ALIASES:
        return _RECIPE_ALIASES[name]
    valid = ", ".join(r.value for r in QuantRecipe)
    raise InputError(field, text, f"unknown quantization; must be one of {valid}")


# ---- accuracy cost ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class QualityDelta:
    """Accuracy change in benchmark points versus bf16 (negative = worse), with its source."""

    points: float
    source: str
    fallback: bool = False  # True when no row covers this family: the recipe's cross-family median
    rows: int = 0  # published measurements averaged


def normalize_family(family: str) -> str:
    """A model family in the table's spelling: lower case, '_' separators, known aliases.

    A separator before a version number goes ("llama-3.1" -> "llama3.1" -> "llama3").
    """
    name = re.sub(r"[\s_\-]+(?=\d)", "", family.strip().lower())
    name = re.sub(r"[\s\-]+", "_", name)
    return str(_quality_table()["family_aliases"].get(name, name))


def quality_delta(recipe: QuantRecipe, model_family: str) -> QualityDelta:
    """The accuracy cost of `recipe` for a model family, from data/quant_quality.yaml.

    A family with no published rows (or an unknown one) gets the recipe's cross-family median,
    flagged `fallback`; a family whose checkpoints are released in that format gets 0.
    """
    if recipe is QuantRecipe.BF16:
        return QualityDelta(points=0.0, source="bf16 is the reference precision")
    family = normalize_family(model_family)
    entry: Mapping[str, Any] = _quality_table()["recipes"][recipe.value]
    native = entry.get("native", {})
    if family in native:
        return QualityDelta(points=0.0, source=str(native[family]))
    fam = entry.get("families", {}).get(family)
    if fam is not None:
        sources = sorted({str(row["source"]) for row in fam["rows"]})
        return QualityDelta(
            points=float(fam["points"]),
            source=f"mean of {len(fam['rows'])} published deltas: " + "; ".join(sources),
            rows=len(fam["rows"]),
        )
    fb = entry["fallback"]
    return QualityDelta(
        points=float(fb["points"]),
        source=f"no published rows for family {family!r}; {fb['source']}",
        fallback=True,
        rows=int(fb.get("rows", 0)),
    )


def load_quality_raw() -> dict[str, Any]:
    """The parsed data/quant_quality.yaml, as shipped."""
    return read_yaml(__package__, "data", QUALITY_FILE)


@functools.cache
def _quality_table() -> dict[str, Any]:
    return load_quality_raw()


def checkpoint_reason(checkpoint: str | None, recipe: QuantRecipe) -> str | None:
    """Why `recipe` cannot be served from a checkpoint stored as `checkpoint`; None if it can.

    vLLM and SGLang read a pre-quantized checkpoint's format from its config and quantize on
    the fly only to fp8: every other recipe needs a checkpoint already in that format (the
    catalog bundles such variants as their own model ids, e.g. nvidia/DeepSeek-R1-NVFP4).
    """
    if checkpoint == recipe.value:
        return None
    if checkpoint is None and recipe in (QuantRecipe.BF16, QuantRecipe.FP8):
        return None
    have = checkpoint or "bf16"
    return (f"a {have} checkpoint; {recipe.value} needs a checkpoint already quantized to "
            f"{recipe.value} (only fp8 is quantized on the fly)")
