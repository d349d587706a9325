"""KV block accounting and the block-hash prefix cache (one LRU free queue of blocks)."""

from trilemma.optimizer.serving.blockpool import BlockPool, prefix_hashes


def _cache(pool: BlockPool, pid: int, blocks: int) -> tuple:
    """A request computes prefix `pid` in fresh blocks, registers it, and leaves."""
    hashes = prefix_hashes(pid, blocks)
    assert pool.allocate(blocks)
    assert pool.register_computed(hashes, 0, blocks) == blocks
    pool.release(hashes)
    return hashes


def test_allocation_fails_without_side_effects_when_blocks_run_short():
    pool = BlockPool(10)
    assert pool.allocate(7)
    assert not pool.allocate(4)
    assert pool.free == 3 and pool.used == 7
    pool.give_back(7)
    assert pool.allocate(10) and pool.free == 0


def test_a_registered_prefix_stays_cached_after_its_requests_leave_and_can_be_hit():
    pool = BlockPool(100)
    assert pool.allocate(20)  # the request's own blocks
    hashes = _cache(pool, 7, 20)
    pool.give_back(20)
    assert pool.lookup(hashes) == 20 and pool.evictable == 20 and pool.free == 80
    assert pool.admit(hashes, 0)
    assert pool.evictable == 0


def test_eviction_takes_least_recently_released_blocks_tail_first_and_spares_pinned_ones():
    pool = BlockPool(30)
    one, two, three = (_cache(pool, pid, 10) for pid in (1, 2, 3))
    pool.acquire(three)  # pinned: not evictable
    assert pool.allocate(15)  # all of prefix 1, then the tail half of prefix 2
    assert pool.lookup(one) == 0 and pool.lookup(two) == 5 and pool.lookup(three) == 10
    assert pool.free == 0 and pool.evictions == 15
    assert not pool.allocate(6)


def test_an_admission_that_does_not_fit_changes_nothing_not_even_the_lru_order():
    pool = BlockPool(20)
    one, two = _cache(pool, 1, 10), _cache(pool, 2, 10)
    # 10 hit blocks are idle, but pinning them leaves only the 10 of prefix 2 to evict.
    assert not pool.admit(one, 11)
    assert pool.allocate(10)  # prefix 1 is still the least recently released: it goes
    assert pool.lookup(one) == 0 and pool.lookup(two) == 10


def test_a_block_registered_twice_is_shared_and_the_second_copy_freed():
    pool = BlockPool(50)
    hashes = prefix_hashes(4, 10)
    assert pool.allocate(20)
    assert pool.register_computed(hashes, 0, 10) == 10
    # A concurrent request computed the same blocks: it takes the cached copies.
    assert pool.register_computed(hashes, 0, 10) == 10
    assert pool.free == 40 and pool.cached == 10
    pool.release(hashes)
    assert pool.evictable == 0  # still used by the first request
    pool.release(hashes)
    assert pool.evictable == 10


def test_simulated_prefix_hashes_share_a_prefix_id_and_nothing_else():
    assert prefix_hashes(3, 4)[:2] == prefix_hashes(3, 2)
    assert not set(prefix_hashes(3, 4)) & set(prefix_hashes(4, 4))
    assert prefix_hashes(-1, 4) == ()
