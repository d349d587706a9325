"""GPU catalog: datasheet figures with a citation per figure, and default prices.

The performance model turns these peak rates into kernel times (perf/ fits measured profiles on
top where a GPU is `calibrated`); quantization.py reads `arch` to decide which recipes a GPU
can run. Figures live in data/gpus.yaml, each with its source; this module only parses them.
"""

from __future__ import annotations

import enum
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from trilemma.optimizer.catalog.data_files import read_yaml
from trilemma.optimizer.errors import InputError

DATA_FILE = "gpus.yaml"

# Fields that hold one cited figure, `{value, source}` in the YAML, and their Python types.
_FIGURES: dict[str, type] = {
    "memory_bytes": float,
    "memory_bw": float,
    "intra_node_bw": float,
    "inter_node_bw": float,
    "gpus_per_node": int,
    "scale_up_gpus": int,
    "tdp_watts": float,
    "price_per_hour": float,
}


class Arch(enum.StrEnum):
    """GPU architecture generation: what decides which number formats the hardware runs."""

    AMPERE = "ampere"  # sm80: bf16, int8; no fp8
    ADA = "ada"  # sm89: adds fp8
    HOPPER = "hopper"  # sm90: fp8 with higher rates
    BLACKWELL = "blackwell"  # sm100 / sm120: adds fp4 (NVFP4, MXFP4)
    CDNA3 = "cdna3"  # AMD MI300X / MI325X (gfx942): fp8 and int8


@dataclass(frozen=True, kw_only=True)
class Gpu:
    """One GPU model's peak rates, capacity, interconnect and default price.

    Bandwidths are per GPU, one direction. `dense_flops` holds only the formats the tensor
    cores run natively. `memory_bytes` is the capacity as the source records it (AIC: nominal
    GiB, e.g. 80 GiB = 85,899,345,920 B for H100 SXM): the engine's memory-utilization share
    and runtime reserve are perf/'s to subtract.
    """

    key: str
    name: str
    vendor: str
    arch: Arch
    sm_version: int | None  # CUDA compute capability x10; None for AMD
    memory_bytes: float
    memory_bw: float
    dense_flops: Mapping[str, float]
    intra_node_bw: float
    inter_node_bw: float
    gpus_per_node: int
    scale_up_gpus: int  # the NVLink domain: GPUs reached at intra_node_bw (72 for NVL72)
    tdp_watts: float
    price_per_hour: float
    calibrated: bool
    aliases: tuple[str, ...] = ()
    sources: Mapping[str, str]
    # Between NVLink domains; where the domain is one node, the same as inter_node_bw.
    scale_out_bw: float = 0.0
    # A calibrated sibling whose fitted kernel efficiencies this GPU is priced with, its rates
    # scaled by the datasheet ratio (perf/kernels.py); None: its own fits or the datasheet.
    extrapolated_from: str | None = None
    # Published SFU exponential (softmax) rate relative to that sibling, beyond the clock
    # ratio the tensor rates already carry: 2.0 on Blackwell Ultra.
    softmax_exp_ratio: float = 1.0

    def __post_init__(self) -> None:
        if not self.scale_out_bw:
            object.__setattr__(self, "scale_out_bw", self.inter_node_bw)

    @property
    def kernels(self) -> str:
        """How perf/ prices this GPU's kernels: fitted, extrapolated from a sibling, or
        datasheet rooflines (the label plans and estimates carry)."""
        if self.calibrated:
            return "fitted"
        if self.extrapolated_from:
            return f"extrapolated from {self.extrapolated_from}"
        return "datasheet"

    def nvlink_reach(self, gpus_per_node: int) -> int:
        """GPUs one NVLink domain joins when a node holds `gpus_per_node`: the whole rack where
        the domain spans nodes (NVL72), else the node (never beyond the switch's reach)."""
        if self.scale_up_gpus > self.gpus_per_node:
            return self.scale_up_gpus
        return min(gpus_per_node, self.scale_up_gpus)

    def supports(self, precision_key: str) -> bool:
        """True when the tensor cores run `precision_key` ("bf16", "fp8", "int8", "fp4")."""
        return precision_key in self.dense_flops


def _normalize(text: str) -> str:
    # "H100-SXM", "h100 sxm" and "h100_sxm" all name the same GPU.
    return re.sub(r"[\s\-]+", "_", text.strip().lower())


def _figure(raw: Any, where: str) -> tuple[Any, str]:
    if not isinstance(raw, Mapping) or "value" not in raw or not raw.get("source"):
        raise ValueError(f"{DATA_FILE}: {where} must be {{value: ..., source: '...'}}")
    return raw["value"], str(raw["source"])


def _parse(key: str, raw: Mapping[str, Any]) -> Gpu:
    sources: dict[str, str] = {}
    values: dict[str, Any] = {}
    for name, kind in _FIGURES.items():
        value, sources[name] = _figure(raw[name], f"{key}.{name}")
        values[name] = kind(value)
    flops: dict[str, float] = {}
    for precision, entry in raw["dense_flops"].items():
        name = f"dense_flops.{precision}"
        value, sources[name] = _figure(entry, f"{key}.{name}")
        flops[str(precision)] = float(value)
    sm_version = None
    if "sm_version" in raw:
        sm, sources["sm_version"] = _figure(raw["sm_version"], f"{key}.sm_version")
        sm_version = int(sm)
    optional: dict[str, Any] = {}
    for name in ("scale_out_bw", "softmax_exp_ratio"):
        if name in raw:
            value, sources[name] = _figure(raw[name], f"{key}.{name}")
            optional[name] = float(value)
    return Gpu(
        key=key,
        name=str(raw["name"]),
        vendor=str(raw["vendor"]),
        arch=Arch(raw["arch"]),
        sm_version=sm_version,
        dense_flops=MappingProxyType(flops),
        calibrated=bool(raw["calibrated"]),
        extrapolated_from=raw.get("extrapolated_from"),
        aliases=tuple(_normalize(a) for a in raw.get("aliases", ())),
        sources=MappingProxyType(sources),
        **values,
        **optional,
    )


def load_raw() -> dict[str, Any]:
    """The parsed YAML, as shipped (tests iterate it to check every figure is cited)."""
    return read_yaml(__package__, "data", DATA_FILE)


@functools.cache
def _catalog() -> tuple[dict[str, Gpu], dict[str, str]]:
    raw = load_raw()["gpus"]
    by_key = {key: _parse(key, entry) for key, entry in raw.items()}
    for gpu in by_key.values():
        base = by_key.get(gpu.extrapolated_from or gpu.key)
        if base is None or (gpu.extrapolated_from and not base.calibrated):
            raise ValueError(f"{DATA_FILE}: {gpu.key} extrapolates from "
                             f"{gpu.extrapolated_from!r}, not a calibrated GPU")
    names: dict[str, str] = {}
    for gpu in by_key.values():
        for name in (gpu.key, *gpu.aliases):
            if names.setdefault(name, gpu.key) != gpu.key:
                raise ValueError(f"{DATA_FILE}: alias {name!r} names two GPUs")
    return by_key, names


def get_gpu(key: str) -> Gpu:
    """The GPU named by a catalog key or alias, case- and separator-insensitive.

    Raises InputError(field="gpu") listing the known keys.
    """
    by_key, names = _catalog()
    found = names.get(_normalize(key)) if isinstance(key, str) else None
    if found is None:
        raise InputError("gpu", key, f"unknown GPU; known: {', '.join(by_key)}")
    return by_key[found]


def all_gpus() -> tuple[Gpu, ...]:
    """Every catalog GPU, in the data file's order."""
    return tuple(_catalog()[0].values())
