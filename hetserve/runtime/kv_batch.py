"""Several hand-offs in one message: the KV of consecutive ``SendKV`` commands to the same receivers, in one format.

A prefill instance finishes several requests in one step, and the coordinator sends their ``SendKV`` commands
back to back. A worker that finds them queued one after another (``DirectKV.send(defer=True)`` until its pipe is
empty, or another command comes) extracts them together: one gather of all their blocks from the cache (each
request's padding zeroed), converted to the wire format at once (parts padded to whole larger blocks, or
their empty smaller ones dropped, when the block size changes), and one ``KVBatch`` per receiver: one buffer
``[layers, 2, sum of blocks, *block]``, each part a ``KVPiece`` naming its blocks. A receiver that expects every part writes them into its cache on arrival, in one pass
(converted at once where only dtype, layout or heads differ: ``insert_batch``); otherwise its worker loop takes
them part by part (``split``). Each part keeps its own books: its own ``KVSent`` / ``KVIn``, and its own share
of the declared link, one after another.

Not batched (the one-hand-off path): layer-wise sends, fp8, block-major caches or a cache not in one
allocation, receivers on another host, and ``HETSERVE_KV_BATCH=0``.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from hetserve.engine.kv_views import LayerViews
from hetserve.runtime.kv_blocks import gather
from hetserve.runtime.kv_convert import TORCH_DTYPES, KVPayload, convert, stacked_view
from hetserve.runtime.kv_transfer import insert_blocks
from hetserve.runtime.messages import KVBatch, KVPiece

if TYPE_CHECKING:
    from hetserve.runtime.kv_layout import KVDescriptor
    from hetserve.runtime.kv_messages import SendKV

_FORMAT = ("dtype", "layout", "arrangement", "block_size", "head_dim")


def enabled() -> bool:
    return os.environ.get("HETSERVE_KV_BATCH", "1") != "0"


def batch_key(cmd: SendKV) -> tuple[Any, ...]:
    """Sends with equal keys may go in one message: same wire format, receivers, link and sender rank."""
    return (cmd.wire, tuple((t.kind, t.address, t.layer_start, t.layer_end) for t in cmd.targets),
            cmd.link_bandwidth, cmd.link_latency_s, cmd.src_rank)


def batchable(desc: KVDescriptor, caches: Any, cmd: SendKV) -> bool:
    return (not cmd.layerwise and desc.arrangement == "layer_major" and cmd.wire.arrangement == "layer_major"
            and "fp8_e4m3" not in (desc.dtype, cmd.wire.dtype) and stacked_view(caches) is not None)


@dataclass
class BatchOut:
    """The wire-format KV of a batch: ``x`` ``[layers, 2, sum of blocks, *block]`` (contiguous), part ``i``
    blocks ``[offsets[i], offsets[i] + blocks[i])``; ``wire`` its descriptor for this worker's layers."""

    x: torch.Tensor
    wire: KVDescriptor
    head_start: int
    offsets: list[int]
    blocks: list[int]

    def part_bytes(self, i: int) -> int:
        per_block = self.x[:, :, :1].numel() * self.x.element_size()
        return per_block * self.blocks[i]

    def pieces(self, cmds: list[SendKV], layer_start: int, lo: int, hi: int,
               not_before: list[float]) -> KVBatch:
        """The header for the receiver of local layers ``[lo, hi)`` (global ``layer_start + lo``)."""
        block = list(self.x.shape[3:])
        parts = [KVPiece(transfer_id=c.transfer_id, src_rank=c.src_rank, layer_start=layer_start + lo,
                         head_start=self.head_start, num_tokens=c.num_tokens, desc=self.wire,
                         shapes=[[2, nb, *block]] * (hi - lo), token_start=c.token_start, final=True,
                         not_before_s=nbf)
                 for c, nb, nbf in zip(cmds, self.blocks, not_before, strict=True)]
        return KVBatch(parts=parts, offsets=list(self.offsets), blocks=list(self.blocks))


def extract_batch(caches: Any, desc: KVDescriptor, cmds: list[SendKV]) -> BatchOut:
    """One gather of every command's blocks (tokens ``[token_start, num_tokens)``; padding zeroed), converted to
    the wire format (per command, where it differs from the cache's)."""
    bs = desc.block_size
    ids: list[int] = []
    counts, tails = [], []
    for c in cmds:
        if c.token_start % bs:
            raise ValueError(f"token_start {c.token_start} is not on a block of {bs}")
        n = c.num_tokens - c.token_start
        nb = -(-n // bs)
        table = c.block_ids[c.token_start // bs:]
        if n < 1 or nb > len(table):
            raise ValueError(f"{c.transfer_id}: {n} tokens need {nb} blocks of {bs}, the table has {len(table)}")
        ids += table[:nb]
        counts.append(nb)
        tails.append(n - (nb - 1) * bs)
    whole = stacked_view(caches)
    assert whole is not None
    x = gather(whole, 2, ids)  # [L, 2, sum, *block]
    slot_axis = -3 if desc.layout == "NHD" else -2
    off = 0
    for nb, tail in zip(counts, tails, strict=True):
        if tail < bs:
            x.select(2, off + nb - 1).narrow(slot_axis, tail, bs - tail).zero_()
        off += nb
    local = dataclasses.replace(desc, num_layers=x.shape[0])
    wire = dataclasses.replace(cmds[0].wire, num_layers=x.shape[0])
    h0 = desc.head_range[0]
    offsets = [sum(counts[:i]) for i in range(len(counts))]
    if all(getattr(wire, f) == getattr(local, f) for f in _FORMAT) and wire.head_range == local.head_range:
        return BatchOut(x, local, h0, offsets, counts)
    if wire.block_size == local.block_size:  # dtype, layout, heads: block by block, so all parts in one pass
        p = convert(KVPayload(local, len(ids) * bs, LayerViews(x), h0), local, wire, len(ids) * bs,
                    heads=desc.head_range, consume=True)
        return BatchOut(_stacked(p.tensors), p.desc, h0, offsets, counts)
    wb = wire.block_size
    if wb % bs and bs % wb:  # block sizes not multiples of each other: part by part
        outs, off = [], 0
        for c, nb in zip(cmds, counts, strict=True):
            part = KVPayload(local, c.num_tokens - c.token_start, LayerViews(x.narrow(2, off, nb).contiguous()), h0)
            p = convert(part, local, wire, c.num_tokens - c.token_start, heads=desc.head_range, consume=True)
            outs.append(_stacked(p.tensors))
            off += nb
        blocks = [o.shape[2] for o in outs]
        offsets = [sum(blocks[:i]) for i in range(len(blocks))]
        return BatchOut(torch.cat(outs, dim=2).contiguous(), p.desc, h0, offsets, blocks)
    # re-blocked at once: into larger blocks, each part padded to whole ones with zero blocks (a part's last
    # block must not take the next part's tokens); into smaller ones, each part's empty last ones dropped after
    r = wb // bs if wb > bs else 1
    if r > 1 and any(nb % r for nb in counts):
        pieces, off = [], 0
        for nb in counts:
            pieces.append(x.narrow(2, off, nb))
            if nb % r:
                pieces.append(x.new_zeros(*x.shape[:2], r - nb % r, *x.shape[3:]))
            off += nb
        x = torch.cat(pieces, dim=2)
    padded = [-(-nb // r) * r for nb in counts]
    n_all = sum(padded) * bs
    p = convert(KVPayload(local, n_all, LayerViews(x), h0), local, wire, n_all, heads=desc.head_range, consume=True)
    y = _stacked(p.tensors)
    if r > 1:
        blocks = [pb // r for pb in padded]
    else:
        split = bs // wb
        blocks = [-(-(c.num_tokens - c.token_start) // wb) for c in cmds]
        if blocks != [nb * split for nb in counts]:
            y = torch.cat([y.narrow(2, o * split, k) for o, k in zip(offsets, blocks, strict=True)], dim=2)
    offsets = [sum(blocks[:i]) for i in range(len(blocks))]
    return BatchOut(y.contiguous(), p.desc, h0, offsets, blocks)


def _stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
    whole = stacked_view(tensors)
    return torch.stack(list(tensors)) if whole is None else whole


def batch_tensor(header: KVBatch, buf: Any) -> torch.Tensor:
    """The message's one buffer as ``[layers, 2, sum of blocks, *block]`` (a view, no copy)."""
    from hetserve.runtime.shard import _read_only_tensor

    p0 = header.parts[0]
    block = p0.shapes[0][2:]
    total = sum(header.blocks)
    flat = _read_only_tensor(buf)
    x = flat.view(TORCH_DTYPES[p0.desc.dtype])
    n_layers = len(p0.shapes)
    want = n_layers * 2 * total
    for d in block:
        want *= d
    if x.numel() != want or len(header.offsets) != len(header.parts) or len(header.blocks) != len(header.parts):
        raise ValueError(f"a batch of {len(header.parts)} parts with {x.numel()} elements, expected {want}")
    return x.view(n_layers, 2, total, *block)


def split(header: KVBatch, buf: Any) -> list[tuple[KVPiece, list[Any]]]:
    """Each part as a one-piece hand-off of its own: the piece and one packed buffer (a copy of its blocks)."""
    x = batch_tensor(header, buf)
    out = []
    for p, off, nb in zip(header.parts, header.offsets, header.blocks, strict=True):
        part = x.narrow(2, off, nb).contiguous()
        out.append((p, [part.reshape(-1).view(torch.uint8)]))
    return out


def insert_batch(caches: Any, desc: KVDescriptor, layer_start: int, header: KVBatch, buf: Any,
                 block_ids: list[list[int]]) -> bool:
    """Write every part into its blocks (``block_ids[i]`` for part ``i``) in one pass, converted at once where the
    wire differs from this cache in dtype, layout or heads (not in block size), when the message holds exactly
    this worker's layers and all its heads. False: not possible here (the caller goes part by part)."""
    p0 = header.parts[0]
    w = dataclasses.replace(p0.desc, num_layers=desc.num_layers)
    heads = p0.shapes[0][3 if w.layout == "NHD" else 2]
    h0, h1 = desc.head_range
    if (w.block_size != desc.block_size or "fp8_e4m3" in (w.dtype, desc.dtype) or desc.arrangement != "layer_major"
            or w.arrangement != "layer_major" or p0.layer_start != layer_start or len(p0.shapes) != desc.num_layers
            or p0.head_start > h0 or p0.head_start + heads < h1):
        return False
    ids: list[int] = []
    for nb, table in zip(header.blocks, block_ids, strict=True):
        if nb > len(table):
            raise ValueError(f"a part of {nb} blocks for a table of {len(table)}")
        ids += table[:nb]
    n = len(ids) * desc.block_size
    payload = KVPayload(w, n, LayerViews(batch_tensor(header, buf)), p0.head_start)
    if any(getattr(w, f) != getattr(desc, f) for f in _FORMAT) or (p0.head_start, p0.head_start + heads) != (h0, h1):
        payload = convert(payload, w, desc, n)  # the buffer is borrowed: converted into a new tensor
    insert_blocks(caches, ids, payload, desc)
    return True
