"""Per-request block tables on top of the block pool, with prefix caching by chained block hashes."""

from __future__ import annotations

from hetserve.core.request import Request
from hetserve.engine.kv.block_pool import BlockPool, KVCacheBlock


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def hash_block_tokens(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """Chained hash: a block's identity is its tokens and everything before them."""
    return hash((parent_hash, token_ids))


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_to_blocks: dict[str, list[KVCacheBlock]] = {}
        # how many leading blocks of each request are registered in the prefix cache
        self._num_cached_blocks: dict[str, int] = {}

    @property
    def usage(self) -> float:
        return self.pool.usage

    def _block_hashes(self, req: Request, num_full_blocks: int) -> list[int]:
        hashes = req.block_hashes
        bs = self.block_size
        if len(hashes) < num_full_blocks:
            tokens = req.all_token_ids
            parent = hashes[-1] if hashes else None
            for i in range(len(hashes), num_full_blocks):
                parent = hash_block_tokens(parent, tuple(tokens[i * bs : (i + 1) * bs]))
                hashes.append(parent)
        return hashes

    def get_computed_blocks(self, req: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of the request, in whole blocks. At least one token is always left to
        compute, since the last prompt position must run to produce logits (or, for a request that computes only
        a head of its prompt, so that it computes anything: a hit past its limit left it nothing to schedule)."""
        if not self.enable_caching or req.sampling_params.prompt_logprobs is not None:
            return [], 0
        max_blocks = (req.num_target_tokens - 1) // self.block_size
        hits: list[KVCacheBlock] = []
        self.pool.num_prefix_queries += 1
        for h in self._block_hashes(req, max_blocks):
            b = self.pool.get_cached_block(h)
            if b is None:
                break
            hits.append(b)
        if hits:
            self.pool.num_prefix_hits += 1
        return hits, len(hits) * self.block_size

    def allocate_slots(
        self,
        req: Request,
        num_new_tokens: int,
        new_computed_blocks: list[KVCacheBlock] | None = None,
    ) -> list[KVCacheBlock] | None:
        """Make room for ``num_new_tokens`` after the request's computed tokens (plus any prefix hit).
        Returns the newly allocated blocks, or None (and changes nothing) if the pool is short."""
        table = self.req_to_blocks.get(req.request_id)
        if not new_computed_blocks:
            # the hot path: a running request that may need one more block
            num_slots = req.num_computed_tokens + num_new_tokens
            if table is not None and num_slots <= len(table) * self.block_size:
                return []  # its last block still has room
            num_new = -(-num_slots // self.block_size) - (len(table) if table else 0)
            if num_new <= 0:
                return []
            if num_new > self.pool.num_free_blocks:
                return None
            new_blocks = self.pool.get_new_blocks(num_new)
            if table is None:
                self.req_to_blocks[req.request_id] = new_blocks[:]
            else:
                table.extend(new_blocks)
            return new_blocks
        num_have = len(table) if table else 0
        num_computed = req.num_computed_tokens + len(new_computed_blocks) * self.block_size
        num_required = cdiv(num_computed + num_new_tokens, self.block_size)
        num_new = max(0, num_required - num_have - len(new_computed_blocks))
        # a hit block with no reference sits in the free queue; taking it shrinks what is free
        num_hit_from_free = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        if num_new > self.pool.num_free_blocks - num_hit_from_free:
            return None
        self.pool.touch(new_computed_blocks)
        new_blocks = self.pool.get_new_blocks(num_new)
        table = self.req_to_blocks.setdefault(req.request_id, [])
        table.extend(new_computed_blocks)
        table.extend(new_blocks)
        self._num_cached_blocks[req.request_id] = max(
            self._num_cached_blocks.get(req.request_id, 0), len(table) - len(new_blocks)
        )
        return new_blocks

    def can_fit(self, num_blocks: int) -> bool:
        return num_blocks <= self.pool.num_free_blocks

    def cache_blocks(self, req: Request, num_computed_tokens: int) -> None:
        """Register the request's blocks that are now full of computed tokens."""
        if not self.enable_caching:
            return
        table = self.req_to_blocks.get(req.request_id)
        if not table:
            return
        num_full = min(num_computed_tokens // self.block_size, len(table))
        start = self._num_cached_blocks.get(req.request_id, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(req, num_full)
        for i in range(start, num_full):
            self.pool.cache_block(table[i], hashes[i])
        self._num_cached_blocks[req.request_id] = num_full

    def free(self, req: Request) -> None:
        table = self.req_to_blocks.pop(req.request_id, None)
        self._num_cached_blocks.pop(req.request_id, None)
        if table:
            self.pool.free_blocks(reversed(table))

    def get_block_ids(self, req_id: str) -> list[int]:
        return [b.block_id for b in self.req_to_blocks.get(req_id, [])]

    def check_invariants(self) -> None:
        self.pool.check_invariants(list(self.req_to_blocks.values()))
