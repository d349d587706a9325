"""The device-time floor of a kernel replayed in a CUDA graph, where a profile hides it.

A kernel profile's fit separates a CPU-side floor (`host_ms`, paid per launch in eager mode,
gone under a CUDA-graph replay as vLLM runs its steps) from a device floor (`launch_ms`: the
kernel's own start-up, a few wave's worth of work and its drain, paid in a graph too). Where a
profile's smallest shapes are host-bound, the fit cannot tell the two apart and `launch_ms`
collapses to its lower bound (B200: block-fp8 GEMMs and bf16 decode attention at 0.1 us, their
host floors 9-213 us). Dropping the host floor then leaves such a kernel nearly free at small
batches, which no kernel is. Those fits get the median device floor that the same GPU's other
GEMM and attention fits do identify (B200 ~7 us, H100 ~9 us): a figure from the kernel tables
themselves, not from any end-to-end run.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from typing import Any

# Forms whose `launch_ms` is one kernel's device floor (MoE and MLA fits time whole modules).
FLOORED_FORMS = ("gemm", "context", "decode")
# A fitted launch at or below this sits on the fit's lower bound: not identified.
COLLAPSED_MS = 1e-3


def device_floor_ms(fits: Mapping[str, Mapping[str, Any]]) -> float:
    """Median identified `launch_ms` over one GPU's GEMM and attention fits (0 if none)."""
    floors = [float(f["params"]["launch_ms"]) for f in fits.values()
              if f["form"] in FLOORED_FORMS and float(f["params"]["launch_ms"]) > COLLAPSED_MS]
    return statistics.median(floors) if floors else 0.0


def with_floor(values: dict[str, float], form: str, floor_ms: float) -> dict[str, float]:
    """`values` with a collapsed device floor replaced by `floor_ms` (under a graph replay)."""
    if form in FLOORED_FORMS and values.get("launch_ms", 1.0) <= COLLAPSED_MS:
        values["launch_ms"] = floor_ms
    return values
