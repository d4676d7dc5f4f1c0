"""Head-level attention split (Hetis): one instance's KV heads are cut into contiguous ranges, the lowest
kept here (computed by the normal backend over a local cache holding only those heads) and the rest owned by
attention holders elsewhere (:class:`RemoteHeads`: an attention worker process, or :class:`LocalHeads` in
this process).

Per step the attention metadata goes once to every holder (on the first layer that sees a new metadata
object); per layer, the q rows of the held heads' query-head groups and the new k, v rows of the held heads go
out first, the kept heads are computed while the holders work, then their outputs come back and are
concatenated in head order. The layer is identified by the KV-cache tensor the model passes (the runner gives
each layer its own tensor); ``set_split`` installs new local caches after a re-dispatch.

Contract as :class:`AttentionBackend`, with ``kv_cache`` one of ``local_caches`` (``[2, blocks, block,
kept heads, D]``). ``fuses_rotary`` is False: the model rotates q and k before calling :meth:`forward`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from hetserve.engine.attention.base import AttentionBackend, AttentionMetadata


def head_ranges(num_kv_heads: int, assignment: Sequence[int]) -> tuple[int, list[tuple[int, int]]]:
    """``(kept, [(head_start, num_heads) per holder])``: the main keeps ``[0, kept)``, holder ``i`` the next
    ``assignment[i]`` heads."""
    if any(a < 0 for a in assignment) or sum(assignment) > num_kv_heads:
        raise ValueError(f"assignment {list(assignment)} does not fit {num_kv_heads} KV heads")
    kept = num_kv_heads - sum(assignment)
    out, start = [], kept
    for a in assignment:
        out.append((start, a))
        start += a
    return kept, out


class RemoteHeads(ABC):
    """A holder of KV heads ``[head_start, head_start + num_heads)`` of every layer.

    ``start_step(meta)`` is called once per step before the first ``send_layer``; each ``send_layer`` is
    answered by exactly one ``recv_layer``, in order. ``recv_layer`` raises (never hangs) when the holder is
    gone."""

    head_start: int
    num_heads: int

    @abstractmethod
    def start_step(self, meta: AttentionMetadata) -> None: ...

    @abstractmethod
    def send_layer(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, sliding_window: int | None
    ) -> None: ...

    @abstractmethod
    def recv_layer(self) -> torch.Tensor:
        """``[num_tokens, num_heads * group, head_dim]`` on any device, any float dtype."""


class LocalHeads(RemoteHeads):
    """Holder in this process: its own caches (``[2, blocks, block, num_heads, D]`` per layer) and backend."""

    def __init__(self, backend: AttentionBackend, caches: list[torch.Tensor], head_start: int) -> None:
        self.backend = backend
        self.caches = caches
        self.head_start = head_start
        self.num_heads = caches[0].shape[3] if caches else 0
        self._meta: AttentionMetadata | None = None
        self._out: list[torch.Tensor] = []

    def start_step(self, meta: AttentionMetadata) -> None:
        self._meta = meta

    def send_layer(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, sliding_window: int | None
    ) -> None:
        assert self._meta is not None, "start_step first"
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        self._out.append(self.backend.forward(q, k, v, self.caches[layer], self._meta, scale, sliding_window))

    def recv_layer(self) -> torch.Tensor:
        return self._out.pop(0)


class HeadSplitBackend(AttentionBackend):
    name = "head_split"
    fuses_rotary = False

    def __init__(
        self,
        inner: AttentionBackend,
        num_heads: int,
        num_kv_heads: int,
        local_caches: list[torch.Tensor],
        remotes: Sequence[RemoteHeads],
    ) -> None:
        super().__init__(inner.device)
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.inner = inner
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.group = num_heads // num_kv_heads
        self._meta: AttentionMetadata | None = None
        self.set_split(local_caches, remotes)

    def set_split(self, local_caches: list[torch.Tensor], remotes: Sequence[RemoteHeads]) -> None:
        """Kept heads ``[0, kept)`` in ``local_caches`` (kept = their head dimension); the holders with heads
        must tile ``[kept, num_kv_heads)`` in order. Takes effect from the next step."""
        kept = int(local_caches[0].shape[3])
        active = [r for r in remotes if r.num_heads > 0]
        start = kept
        for r in active:
            if r.head_start != start:
                raise ValueError(f"holders must tile the heads in order: expected head {start}, got {r.head_start}")
            start += r.num_heads
        if start != self.num_kv_heads:
            raise ValueError(f"kept {kept} + held heads cover {start} of {self.num_kv_heads} KV heads")
        self.num_kept = kept
        self.local_caches = local_caches
        self.remotes = active
        self._layer_of = {id(c): i for i, c in enumerate(local_caches)}
        self._meta = None

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
        layer = self._layer_of.get(id(kv_cache))
        if layer is None:
            raise ValueError("HeadSplitBackend was given a KV cache that is not one of its local caches")
        if meta is not self._meta:
            self._meta = meta
            for r in self.remotes:
                r.start_step(meta)
        g = self.group
        for r in self.remotes:
            a, b = r.head_start, r.head_start + r.num_heads
            r.send_layer(layer, q[:, a * g : b * g], k[:, a:b], v[:, a:b], scale, sliding_window)
        kept = self.num_kept
        outs = []
        if kept:
            outs.append(
                self.inner.forward(
                    q[:, : kept * g].contiguous(), k[:, :kept].contiguous(), v[:, :kept].contiguous(),
                    kv_cache, meta, scale, sliding_window,
                )
            )
        for r in self.remotes:
            outs.append(r.recv_layer().to(device=q.device, dtype=q.dtype))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
