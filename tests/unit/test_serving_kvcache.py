"""KV block accounting and the LRU cache of shared prefixes."""

from trilemma.optimizer.serving.kvcache import KvBlocks


def test_allocation_fails_without_side_effects_when_blocks_run_short():
    kv = KvBlocks(10)
    assert kv.allocate(7)
    assert not kv.allocate(4)
    assert kv.free == 3 and kv.used == 7
    kv.release(7)
    assert kv.allocate(10) and kv.free == 0


def test_a_registered_prefix_stays_cached_after_its_requests_leave_and_can_be_hit():
    kv = KvBlocks(100)
    assert kv.allocate(40)
    assert kv.register(7, 20)  # the first request's first 20 blocks become the entry
    kv.give_back(7)
    kv.release(20)  # the request's own blocks
    assert kv.cached(7) == 20 and kv.evictable == 20 and kv.free == 80
    kv.borrow(7)
    assert kv.evictable == 0


def test_eviction_takes_least_recently_used_idle_prefixes_and_spares_borrowed_ones():
    kv = KvBlocks(30)
    for pid in (1, 2, 3):
        assert kv.allocate(10)
        assert kv.register(pid, 10)
    kv.give_back(1)
    kv.give_back(3)
    kv.give_back(2)  # LRU order of idle entries: 1, 3, 2
    kv.borrow(3)  # pinned: not evictable
    assert kv.allocate(15)
    assert kv.cached(1) == 0 and kv.cached(2) == 0 and kv.cached(3) == 10
    assert kv.free == 5 and kv.evictions == 2
    assert not kv.allocate(6)


def test_an_undone_borrow_leaves_the_lru_order_alone():
    kv = KvBlocks(20)
    for pid in (1, 2):
        kv.allocate(10)
        kv.register(pid, 10)
        kv.give_back(pid)
    kv.borrow(1)
    kv.give_back(1, used=False)
    assert kv.allocate(10)
    assert kv.cached(1) == 0 and kv.cached(2) == 10


def test_a_prefix_registered_twice_keeps_the_first_entry():
    kv = KvBlocks(50)
    kv.allocate(20)
    assert kv.register(4, 10)
    assert not kv.register(4, 10)
    assert kv.cached(4) == 10
