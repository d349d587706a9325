"""A pre-quantized checkpoint's own quantization: its recipe, KV format and the parts it
leaves in 16 bits, read from quantization_config (config.json) or a ModelOpt
hf_quant_config.json. hf_config.py calls it while parsing a config.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from trilemma.optimizer.errors import InputError

# Parts a pre-quantized checkpoint leaves in 16 bits whatever its exclusion list says: lookups,
# norms and the router are tiny or precision-critical, and no bundled recipe quantizes lm_head.
ALWAYS_UNQUANTIZED = frozenset({"embedding", "lm_head", "norms", "router"})

# Exclusion-list entries (regex escapes removed) -> ParamBreakdown parts. An entry excludes the
# whole part even if it names one layer: the exports we know exclude a part everywhere or nowhere.
_EXCLUSION_PARTS = (
    (re.compile(r"self_attn"), "attention"),
    (re.compile(r"shared_expert"), "shared_experts"),
    # "mlp.gate_proj" or Kimi's "mlp.(gate|up|gate_up|down)_proj", but not the router "mlp.gate".
    (re.compile(r"mlp\.\(?(gate|up|gate_up|down)[|a-z_]*\)?_proj"), "dense_mlp"),
)
# ModelOpt algorithm fragment -> quantization.QuantRecipe value; fp4 first, so that
# "W4A8_MXFP4_FP8" reads as mxfp4 weights.
_MODELOPT = (("NVFP4", "nvfp4"), ("MXFP4", "mxfp4"), ("FP8", "fp8"), ("AWQ", "int4"),
             ("W4A16", "int4"), ("W8A8", "int8"), ("INT4", "int4"), ("INT8", "int8"))


def checkpoint_quant(
    quantization_config: Mapping[str, Any] | None,
    hf_quant_config: Mapping[str, Any] | None,
    field: str,
) -> tuple[str | None, str | None, frozenset[str]]:
    """(weight recipe, KV-cache dtype, parts left 16-bit) of a pre-quantized checkpoint.

    Recipes are quantization.QuantRecipe values. hf_quant_config.json wins over config.json's
    quantization_config: ModelOpt exports leave config.json as it was.
    """
    recipe: str | None
    if hf_quant_config is not None:
        section = hf_quant_config.get("quantization", hf_quant_config)
        where = "hf_quant_config.quantization."
        recipe = _modelopt(section.get("quant_algo"), where + "quant_algo")
        kv = _modelopt(section.get("kv_cache_quant_algo"), where + "kv_cache_quant_algo")
        return recipe, kv, _unquantized(recipe, section.get("exclude_modules") or [])
    if not quantization_config:
        return None, None, frozenset()
    qc = quantization_config
    method = str(qc.get("quant_method", "")).lower()
    if method in ("fp8", "fbgemm_fp8", "mxfp4"):
        recipe = method.removeprefix("fbgemm_")
    elif method in ("awq", "gptq", "awq_marlin", "gptq_marlin"):
        recipe = _int_bits(qc.get("bits"), field + ".bits")
    elif method == "compressed-tensors":
        recipe = _compressed_tensors(qc, field)
    elif method == "modelopt":
        recipe = _modelopt(qc.get("quant_algo"), field + ".quant_algo")
    else:
        raise InputError(field + ".quant_method", method or None, "not modelled; known: fp8, "
                         "mxfp4, awq, gptq, compressed-tensors, modelopt")
    excluded = [*(qc.get("modules_to_not_convert") or []), *(qc.get("ignore") or [])]
    return recipe, None, _unquantized(recipe, excluded)


def _unquantized(recipe: str | None, excluded: Iterable[str]) -> frozenset[str]:
    if recipe is None:
        return frozenset()
    parts = set(ALWAYS_UNQUANTIZED)
    for entry in excluded:
        text = str(entry).removeprefix("re:").replace("\\", "")
        parts.update(part for pattern, part in _EXCLUSION_PARTS if pattern.search(text))
    return frozenset(parts)


def _modelopt(algo: object, field: str) -> str | None:
    if algo is None:
        return None
    recipe = next((r for fragment, r in _MODELOPT if fragment in str(algo).upper()), None)
    if recipe is None:
        raise InputError(field, algo, "unknown ModelOpt algorithm; known: FP8*, NVFP4, MXFP4, "
                         "W4A16_AWQ, W8A8_SQ*")
    return recipe


def _int_bits(bits: object, field: str) -> str:
    if bits not in (4, 8):
        raise InputError(field, bits, "only 4- and 8-bit integer checkpoints are modelled")
    return f"int{bits}"


def _compressed_tensors(qc: Mapping[str, Any], field: str) -> str:
    """compressed-tensors gives bits and type per group; the first group sets the recipe."""
    for name, group in (qc.get("config_groups") or {}).items():
        weights = (group or {}).get("weights") or {}
        bits, kind = weights.get("num_bits"), weights.get("type")
        if kind == "int":
            return _int_bits(bits, f"{field}.config_groups.{name}.weights.num_bits")
        if kind == "float" and bits in (4, 8):
            # NVFP4 scales every 16 values, MXFP4 every 32: the group size tells them apart.
            return "fp8" if bits == 8 else "nvfp4" if weights.get("group_size") == 16 else "mxfp4"
        raise InputError(f"{field}.config_groups.{name}.weights", dict(weights),
                         "unknown weight format (num_bits, type)")
    raise InputError(field + ".config_groups", None, "compressed-tensors config without groups")
