"""The fast engine's KV pool: `blockpool.BlockPool`'s decisions at O(1) cost per request.

The simulator names a request's cacheable blocks (prefix id, 0..n-1) (`prefix_hashes`), and
every request holds a leading run of its prefix's chain. BlockPool keeps one dict entry per
block, so a 100k-token shared prompt costs ~7,000 dict operations at every admission and
release; this pool keeps, per prefix id, three integers and a count per held length, and
takes exactly BlockPool's decisions (tests/unit/test_serving_prefixruns.py drives both with
the same operations, and the fast engine still matches the reference engine step for step).

Why a few integers suffice: a block's reference count is the number of requests holding more
blocks of its chain, so it does not increase along the chain. Hence, per prefix p:
* the cached blocks are a leading run [0, cached_p): a request registers block j only after
  holding block j - 1, and eviction (below) takes a chain's last block;
* the idle (evictable) blocks are [top_p, cached_p), top_p the longest run held;
* in the global LRU queue p's idle blocks stand in descending order: a release appends
  [top', held) tail first, all below every idle block of p already queued (they are >= held).
So the queue is a deque of runs (p, lo, hi) meaning blocks hi-1 down to lo; eviction takes
the head run's top block, which is its prefix's last cached block, and pinning idle hit
blocks takes the lowest of p's idle blocks: the bottom of p's last runs.
"""

from __future__ import annotations

from collections import deque


class _Run:
    """Idle blocks lo..hi-1 of `prefix`, queued hi-1 first."""

    __slots__ = ("hi", "lo", "prefix")

    def __init__(self, prefix: int, lo: int, hi: int) -> None:
        self.prefix, self.lo, self.hi = prefix, lo, hi


class PrefixRuns:
    """`total` blocks: free ones, and per prefix id a cached leading run of its chain."""

    def __init__(self, total: int) -> None:
        if total < 1:
            raise ValueError(f"a KV pool needs at least one block, got {total}")
        self.total = total
        self.free = total  # neither owned by a request nor cached
        self.evictions = 0
        self.evictable = 0  # idle cached blocks, all prefixes
        self._cached: dict[int, int] = {}  # prefix -> cached_p
        self._held: dict[int, dict[int, int]] = {}  # prefix -> {run held: requests}
        self._top: dict[int, int] = {}  # prefix -> longest run held (0: none)
        self._queue: deque[_Run] = deque()  # LRU order, emptied runs skipped lazily
        self._runs: dict[int, deque[_Run]] = {}  # prefix -> its runs, in queue order

    @property
    def cached(self) -> int:
        return sum(self._cached.values())

    @property
    def used(self) -> int:
        return self.total - self.free - self.evictable

    def lookup(self, prefix: int, limit: int) -> int:
        """How many of the first `limit` blocks of `prefix` are cached. Changes nothing."""
        return min(self._cached.get(prefix, 0), limit)

    def allocate(self, n: int) -> bool:
        """Take n private blocks, evicting idle cached ones if needed; False changes nothing."""
        if n <= self.free:
            self.free -= n
            return True
        if n > self.free + self.evictable:
            return False
        queue = self._queue
        while self.free < n:
            run = queue[0]
            if run.hi == run.lo:
                queue.popleft()
                continue
            k = min(n - self.free, run.hi - run.lo)
            run.hi -= k
            self._cached[run.prefix] -= k
            self.evictable -= k
            self.free += k
            self.evictions += k
            if run.hi == run.lo:
                queue.popleft()
                self._runs[run.prefix].popleft()  # the head run is its prefix's first
        self.free -= n
        return True

    def give_back(self, n: int) -> None:
        """Return n private blocks."""
        self.free += n

    def admit(self, prefix: int, hit: int, n: int) -> bool:
        """Pin the first `hit` cached blocks of `prefix` and take n private blocks, or (False)
        change nothing: idle hit blocks cannot be evicted to make room for n."""
        if n > self.free:
            idle_hits = max(0, hit - self._top.get(prefix, 0))
            if n > self.free + self.evictable - idle_hits:
                return False
        if hit:
            self._pin(prefix, hit)
            self._hold(prefix, hit, 1)
        return self.allocate(n)

    def release(self, prefix: int, held: int) -> None:
        """A request stops using its first `held` blocks of `prefix`; those nobody else holds
        go idle, the chain's end first."""
        self._hold(prefix, held, -1)
        top = self._top[prefix]
        if held > top:
            run = _Run(prefix, top, held)
            self._queue.append(run)
            self._runs.setdefault(prefix, deque()).append(run)
            self.evictable += held - top

    def register_computed(self, prefix: int, blocks: int, held: int, full: int) -> int:
        """A request holding the first `held` of the prefix's `blocks` blocks has computed
        `full` full blocks: cache the new ones (taking the cached copy where another request
        registered it meanwhile and giving its own block back). Returns how many it now
        holds; each new one is a private block it no longer owns."""
        end = min(full, blocks)
        if end <= held:
            return held
        cached = self._cached.get(prefix, 0)
        shared = min(end, cached) - held
        if shared > 0:
            self._pin(prefix, held + shared)
            self.free += shared
        if end > cached:
            self._cached[prefix] = end
        if held:
            self._hold(prefix, held, -1)
        self._hold(prefix, end, 1)
        return end

    def _hold(self, prefix: int, held: int, change: int) -> None:
        """One more (or fewer) request holds the first `held` blocks of `prefix`."""
        counts = self._held.setdefault(prefix, {})
        n = counts.get(held, 0) + change
        if n:
            counts[held] = n
        else:
            del counts[held]
        top = self._top.get(prefix, 0)
        if change > 0 and held > top:
            self._top[prefix] = held
        elif change < 0 and held == top and not n:
            self._top[prefix] = max(counts, default=0)

    def _pin(self, prefix: int, upto: int) -> None:
        """Blocks below `upto` of `prefix` are about to be held: take the idle ones among them
        ([top_p, upto), the lowest idle ones) out of the queue."""
        top = self._top.get(prefix, 0)
        if upto <= top:
            return
        runs = self._runs[prefix]
        left = upto - top
        self.evictable -= left
        while left:
            run = runs[-1]
            k = min(left, run.hi - run.lo)
            run.lo += k
            left -= k
            if run.lo == run.hi:
                runs.pop()
                if self._queue[-1] is run:
                    self._queue.pop()  # else left in the queue, skipped at its head
