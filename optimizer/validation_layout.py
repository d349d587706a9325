"""Read a silicon row's parallel layout from its launch flags where its columns contradict them.

Some rows of AIConfigurator's silicon samples carry, in their id, the flags the run was launched
with (`..._sglang_fp4_agg_1024x1024_c4_tp4_ep4_1037`: SGLang `--tp 4 --ep-size 4`). SGLang's
`--ep-size` splits the MoE of the same `--tp` GPUs into expert-parallel groups
(moe_tp = tp / ep_size); it adds no GPUs. A converter that multiplied the two wrote such a run
as `tp_size=16, moe_tp_size=4, moe_ep_size=4`: a 16-GPU, two-node layout that the 4-GPU run
never had. Its measurements are byte-identical to the same run written correctly elsewhere
(`..._tp4_0_ep4_0_287`: tp 4, moe_tp 1, moe_ep 4), so the flags, not the columns, are right.

Such a row is modelled by its launch flags, and the correction is recorded on the row. It is
not skipped: the measurement is valid, and the set keeps the other byte-identical pairs it
holds (the same run under two source files) as two rows too, so skipping only these would
weight the corrected layouts below every other duplicate.

A row without flags whose measurement is byte-identical to a flagged row's (TTFT and TPOT to
the last digit: the same run, copied under another id or model name) takes that row's layout
the same way, with a note naming it.

Only SGLang's flag semantics are read here: vLLM and TensorRT-LLM spell EP and DP differently
(vLLM derives EP from tp x dp), and their ids are left to their own columns.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# `_tp4_ep4_` or `_tp4_0_ep4_0_` (the second spelling numbers the sweep point after each).
_FLAGS = re.compile(r"_tp(\d+)(?:_\d+)?_ep(\d+)(?:_\d+)?_")


@dataclass(frozen=True, kw_only=True)
class LaunchFlags:
    """SGLang's `--tp N --ep-size M` as the row's id names them."""

    tp: int
    ep_size: int


def launch_flags(row: Mapping[str, str]) -> LaunchFlags | None:
    """The SGLang launch flags a row's id names, or None when it names none or is not SGLang."""
    if (row.get("backend") or "").strip().lower() != "sglang":
        return None
    match = _FLAGS.search(row.get("id") or "")
    if match is None:
        return None
    tp, ep = int(match.group(1)), int(match.group(2))
    if tp < 1 or ep < 1 or tp % ep:
        return None  # not a layout SGLang can launch: leave the columns alone
    return LaunchFlags(tp=tp, ep_size=ep)


def _size(row: Mapping[str, str], key: str) -> int:
    text = (row.get(key) or "").strip()
    try:
        return max(int(float(text)), 1)
    except ValueError:
        return 1


def corrected(row: Mapping[str, str]) -> tuple[Mapping[str, str], str | None]:
    """The row with its parallel columns set from its launch flags where they contradict them,
    and a note saying so (None, and the row itself, when they agree or there are no flags)."""
    flags = launch_flags(row)
    if flags is None:
        return row, None
    dp = _size(row, "attention_dp_size")
    tp, moe_tp, moe_ep = (_size(row, k) for k in ("tp_size", "moe_tp_size", "moe_ep_size"))
    # SGLang's world is --tp GPUs; attention DP and --ep-size divide it, they do not add to it.
    if tp * dp == flags.tp and moe_tp * moe_ep == flags.tp and moe_ep == flags.ep_size:
        return row, None
    if flags.tp % dp:
        return row, None  # the flags cannot hold this attention-DP size either: keep the row
    fixed = dict(row)
    fixed.update(tp_size=str(flags.tp // dp), moe_tp_size=str(flags.tp // flags.ep_size),
                 moe_ep_size=str(flags.ep_size))
    note = (f"layout from the id's launch flags (--tp {flags.tp} --ep-size {flags.ep_size}): "
            f"the columns say tp {tp} x dp {dp}, moe tp {moe_tp} x ep {moe_ep}, "
            f"{tp * dp} GPUs where SGLang's --ep-size adds none")
    return fixed, note


_RUN_COLUMNS = ("backend", "system", "isl", "osl", "batch_size", "silicon_ttft_ms",
                "silicon_tpot_ms")


def run_key(row: Mapping[str, str]) -> tuple[str, ...]:
    """What identifies one measured run: engine, GPU, lengths, load and both measurements
    (two runs do not share a TTFT and a TPOT to the last of 15 digits)."""
    return tuple((row.get(k) or "").strip() for k in _RUN_COLUMNS)


def corrected_rows(rows: Sequence[Mapping[str, str]]
                   ) -> list[tuple[Mapping[str, str], str | None]]:
    """`corrected` for every row, then the flagless copies of a flagged run take its layout."""
    out = [corrected(row) for row in rows]
    flagged: dict[tuple[str, ...], tuple[str, Mapping[str, str]]] = {}
    for row, (fixed, _) in zip(rows, out, strict=True):
        if launch_flags(row) is not None:
            flagged.setdefault(run_key(row), (row.get("id") or "", fixed))
    for i, row in enumerate(rows):
        source = flagged.get(run_key(row)) if launch_flags(row) is None else None
        if source is None:
            continue
        rid, layout = source
        keys = ("tp_size", "attention_dp_size", "moe_tp_size", "moe_ep_size")
        if all(_size(row, k) == _size(layout, k) for k in keys):
            continue
        fixed = dict(row)
        fixed.update({k: str(_size(layout, k)) for k in keys})
        out[i] = (fixed, f"layout from the launch flags of {rid}, the same run (byte-identical "
                         "TTFT and TPOT): the columns say "
                         + ", ".join(f"{k} {_size(row, k)}" for k in keys))
    return out
