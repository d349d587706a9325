"""One engine's KV blocks: a free count plus an LRU cache of shared prefixes.

Model of vLLM's prefix cache, simplified to whole prefixes: a prefix id's full blocks
(prefix_tokens // block_size) become a cache entry when the first request carrying it finishes
its prefill. Requests that start later with the same id borrow the entry (a "hit": they skip
those tokens of prefill and allocate none of those blocks). An entry nobody borrows stays
cached but evictable; allocation takes truly free blocks first and then evicts whole entries,
least recently used first. Only shared prefixes are cached: vLLM also caches every request's
own full blocks (a preempted request may hit its own), which this model leaves out.
"""

from __future__ import annotations

from collections import OrderedDict


class KvBlocks:
    """Block accounting of one engine. Blocks a request owns are the caller's to count."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.free = total
        self.evictable = 0  # blocks of cached entries that no running request borrows
        # prefix id -> [blocks, borrowers]; order is LRU first.
        self._entries: OrderedDict[int, list[int]] = OrderedDict()
        self.evictions = 0

    def allocate(self, n: int) -> bool:
        """Take n blocks, evicting idle prefixes if needed; False (and no change) if short."""
        if n <= self.free:
            self.free -= n
            return True
        if n > self.free + self.evictable:
            return False
        entries = self._entries
        for pid in list(entries):
            blocks, refs = entries[pid]
            if refs:
                continue
            del entries[pid]
            self.free += blocks
            self.evictable -= blocks
            self.evictions += 1
            if self.free >= n:
                break
        self.free -= n
        return True

    def release(self, n: int) -> None:
        self.free += n

    def cached(self, pid: int) -> int:
        """Blocks cached for prefix `pid` (0: not cached). Changes nothing."""
        entry = self._entries.get(pid)
        return entry[0] if entry is not None else 0

    def borrow(self, pid: int) -> None:
        """Pin a cached prefix for one more request, so that allocation cannot evict it."""
        entry = self._entries[pid]
        if entry[1] == 0:
            self.evictable -= entry[0]
        entry[1] += 1

    def touch(self, pid: int) -> None:
        """Mark a prefix most recently used."""
        self._entries.move_to_end(pid)

    def give_back(self, pid: int, *, used: bool = True) -> None:
        """Unpin; `used` False undoes a borrow that did not lead to a scheduled request."""
        entry = self._entries[pid]
        entry[1] -= 1
        if entry[1] == 0:
            self.evictable += entry[0]
            if used:
                self._entries.move_to_end(pid)

    def register(self, pid: int, blocks: int) -> bool:
        """A request finished prefilling prefix `pid`: its first `blocks` blocks become a cache
        entry that it borrows. False if the prefix is already cached (the request then keeps
        its own copy: concurrent first uses are not deduplicated)."""
        if pid in self._entries:
            return False
        self._entries[pid] = [blocks, 1]
        return True

    @property
    def used(self) -> int:
        return self.total - self.free
