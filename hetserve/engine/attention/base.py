"""The paged-KV attention interface: one metadata object per step, one backend object per runner."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    """Batch layout of one forward step, shared by every attention layer of that step.

    Query tokens of all sequences are flattened: sequence ``s`` owns rows
    ``query_start_loc[s]:query_start_loc[s + 1]``. Device tensors live on the model's device; the ``*_cpu``
    lists are host copies for backends that loop in Python.
    """

    num_tokens: int  # query tokens in this step, flattened over sequences
    num_seqs: int
    positions: torch.Tensor  # int64 [num_tokens], absolute position of each query token
    slot_mapping: torch.Tensor  # int64 [num_tokens], block_id * block_size + offset where this token's k/v go
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]
    seq_lens: torch.Tensor  # int32 [num_seqs], context length after this step (cached + new)
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq], padded with 0
    max_query_len: int
    max_seq_len: int
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]


class AttentionBackend(ABC):
    """Attention over a paged KV cache for one layer at a time.

    Contract of :meth:`forward`:

    * ``q`` is ``[num_tokens, num_heads, head_dim]``; ``k`` and ``v`` are ``[num_tokens, num_kv_heads, head_dim]``
      (rotary already applied to ``q`` and ``k``).
    * ``kv_cache`` is one layer's tensor ``[2, num_blocks, block_size, num_kv_heads, head_dim]``: K then V,
      token-major (NHD) inside a block. Slot ``b * block_size + i`` is offset ``i`` of block ``b``.
    * First the new ``k``/``v`` rows are written at ``meta.slot_mapping`` (a negative slot means "padding
      token, write nothing"). Then every query token attends causally to its own sequence's context as read
      through ``meta.block_tables``: a query at absolute position ``p`` sees context positions
      ``[max(0, p - sliding_window + 1), p]`` (``[0, p]`` without a window). Context written by earlier steps
      (chunked prefill, decode, prefix-cache hits that are never written this step) is read from the cache.
    * Grouped-query attention: query head ``h`` uses KV head ``h // (num_heads // num_kv_heads)``.
    * Scores are ``q . k * scale``. Returns ``[num_tokens, num_heads, head_dim]`` in ``q``'s dtype; rows of
      tokens past ``query_start_loc[-1]`` (padding) are unspecified.
    """

    name: str = "abstract"

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor: ...
