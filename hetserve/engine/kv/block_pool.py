"""Fixed-size KV blocks: reference counts, an LRU free queue and a prefix cache of full blocks.

Block ids are integers; no tensors live here. Block 0 is a null block that is never handed out, so
padded entries of block tables and slot mappings can point at it harmlessly.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

NULL_BLOCK_ID = 0
# consumed entries at the head of the free queue are dropped once there are this many and they are half of it
_COMPACT_AT = 1024


@dataclass(eq=False, slots=True)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    # set once every token of the block is computed; the chained hash of its tokens and its prefix
    block_hash: int | None = None
    # entries of this block in the pool's free queue that no longer count (see BlockPool)
    num_stale_entries: int = 0


class BlockPool:
    """Owns every block. A block is either in use (ref_cnt > 0) or in the free queue.

    Free blocks that still hold a cached prefix stay findable by hash until they are reused; the free
    queue is ordered least recently freed first, so the oldest cached prefixes are evicted first.

    The free queue is a list read from a head index, so a request's blocks are taken as one slice and given back
    by appends (an ordered dict costs several times more per block, and a simulation moves millions). A prefix
    hit takes a free block out of the middle: its entry stays and turns stale (``num_stale_entries``). A block's
    stale entries all precede its live one (a block is queued again only at the tail), so the first
    ``num_stale_entries`` entries of a block met from the head are skipped.
    """

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (one is the null block), got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.blocks[NULL_BLOCK_ID].ref_cnt = 1  # pinned forever
        self._queue: list[KVCacheBlock] = self.blocks[1:]
        self._head = 0
        self._num_stale = 0
        self._cached: dict[int, KVCacheBlock] = {}
        self.num_evictions = 0
        self.num_prefix_queries = 0
        self.num_prefix_hits = 0

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self._queue) - self._head - self._num_stale

    @property
    def usage(self) -> float:
        """Fraction of usable blocks held by live requests (cached free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_usable_blocks

    def get_cached_block(self, block_hash: int) -> KVCacheBlock | None:
        return self._cached.get(block_hash)

    def get_new_blocks(self, n: int) -> list[KVCacheBlock]:
        free = self.num_free_blocks
        if n > free:
            raise RuntimeError(f"asked for {n} blocks, {free} free")
        queue, head = self._queue, self._head
        if not self._num_stale and not self._cached:  # no entry to skip, no hash to drop: one slice
            out = queue[head : head + n]
            head += n
            for b in out:
                b.ref_cnt = 1
        else:
            cached = self._cached
            out = []
            while len(out) < n:
                b = queue[head]
                head += 1
                if b.num_stale_entries:
                    b.num_stale_entries -= 1
                    self._num_stale -= 1
                    continue
                if b.block_hash is not None:
                    if cached.get(b.block_hash) is b:
                        del cached[b.block_hash]
                    b.block_hash = None
                    self.num_evictions += 1
                b.ref_cnt = 1
                out.append(b)
        if head >= _COMPACT_AT and 2 * head >= len(queue):
            del queue[:head]
            head = 0
        self._head = head
        return out

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on blocks found in the prefix cache (they may sit in the free queue)."""
        for b in blocks:
            if b.ref_cnt == 0:
                b.num_stale_entries += 1  # out of the free queue: its entry there no longer counts
                self._num_stale += 1
            b.ref_cnt += 1

    def free_blocks(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference each; pass them tail-first so a request's last blocks are evicted first."""
        append = self._queue.append
        for b in blocks:
            ref_cnt = b.ref_cnt
            if ref_cnt == 1:
                b.ref_cnt = 0
                append(b)
            elif ref_cnt > 1:
                b.ref_cnt = ref_cnt - 1
            else:
                raise RuntimeError(f"block {b.block_id} freed more often than taken")

    def cache_block(self, block: KVCacheBlock, block_hash: int) -> None:
        """Register a block whose tokens are all computed. A block already holding the same content under
        another id stays the canonical one; this block remains private."""
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self._cached:
            return
        block.block_hash = block_hash
        self._cached[block_hash] = block

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix; only possible when no block is in use."""
        if self.num_free_blocks != self.num_usable_blocks:
            return False
        for b in self.blocks[1:]:
            b.block_hash = None
        self._cached.clear()
        return True

    def free_queue(self) -> list[KVCacheBlock]:
        """The free blocks, least recently freed first (the order new blocks are taken in)."""
        skip = {b.block_id: b.num_stale_entries for b in self.blocks if b.num_stale_entries}
        out = []
        for b in self._queue[self._head :]:
            if skip.get(b.block_id):
                skip[b.block_id] -= 1
            else:
                out.append(b)
        return out

    def check_invariants(self, live_tables: Sequence[Sequence[KVCacheBlock]]) -> None:
        """Raise AssertionError unless refcounts equal the number of live tables holding each block and the
        free queue holds exactly the blocks with no reference, each once."""
        counts = [0] * self.num_blocks
        counts[NULL_BLOCK_ID] = 1
        for table in live_tables:
            for b in table:
                counts[b.block_id] += 1
        free = self.free_queue()
        free_ids = {b.block_id for b in free}
        assert len(free_ids) == len(free) == self.num_free_blocks, "free queue holds a block twice"
        assert self._num_stale == sum(b.num_stale_entries for b in self.blocks), "stale entry count out of sync"
        for b in self.blocks:
            assert b.ref_cnt == counts[b.block_id], f"block {b.block_id}: ref {b.ref_cnt} != {counts[b.block_id]}"
            assert (b.block_id in free_ids) == (b.ref_cnt == 0), f"block {b.block_id} free-queue mismatch"
        for h, b in self._cached.items():
            assert b.block_hash == h, f"cache map out of sync at block {b.block_id}"
