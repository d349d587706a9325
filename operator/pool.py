"""GPU accounting: what a HardwarePool still offers an endpoint, and reservations in flight.

The cluster is the record: every endpoint writes the GPUs its children hold into
`status.allocatedGpus`, and the ledger mirrors those writes. Between an endpoint's plan and
that status write, a reservation in the ledger stops a second endpoint planning with the same
GPUs (Kopf peering keeps one active operator, so an in-process ledger is enough).
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
    """Who holds which GPUs of which pool, as this operator wrote it into status, plus the
    reservations of plans whose status is not written yet.

    Seeded once from the cluster (endpoints from before a restart), then kept by the
    operator's own status writes: no listing of every endpoint on every reconcile.
    """

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    reserved: dict[str, dict[str, Counter[str]]] = field(default_factory=dict)
    held: dict[str, dict[str, Counter[str]]] = field(default_factory=dict)
    seeded: bool = False

    def seed(self, endpoints: list[Obj]) -> None:
        for ep in endpoints:
            meta = ep.get("metadata", {})
            if meta.get("deletionTimestamp"):
                continue
            pool = (ep.get("spec", {}).get("hardwarePoolRef") or {}).get("name", "")
            allocated = (ep.get("status") or {}).get("allocatedGpus") or {}
            self.record(pool, key(meta.get("namespace", ""), meta.get("name", "")), allocated)
        self.seeded = True

    def record(self, pool: str, endpoint: str, gpus: dict[str, Any]) -> None:
        """What `endpoint` holds now (its status.allocatedGpus); it holds nothing elsewhere."""
        for holders in self.held.values():
            holders.pop(endpoint, None)
        counts = Counter({str(g): int(n) for g, n in gpus.items() if int(n) > 0})
        if counts:
            self.held.setdefault(pool, {})[endpoint] = counts

    def reserve(self, pool: str, endpoint: str, gpus: dict[str, int]) -> None:
        self.reserved.setdefault(pool, {})[endpoint] = Counter(gpus)

    def release(self, pool: str, endpoint: str) -> None:
        self.reserved.get(pool, {}).pop(endpoint, None)

    def forget(self, endpoint: str) -> None:
        """The endpoint is gone: it holds and reserves nothing."""
        self.record("", endpoint, {})
        for holders in self.reserved.values():
            holders.pop(endpoint, None)

    def others(self, pool: str, me: str) -> dict[str, Counter[str]]:
        """GPUs of `pool` held or reserved by every endpoint except `me`."""
        out: dict[str, Counter[str]] = {}
        for source in (self.held.get(pool, {}), self.reserved.get(pool, {})):
            for who, counts in source.items():
                if who != me:
                    out[who] = out.get(who, Counter()) | counts
        return out


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
