"""PrefixRuns (the fast engine's KV pool) takes BlockPool's every decision.

BlockPool, one dict entry per block, is the clear version and stays the specification: both
pools are driven through the same random life of requests (admit with a prefix hit, allocate,
register computed blocks, release) in a pool small enough to evict and refuse, and must agree
after every operation on what each call returns and on every count.
"""

import numpy as np
import pytest

from trilemma.optimizer.serving.blockpool import BlockPool, prefix_hashes
from trilemma.optimizer.serving.prefixruns import PrefixRuns


def _same(ref: BlockPool, fast: PrefixRuns) -> None:
    assert (ref.free, ref.evictable, ref.cached, ref.evictions, ref.used) == (
        fast.free, fast.evictable, fast.cached, fast.evictions, fast.used)


def _lifetimes(seed: int, total: int, prefixes: int, ops: int) -> int:
    """Run both pools through `ops` random operations; returns how many evictions happened."""
    rng = np.random.default_rng(seed)
    ref, fast = BlockPool(total), PrefixRuns(total)
    live: dict[int, list[int]] = {}  # request -> [prefix, blocks, held, own]
    for r in range(ops):
        if live and rng.random() < 0.45:
            i = int(rng.choice(sorted(live)))
            p, blocks, held, own = live[i]
            if held < blocks and rng.random() < 0.5:  # a chunk of its prefill completed
                full = held + int(rng.integers(1, blocks - held + 1))
                hashes = prefix_hashes(p, blocks)
                a = ref.register_computed(hashes, held, full)
                assert a == fast.register_computed(p, blocks, held, full)
                live[i] = [p, blocks, a, own - (a - held)]
            else:  # it finishes or is preempted
                if held:
                    ref.release(prefix_hashes(p, blocks)[:held])
                    fast.release(p, held)
                ref.give_back(own)
                fast.give_back(own)
                del live[i]
        elif rng.random() < 0.2:
            n = int(rng.integers(0, total // 4))
            ok = ref.allocate(n)
            assert ok == fast.allocate(n)
            _same(ref, fast)
            if ok:  # a short-lived allocation: it may have evicted
                ref.give_back(n)
                fast.give_back(n)
        else:
            p = int(rng.integers(0, prefixes))
            blocks = int(rng.integers(1, total // 2))
            hashes = prefix_hashes(p, blocks)
            limit = int(rng.integers(0, blocks + 1))
            hit = ref.lookup(hashes[:limit])
            assert hit == fast.lookup(p, limit)
            own = int(rng.integers(0, total // 3))
            ok = ref.admit(hashes[:hit], own)
            assert ok == fast.admit(p, hit, own)
            if ok:
                live[r] = [p, blocks, hit, own]
        _same(ref, fast)
    return ref.evictions


@pytest.mark.parametrize("seed", range(12))
def test_prefix_runs_take_the_block_pools_every_decision(seed):
    assert _lifetimes(seed, total=int(40 + 30 * (seed % 4)), prefixes=1 + seed % 4,
                      ops=600) > 0


def test_one_long_shared_prefix_costs_integers_not_blocks():
    pool = PrefixRuns(200_000)
    assert pool.admit(0, 0, 7_500) and pool.register_computed(0, 7_500, 0, 7_500) == 7_500
    pool.release(0, 7_500)
    for _ in range(1000):
        assert pool.lookup(0, 7_500) == 7_500 and pool.admit(0, 7_500, 1)
        pool.release(0, 7_500)
        pool.give_back(1)
    assert len(pool._queue) == 1 and pool.cached == pool.evictable == 7_500
