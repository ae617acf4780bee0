"""Exact block-pool scenarios: which block ids come out, in which order, and what gets evicted."""
import numpy as np
import pytest

from sim.memory.block_pool import ACTIVE, CACHED, FREE, BlockPool


def test_fresh_pool_hands_out_ids_in_order_and_reuses_freed_blocks_first():
    p = BlockPool("hbm", 8, 16, 1)
    assert p.allocate(3, 0.0) == [0, 1, 2]
    assert p.allocate(2, 0.0) == [3, 4]
    p.release([0, 1, 2], 1.0)            # no prefix keys: back on the free stack
    assert p.allocate(2, 2.0) == [0, 1]  # the released run comes back in its own order
    assert p.allocate_one(2.0) == 2
    assert p.allocate_one(2.0) == 5
    p.check()


def test_shortage_returns_none_and_changes_nothing():
    p = BlockPool("hbm", 4, 16, 1)
    assert p.allocate(3, 0.0) == [0, 1, 2]
    assert p.allocate(2, 0.0) is None
    assert p.num_free == 1 and p.num_active == 3
    assert p.allocate_one(0.0) == 3
    assert p.allocate_one(0.0) == -1
    p.check()


def test_cached_blocks_are_evicted_lru_first_tail_of_a_prefix_before_its_head():
    p = BlockPool("hbm", 6, 16, 1)
    a = p.allocate(3, 0.0)      # request A's prefix: blocks 0, 1, 2
    b = p.allocate(2, 0.0)      # request B: blocks 3, 4
    for blk, key in zip(a, (100, 101, 102)):
        p.register(blk, key)
    for blk, key in zip(b, (200, 201)):
        p.register(blk, key)
    p.release(a, 1.0)           # A finishes first: released tail-first → LRU order 2, 1, 0
    p.release(b, 2.0)           # then B → 4, 3
    assert p.lru_order(10) == [2, 1, 0, 4, 3]
    assert [p.state(x) for x in range(6)] == [CACHED] * 5 + [FREE]
    # one truly free block is used before anything is evicted
    assert p.allocate(1, 3.0) == [5]
    assert p.lookup(102) == 2
    got = p.allocate(2, 4.0)
    assert got == [2, 1]        # the tail of A's prefix goes first
    assert p.lookup(102) == -1 and p.lookup(101) == -1 and p.lookup(100) == 0
    assert p.num_evicted == 2
    p.check()


def test_a_hit_revives_a_cached_block_and_shares_an_active_one():
    p = BlockPool("hbm", 4, 16, 1)
    a = p.allocate(2, 0.0)
    p.register(a[0], 7)
    p.retain(a[0], 0.5)                 # a second request shares the active block
    assert p.refcount[a[0]] == 2
    p.release(a, 1.0)                   # the first owner leaves: block 0 still held once
    assert p.state(a[0]) == ACTIVE and p.state(a[1]) == FREE
    p.release([a[0]], 2.0)
    assert p.state(a[0]) == CACHED
    p.retain(p.lookup(7), 3.0)          # a hit on the cached block takes it out of the LRU list
    assert p.state(a[0]) == ACTIVE and p.num_cached == 0 and p.hits[a[0]] == 2
    p.check()


def test_duplicate_prefix_key_is_not_registered_twice():
    p = BlockPool("hbm", 4, 16, 1)
    x, y = p.allocate(2, 0.0)
    assert p.register(x, 5) is True
    assert p.register(y, 5) is False    # same prefix computed twice: only the first is findable
    p.release([x, y], 1.0)
    assert p.state(x) == CACHED and p.state(y) == FREE


def test_allocate_array_gives_the_blocks_allocate_would_as_an_int64_array():
    a, b = BlockPool("hbm", 6, 16, 1), BlockPool("hbm", 6, 16, 1)
    for p in (a, b):
        got = p.allocate(3, 0.0)
        p.register_many(got, [10, 11, 12])
        p.release(got, 1.0)
    lst = a.allocate(5, 2.0, owner=7)             # three free blocks, then two evicted (tail first)
    arr = b.allocate_array(5, 2.0, owner=7)
    assert arr.dtype == np.int64 and arr.tolist() == lst
    assert a.last_evicted()[0].tolist() == b.last_evicted()[0].tolist() == [12, 11]
    assert b.allocate_array(2, 3.0) is None and b.allocate_array(0, 3.0).shape == (0,)
    a.check()
    b.check()


def test_lock_unlock_and_hold_refuse_bad_blocks_and_change_nothing():
    p = BlockPool("hbm", 4, 16, 1)
    live = p.allocate(2, 0.0)                     # blocks 0, 1 active; 2, 3 free
    with pytest.raises(RuntimeError, match="only active blocks can be locked"):
        p.lock([live[0], 2])
    assert p.num_locked == 0 and p.locks.tolist() == [0, 0, 0, 0]
    p.lock(live)
    assert p.num_locked == 2 and p.locks.tolist() == [1, 1, 0, 0]
    with pytest.raises(RuntimeError, match="not locked"):
        p.unlock([live[0], 3])
    assert p.num_locked == 2 and p.locks.tolist() == [1, 1, 0, 0]
    p.unlock(live)
    assert p.num_locked == 0
    with pytest.raises(RuntimeError, match="held by a transfer"):
        p.hold([live[1], 3])
    assert p.refcount.tolist() == [1, 1, 0, 0]
    p.hold(live)
    assert p.refcount.tolist() == [2, 2, 0, 0]
    p.check()
