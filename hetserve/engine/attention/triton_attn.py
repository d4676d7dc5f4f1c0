"""Triton paged-attention backend (``"triton"``): the GPU backend, CUDA-graph safe.

Same contract as :class:`AttentionBackend`. A decode step (``meta.max_query_len == 1``) launches kernels whose
shapes depend only on tensor shapes, never on host copies of lengths, so it can be captured once per batch size
and replayed. A mixed step also reads ``query_start_loc_cpu`` to give its leading decodes decode tiles (eager
only). On CPU tensors it runs the Triton interpreter (slow; for tests).

It also offers :meth:`forward_rotary`, which fuses the rotary embedding of q/k with the KV-cache write (one
kernel instead of two per layer); the model uses it when ``fuses_rotary`` is set.
"""

from __future__ import annotations

from typing import Any

import torch

from hetserve.engine.attention.base import AttentionBackend, AttentionMetadata
from hetserve.kernels import Impl
from hetserve.kernels.attention import decode_prefix_len, write_kv_cache
from hetserve.kernels.attention_launch import PagedAttentionPlan
from hetserve.kernels.rotary import rotary_and_store_kv


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    fuses_rotary = True

    def __init__(self, device: torch.device | str = "cpu") -> None:
        super().__init__(device)
        # on CPU the kernels run interpreted; "auto" would silently switch them to the torch fallback
        self._impl: Impl = "triton"
        # the step whose decode prefix was last computed (one scan per step, not per layer)
        self._prefix_meta: AttentionMetadata | None = None
        self._prefix: tuple[int, int] | None = None
        # the step's attention plans (one per q / cache layout, scale and window), bound on its first layer and
        # run by every layer: the per-layer host work is then the launches alone (PagedAttentionPlan)
        self._plans_meta: AttentionMetadata | None = None
        self._plans: dict[tuple[Any, ...], PagedAttentionPlan] = {}

    def _decode_prefix(self, meta: AttentionMetadata) -> tuple[int, int] | None:
        """Leading one-token sequences of a mixed step (the scheduler puts running decodes first): they get
        decode tiles in a launch of their own instead of 128-row prefill tiles."""
        if meta.max_query_len == 1:
            return None
        if self._prefix_meta is not meta:
            k = decode_prefix_len(meta.query_start_loc_cpu)
            self._prefix_meta, self._prefix = meta, (k, k)
        return self._prefix

    def attend(
        self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
        sliding_window: int | None, out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention of ``q`` (rotated) over what the cache holds: the step's K/V must be written already (by
        :meth:`forward` / :meth:`forward_rotary`, or by a piecewise CUDA graph). Written into ``out`` (same
        shape as q) when given."""
        if q.stride(-1) != 1:
            q = q.contiguous()
        if self._plans_meta is not meta:  # a new step (the runner builds new metadata for each)
            self._plans_meta, self._plans = meta, {}
        # a plan's split-KV scratch is allocated when it is built: one built outside a CUDA-graph capture must
        # not be baked into a graph (its memory goes back to the allocator with the plan), nor the reverse
        capturing = q.is_cuda and torch.cuda.is_current_stream_capturing()
        key = (tuple(q.shape), q.stride(), q.dtype, tuple(kv_cache.shape), kv_cache.stride(), kv_cache.dtype,
               scale, sliding_window, capturing)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = PagedAttentionPlan(
                q, kv_cache, meta.query_start_loc, meta.seq_lens, meta.block_tables, scale, sliding_window,
                decode=meta.max_query_len == 1, impl=self._impl, decode_prefix=self._decode_prefix(meta),
            )
        return plan.run(q, kv_cache, out)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        write_kv_cache(k, v, kv_cache, meta.slot_mapping, impl=self._impl)
        return self.attend(q, kv_cache, meta, scale, sliding_window)

    def forward_rotary(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        """Rotate q and k in place, write k/v, attend: the result of rotating first and calling :meth:`forward`."""
        rotary_and_store_kv(q, k, v, positions, cos_sin_cache, kv_cache, meta.slot_mapping, impl=self._impl)
        return self.attend(q, kv_cache, meta, scale, sliding_window)
