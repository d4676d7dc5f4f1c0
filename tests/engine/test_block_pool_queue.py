"""The block pool's free queue (a list read from a head, stale entries for blocks a prefix hit took out of its
middle) against a reference LRU queue written plainly over an ordered dict: the same blocks handed out in the same
order, the same evictions, through allocations, frees, prefix hits on free blocks and compactions."""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest

from hetserve.engine.kv.block_pool import BlockPool, KVCacheBlock


class _Reference:
    """Least recently freed first; a hit on a free block takes it out of the queue; reuse evicts its hash."""

    def __init__(self, num_blocks: int) -> None:
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self.ref = [1] + [0] * (num_blocks - 1)
        self.hash_of: dict[int, int] = {}
        self.cached: dict[int, int] = {}

    def get(self, n: int) -> list[int]:
        out = []
        for _ in range(n):
            i, _ = self.free.popitem(last=False)
            h = self.hash_of.pop(i, None)
            if h is not None:
                del self.cached[h]
            self.ref[i] = 1
            out.append(i)
        return out

    def touch(self, i: int) -> None:
        if self.ref[i] == 0:
            del self.free[i]
        self.ref[i] += 1

    def release(self, ids: list[int]) -> None:
        for i in ids:
            self.ref[i] -= 1
            if self.ref[i] == 0:
                self.free[i] = None

    def cache(self, i: int, h: int) -> None:
        if i not in self.hash_of and h not in self.cached:
            self.hash_of[i], self.cached[h] = h, i


@pytest.mark.parametrize("caching", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_free_queue_matches_an_ordered_dict_reference(caching: bool, seed: int) -> None:
    rng = random.Random(seed)
    num_blocks = rng.randint(8, 40)
    pool, ref = BlockPool(num_blocks, enable_caching=caching), _Reference(num_blocks)
    tables: list[list[KVCacheBlock]] = []  # each holds one reference per block, as a request's table does
    num_hits = num_compactions = 0
    for _ in range(6000):
        op = rng.random()
        if pool.num_free_blocks < 4 and tables:
            op = 0.5  # keep blocks moving: thousands pass through the queue, so it is compacted
        if op < 0.4:
            n = rng.randint(0, min(pool.num_free_blocks, 5))
            got = pool.get_new_blocks(n)
            assert [b.block_id for b in got] == ref.get(n)
            tables.append(got)
        elif op < 0.7 and tables:
            table = tables.pop(rng.randrange(len(tables)))
            pool.free_blocks(reversed(table))
            ref.release([b.block_id for b in reversed(table)])
        elif op < 0.85 and caching and tables:
            table = rng.choice(tables)
            if table:
                b = rng.choice(table)
                h = rng.randrange(60)  # collisions: a second block with cached content stays private
                pool.cache_block(b, h)
                ref.cache(b.block_id, h)
        elif caching and ref.cached:
            h = rng.choice(sorted(ref.cached))
            b = pool.get_cached_block(h)
            assert b is not None and b.block_id == ref.cached[h]
            num_hits += b.ref_cnt == 0  # a hit on a free block: out of the middle of the queue
            pool.touch([b])
            ref.touch(b.block_id)
            tables.append([b])
        head = pool._head
        if head == 0 and getattr(pool, "_seen_head", 0) > 0:
            num_compactions += 1
        pool._seen_head = head  # type: ignore[attr-defined]
        assert pool.num_free_blocks == len(ref.free)
        assert [b.block_id for b in pool.free_queue()] == list(ref.free)
        assert {h: b.block_id for h, b in pool._cached.items()} == ref.cached
        pool.check_invariants(tables)
    assert num_compactions > 0
    if caching:
        assert num_hits > 0 and pool.num_evictions > 0


def test_a_block_freed_taken_by_a_hit_and_freed_again_queues_at_the_tail() -> None:
    pool = BlockPool(5)
    a, b, c, d = pool.get_new_blocks(4)
    pool.cache_block(b, 111)
    pool.free_blocks([a, b, c, d])  # queue: a b c d
    pool.touch([pool.get_cached_block(111)])  # b taken out of the middle: a c d
    pool.free_blocks([b])  # a c d b
    pool.touch([b])  # a c d
    pool.free_blocks([b])  # a c d b (b has two stale entries ahead of its live one)
    assert [x.block_id for x in pool.free_queue()] == [a.block_id, c.block_id, d.block_id, b.block_id]
    assert [x.block_id for x in pool.get_new_blocks(4)] == [a.block_id, c.block_id, d.block_id, b.block_id]
    assert pool.num_free_blocks == 0 and pool.get_cached_block(111) is None
    with pytest.raises(RuntimeError):
        pool.get_new_blocks(1)
    pool.check_invariants([[a], [b], [c], [d]])
