"""KV blocks of one engine and vLLM's prefix cache over them: the one KV model of the project.

Model of vLLM V1's KVCacheManager at block granularity, used by the scheduler core
(scheduler.py), the fast engine (engine.py) and through the core by the sim-server. A
prompt's cacheable full blocks are identified by chained hashes (each block's hash covers its
parent's, so equal hashes mean equal prefixes). A block whose KV has been computed is
registered under its hash and later requests whose prompt starts with the same blocks reuse
it instead of prefilling. Cached blocks nobody uses stay resident but evictable in an LRU free
queue; a request frees its cached blocks tail first, so a chain loses its end before its start
and lookups (which stop at the first miss) keep what is left useful.

What is hashed is the caller's choice: the sim-server hashes every full prompt block of the
real token ids (`block_hashes`); the simulator, whose requests have no tokens, hashes the
blocks of a request's shared prefix as (prefix id, block index) (`prefix_hashes`) and leaves
its own tokens unhashed (nobody else can hit them). Whole-prefix sharing is the special case
where all blocks of one prefix id come and go together.

Policy choices, the same in every engine (so that the fast engine matches the core exactly):
* eviction is vLLM's: block by block from the head of the idle queue, which a request's
  release fills tail first (a prefix can be partly evicted; later hits are then partial);
* a request registers its hashed blocks as each chunk of its prefill completes (vLLM caches
  blocks as they are computed); a block another request registered meanwhile is shared and
  the request's own copy given back (vLLM keeps duplicates; sharing keeps every request's
  cached blocks a leading run of its chain, so `held` is a count, not a list — what lets the
  fast engine keep integers per request);
* an admission that cannot get its blocks changes nothing (not even the LRU order), as vLLM's
  allocate_slots checks before touching the hit blocks.
Generated tokens are never cached (vLLM caches them too; a resent conversation would hit them).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

BlockHash = Hashable


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


def prefix_hashes(prefix_id: int, blocks: int) -> tuple[BlockHash, ...]:
    """The simulator's block identities of a shared prefix: (id, index) is as unique as a
    chained hash of the prefix's tokens would be."""
    return tuple((prefix_id, j) for j in range(blocks)) if prefix_id >= 0 else ()


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
        self._refs: dict[BlockHash, int] = {}  # cached block hash -> requests using it
        self._idle: OrderedDict[BlockHash, None] = OrderedDict()  # refs == 0, eviction order
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

    @property
    def used(self) -> int:
        return self.total - self.free - len(self._idle)

    def lookup(self, hashes: Sequence[BlockHash]) -> int:
        """How many leading blocks of `hashes` are cached. Changes nothing."""
        n = 0
        refs = self._refs
        for h in hashes:
            if h not in refs:
                break
            n += 1
        return n

    def acquire(self, hashes: Sequence[BlockHash]) -> None:
        """Use cached blocks (pins them against eviction)."""
        for h in hashes:
            refs = self._refs[h]
            if refs == 0:
                del self._idle[h]
            self._refs[h] = refs + 1

    def release(self, hashes: Sequence[BlockHash]) -> None:
        """Stop using cached blocks; the tail goes idle first so it is evicted first."""
        for h in reversed(hashes):
            refs = self._refs[h] - 1
            self._refs[h] = refs
            if refs == 0:
                self._idle[h] = None

    def allocate(self, n: int) -> bool:
        """Take n private blocks, evicting idle cached ones if needed; False changes nothing."""
        if n <= self.free:
            self.free -= n
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

    def admit(self, hit: Sequence[BlockHash], n: int) -> bool:
        """Pin the cached blocks `hit` and take n private blocks, or (False) change nothing:
        idle hit blocks count as taken, they cannot be evicted to make room for n."""
        if n > self.free:
            idle_hits = sum(1 for h in hit if self._refs[h] == 0)
            if n > self.free + len(self._idle) - idle_hits:
                return False
        self.acquire(hit)
        return self.allocate(n)

    def give_back(self, n: int) -> None:
        """Return n private blocks."""
        self.free += n

    def register(self, h: BlockHash) -> bool:
        """A request computed block `h` in one of its private blocks: that block becomes the
        cached copy, used by the request. False when `h` is cached already (the caller then
        uses the cached copy and gives its own back: see `register_computed`)."""
        if h in self._refs:
            return False
        self._refs[h] = 1
        return True

    def register_computed(self, hashes: Sequence[BlockHash], held: int, full: int) -> int:
        """A request holding the first `held` of `hashes` as cached blocks has computed `full`
        full blocks: register the newly computed ones (sharing those cached meanwhile). Returns
        how many it now holds; each new one is a private block it no longer owns."""
        end = min(full, len(hashes))
        for j in range(held, end):
            h = hashes[j]
            if not self.register(h):
                self.acquire((h,))
                self.give_back(1)
        return max(held, end)
