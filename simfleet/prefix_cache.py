"""KV blocks of one simulated engine and vLLM's prefix cache over them.

Model of vLLM V1's KVCacheManager at block granularity: a prompt's full blocks of 16 tokens
are identified by chained hashes (each block's hash covers its parent's, so equal hashes mean
equal prefixes); a block whose KV has been computed is registered under its hash and later
requests starting with the same tokens reuse it instead of prefilling. Cached blocks nobody
uses stay resident but evictable, least recently freed first; a finished request frees its
blocks tail first, so a prefix loses its end before its start and lookups (which stop at the
first miss) keep what is left useful. Only prompt blocks are hashed: generated tokens are not
cached (vLLM caches them too; a resent conversation would hit them there).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence


def block_hashes(tokens: Sequence[int], block_size: int) -> tuple[int, ...]:
    """Chained hashes of the full blocks of `tokens`.

    Python's hash of a tuple of ints is the same in every process (only str and bytes hashes
    are salted), so two servers agree on a prompt's blocks as vLLM replicas would.
    """
    out: list[int] = []
    parent = 0
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash((parent, tuple(tokens[start:start + block_size])))
        out.append(parent)
    return tuple(out)


class BlockPool:
    """`total` blocks: free ones, cached ones in use, and cached idle (evictable) ones.

    Requests count their private (uncached) blocks themselves; the pool counts the free
    blocks and reference-counts the cached ones.
    """

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError(f"a KV pool needs at least one block, got {total}")
        self.total = total
        self.free = total  # neither owned by a request nor cached
        self._refs: dict[int, int] = {}  # cached block hash -> requests using it
        self._idle: OrderedDict[int, None] = OrderedDict()  # refs == 0, eviction order
        self.evictions = 0

    @property
    def evictable(self) -> int:
        return len(self._idle)

    @property
    def cached(self) -> int:
        return len(self._refs)

    @property
    def usage(self) -> float:
        """Share of blocks in use by requests, as vLLM's kv_cache_usage_perc (idle cached
        blocks count as free: they are reclaimed on demand)."""
        return 1.0 - (self.free + len(self._idle)) / self.total

    def lookup(self, hashes: Sequence[int]) -> int:
        """How many leading blocks of `hashes` are cached. Changes nothing."""
        n = 0
        for h in hashes:
            if h not in self._refs:
                break
            n += 1
        return n

    def acquire(self, hashes: Sequence[int]) -> None:
        """Use cached blocks (pins them against eviction)."""
        for h in hashes:
            refs = self._refs[h]
            if refs == 0:
                del self._idle[h]
            self._refs[h] = refs + 1

    def release(self, hashes: Sequence[int]) -> None:
        """Stop using cached blocks; the tail goes idle first so it is evicted first."""
        for h in reversed(hashes):
            refs = self._refs[h] - 1
            self._refs[h] = refs
            if refs == 0:
                self._idle[h] = None

    def allocate(self, n: int) -> bool:
        """Take n private blocks, evicting idle cached ones if needed; False changes nothing."""
        if n <= 0:
            return True
        if n > self.free + len(self._idle):
            return False
        while self.free < n:
            h, _ = self._idle.popitem(last=False)
            del self._refs[h]
            self.free += 1
            self.evictions += 1
        self.free -= n
        return True

    def give_back(self, n: int) -> None:
        """Return n private blocks."""
        self.free += n

    def register(self, h: int) -> bool:
        """A request computed block `h` in one of its private blocks: that block becomes the
        cached copy, used by the request. False when `h` is cached already (the caller then
        uses the cached copy and gives its own back)."""
        if h in self._refs:
            return False
        self._refs[h] = 1
        return True
