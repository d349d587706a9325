"""An engine's own kernel fits, laid over the shared calibration.

The shared fits (calibration.json "gpus") come from kernels measured under vLLM. SGLang runs
other kernels for the same operations (FA3 / TRT-LLM attention, FA3's MLA kernel on Hopper and
TRT-LLM's on Blackwell, its own fused MoE and GEMM paths), and AIConfigurator measured them
too: `fitting.fit_engine` fits those under "engines"/<engine>. An engine's fit of a family
replaces the whole family on that GPU (a measured SGLang MoE is not mixed with a vLLM one), and
families it did not measure (the collectives: NCCL under both) stay shared.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def family(key: str) -> str:
    """The family a fit key belongs to. A measured MLA attention kernel alone
    ("mla_context_core/fp8") stands for the whole family: the runtime adds the projections
    from the same engine's GEMM fits."""
    return key.split("/", 1)[0].removesuffix("_core")


def overlay(shared: Mapping[str, Any], own: Mapping[str, Any]) -> dict[str, Any]:
    """`shared` fit entries with every family `own` measured replaced by `own`'s."""
    replaced = {family(k) for k in own}
    merged = {k: v for k, v in shared.items() if family(k) not in replaced}
    merged.update(own)
    return dict(sorted(merged.items()))


def gpus(doc: Mapping[str, Any], engine: str) -> dict[str, Any]:
    """The calibration's per-GPU entries as `engine` runs them: its own fits where it has
    any, the shared ones elsewhere."""
    own = doc.get("engines", {}).get(engine, {}).get("gpus", {})
    out = dict(doc["gpus"])
    for gpu, entry in own.items():
        out[gpu] = {**out[gpu], "fits": overlay(out[gpu]["fits"], entry["fits"]),
                    "engine": engine, "engine_versions": entry["engine_versions"]}
    return out
