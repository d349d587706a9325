"""GPU accounting: what a HardwarePool still offers an endpoint, and reservations in flight.

The cluster is the record: every endpoint writes the GPUs its children hold into
`status.allocatedGpus`. Between an endpoint's plan and that status write, a reservation in
this process's ledger stops a second endpoint planning with the same GPUs (Kopf peering keeps
one active operator, so an in-process ledger is enough).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from trilemma.optimizer.spec import GpuGroup, HardwarePool

Obj = dict[str, Any]


def key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


@dataclass(frozen=True)
class Availability:
    """What an endpoint may use: the pool with other endpoints' GPUs taken out."""

    pool: HardwarePool | None     # None when every group is exhausted
    held: dict[str, Counter[str]]  # other endpoint -> GPUs by type
    totals: dict[str, int]

    def holders(self, gpu: str) -> list[str]:
        return sorted(k for k, c in self.held.items() if c.get(gpu))

    def exhausted_message(self) -> str:
        parts = []
        for gpu, total in self.totals.items():
            taken = sum(c.get(gpu, 0) for c in self.held.values())
            who = ", ".join(self.holders(gpu)) or "nobody"
            parts.append(f"{gpu}: {taken} of {total} held ({who})")
        return "every GPU of the pool is held by other endpoints: " + "; ".join(parts)


@dataclass
class Ledger:
    """Reservations made by plans whose status is not written yet, by pool and endpoint."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    reserved: dict[str, dict[str, Counter[str]]] = field(default_factory=dict)

    def reserve(self, pool: str, endpoint: str, gpus: dict[str, int]) -> None:
        self.reserved.setdefault(pool, {})[endpoint] = Counter(gpus)

    def release(self, pool: str, endpoint: str) -> None:
        self.reserved.get(pool, {}).pop(endpoint, None)


def held_by_others(endpoints: list[Obj], pool_name: str, me: str,
                   reserved: dict[str, Counter[str]]) -> dict[str, Counter[str]]:
    """GPUs held in `pool_name` by every endpoint except `me`: status plus reservations."""
    held: dict[str, Counter[str]] = {}
    for ep in endpoints:
        meta = ep.get("metadata", {})
        who = key(meta.get("namespace", ""), meta.get("name", ""))
        if who == me or meta.get("deletionTimestamp"):
            continue
        if (ep.get("spec", {}).get("hardwarePoolRef") or {}).get("name") != pool_name:
            continue
        allocated = (ep.get("status") or {}).get("allocatedGpus") or {}
        counts = Counter({str(g): int(n) for g, n in allocated.items() if int(n) > 0})
        if counts:
            held[who] = counts
    for who, counts in reserved.items():
        if who != me:
            held[who] = held.get(who, Counter()) | counts
    return held


def available(pool: HardwarePool, held: dict[str, Counter[str]]) -> Availability:
    """The pool less what others hold; groups with nothing left are dropped."""
    taken: Counter[str] = Counter()
    for counts in held.values():
        taken.update(counts)
    groups: list[GpuGroup] = []
    for group in pool.gpus:
        left = group.count - taken.get(group.gpu, 0)
        if left > 0:
            groups.append(group.model_copy(update={"count": left}))
    return Availability(pool=HardwarePool(gpus=groups) if groups else None, held=held,
                        totals={g.gpu: g.count for g in pool.gpus})


def fits(gpus: dict[str, int], availability: Availability) -> bool:
    if availability.pool is None:
        return not any(gpus.values())
    left = {g.gpu: g.count for g in availability.pool.gpus}
    return all(n <= left.get(gpu, 0) for gpu, n in gpus.items())
