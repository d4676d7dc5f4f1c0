"""KV conversion between cache formats: pure functions over torch tensors (never mutate their inputs).

Each step stands alone (layout, arrangement, block size, dtype, TP heads) and ``convert`` composes them on
``[l, 2, num_blocks, *block]`` tensors (layer by layer for layer-major sources, all layers at once as a view of
a block-major one): it first picks the heads the destination needs, casts early when the destination dtype is
narrower (less to copy in every later step) and late when it is wider (folded into the join or re-block copy),
and re-blocks and re-lays-out in one copy (none when block size and layout already match).

fp8 e4m3 values are ``q = clamp(x / scale, -448, 448)`` rounded to nearest-even; ``x ~= q * scale``. Scales are
float32, one per (layer, K|V) tensor (``[L, 2, 1]``) or per (layer, K|V, kv head) (``[L, 2, H]``). Inside
``convert`` they are always per head, so joining TP shards never has to requantise; a per-tensor result is
requantised to one shared scale only when shards brought different per-tensor scales.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from hetserve.engine.kv_views import LayerViews
from hetserve.runtime.kv_layout import (
    DTYPE_ITEMSIZE,
    FP8_E4M3_MAX,
    KVDescriptor,
    KVLayout,
    check_compatible,
)

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "fp8_e4m3": torch.float8_e4m3fn,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in TORCH_DTYPES.items()}


@dataclass
class KVPayload:
    """A request's KV (or one shard's heads of it) as contiguous tensors in ``desc``'s format.

    ``tensors``: layer_major -> ``num_layers`` tensors ``[2, B, *block]``; block_major -> one tensor
    ``[B, num_layers, 2, *block]``. Blocks are the request's in order: block ``i`` holds tokens
    ``[i * block_size, (i + 1) * block_size)``; tokens at and past ``num_tokens`` are zero.
    The payload holds global kv heads ``[head_start, head_start + num_heads)``, not necessarily all of
    ``desc.head_range``. ``scales`` (fp8 only): float32 ``[num_layers, 2, 1 | num_heads]``.
    """

    desc: KVDescriptor
    num_tokens: int
    tensors: list[torch.Tensor]
    head_start: int
    scales: torch.Tensor | None = None

    @property
    def num_heads(self) -> int:
        t = self.tensors[0]
        return t.shape[-2] if self.desc.layout == "NHD" else t.shape[-3]

    @property
    def head_stop(self) -> int:
        return self.head_start + self.num_heads

    @property
    def num_blocks(self) -> int:
        return self.tensors[0].shape[1 if self.desc.arrangement == "layer_major" else 0]

    @property
    def num_bytes(self) -> int:
        n = sum(t.numel() * t.element_size() for t in self.tensors)
        return n + (0 if self.scales is None else self.scales.numel() * self.scales.element_size())


def stacked_view(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """``[len(tensors), *shape]`` over the same memory when ``tensors`` are equally shaped, contiguous and
    equally spaced views of one storage (per-layer views of a cache allocated as one block, or the per-layer
    buffers of one received message); None otherwise. Lets a per-layer list be moved in one kernel."""
    if not tensors:
        return None
    if isinstance(tensors, LayerViews) and tensors.intact() and tensors.whole.is_contiguous():
        return tensors.whole
    t0 = tensors[0]
    if not t0.is_contiguous():
        return None
    if len(tensors) == 1:
        return t0.unsqueeze(0)
    step = tensors[1].storage_offset() - t0.storage_offset()
    if step < t0.numel():
        return None
    base = t0.untyped_storage().data_ptr()
    for i, t in enumerate(tensors):
        if (t.shape != t0.shape or t.dtype != t0.dtype or t.device != t0.device or not t.is_contiguous()
                or t.untyped_storage().data_ptr() != base or t.storage_offset() != t0.storage_offset() + i * step):
            return None
    return t0.as_strided((len(tensors), *t0.shape), (step, *t0.stride()), t0.storage_offset())


# ---- layout -------------------------------------------------------------------------------------
def head_axis(layout: KVLayout) -> int:
    """Axis of kv heads counted from the end of a tensor whose last three dims are a block."""
    return -2 if layout == "NHD" else -3


def convert_layout(blocks: torch.Tensor, src: KVLayout, dst: KVLayout) -> torch.Tensor:
    """Blocks whose last three dims are ``[block_size, H, D]`` (NHD) <-> ``[H, block_size, D]`` (HND)."""
    if src == dst:
        return blocks.clone()
    return blocks.transpose(-3, -2).contiguous()


# ---- arrangement --------------------------------------------------------------------------------
def layer_major_to_block_major(layers: Sequence[torch.Tensor]) -> torch.Tensor:
    """``num_layers`` tensors ``[2, B, *block]`` -> one ``[B, num_layers, 2, *block]``."""
    return _stack(layers).movedim(2, 0).contiguous()


def block_major_to_layer_major(blocks: torch.Tensor) -> list[torch.Tensor]:
    """``[B, num_layers, 2, *block]`` -> ``num_layers`` tensors ``[2, B, *block]``."""
    per_layer = blocks.movedim(0, 2)  # [L, 2, B, *block]
    return [t.contiguous() for t in per_layer.unbind(0)]


def _stack(layers: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack(list(layers), dim=0)


def unstacked(x: torch.Tensor, arrangement: str) -> list[torch.Tensor]:
    if arrangement == "layer_major":
        return [t.contiguous() for t in x.unbind(0)]
    return [x.movedim(2, 0).contiguous()]


# ---- block size ---------------------------------------------------------------------------------
def rechunk_blocks(
    blocks: torch.Tensor,
    num_tokens: int,
    dst_block_size: int,
    src_layout: KVLayout = "NHD",
    dst_layout: KVLayout | None = None,
) -> torch.Tensor:
    """Re-cut a request's blocks ``[..., B, *block]`` into blocks of ``dst_block_size`` tokens.

    Token ``p`` (``p < num_tokens``) moves from block ``p // src_bs`` slot ``p % src_bs`` to block
    ``p // dst_bs`` slot ``p % dst_bs``; the result has ``ceil(num_tokens / dst_bs)`` blocks, zero past the
    last token. Any sizes, either direction; also changes the layout on the way when ``dst_layout`` is set.
    """
    return _rechunk(blocks, num_tokens, dst_block_size, src_layout, src_layout if dst_layout is None else dst_layout)


def _rechunk(
    blocks: torch.Tensor, num_tokens: int, dst_bs: int, src_layout: str, dst_layout: str, owned: bool = False,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """``rechunk_blocks``; with ``owned`` (``blocks`` is a temporary of the caller) it may reuse ``blocks``;
    with ``dtype`` the copy also casts (non-fp8 dtypes)."""
    dtype = blocks.dtype if dtype is None else dtype
    nhd = blocks if src_layout == "NHD" else blocks.transpose(-3, -2)
    *lead, num_blocks, src_bs, num_heads, head_size = nhd.shape
    if num_tokens > num_blocks * src_bs:
        raise ValueError(f"{num_tokens} tokens do not fit in {num_blocks} blocks of {src_bs}")
    nb = -(-num_tokens // dst_bs)
    full, rem = divmod(num_tokens, dst_bs)
    if src_bs == dst_bs and src_layout == dst_layout:
        out = blocks.narrow(-4, 0, nb)
        if dtype != blocks.dtype:
            out = out.to(dtype)
        elif not owned:
            out = out.clone()
        out_nhd = out if dst_layout == "NHD" else out.transpose(-3, -2)
        if rem:
            out_nhd.select(-4, nb - 1).narrow(-3, rem, dst_bs - rem).zero_()
        return out
    tokens = nhd.reshape(*lead, num_blocks * src_bs, num_heads, head_size)  # a view when NHD
    shape = (nb, dst_bs, num_heads, head_size) if dst_layout == "NHD" else (nb, num_heads, dst_bs, head_size)
    out = blocks.new_empty(*lead, *shape, dtype=dtype)
    out_nhd = out if dst_layout == "NHD" else out.transpose(-3, -2)  # written through, in dst layout
    if full:
        out_nhd.narrow(-4, 0, full).copy_(tokens.narrow(-3, 0, full * dst_bs).unflatten(-3, (full, dst_bs)))
    if rem:
        last = out_nhd.select(-4, full)
        last.narrow(-3, 0, rem).copy_(tokens.narrow(-3, full * dst_bs, rem))
        last.narrow(-3, rem, dst_bs - rem).zero_()
    return out


# ---- dtype --------------------------------------------------------------------------------------
def _scale_view(scales: torch.Tensor, ndim: int, h_axis: int) -> torch.Tensor:
    """``[L, 2, S]`` -> broadcastable against ``[L, 2, ...]`` with S on ``h_axis`` (negative)."""
    shape = [1] * ndim
    shape[0], shape[1] = scales.shape[0], scales.shape[1]
    shape[ndim + h_axis] = scales.shape[2]
    return scales.reshape(shape)


def fp8_scales(x: torch.Tensor, granularity: str, h_axis: int) -> torch.Tensor:
    """Dynamic scales ``amax / 448`` (1 where the amax is 0) of ``[L, 2, ...]``: ``[L, 2, 1 | H]``."""
    a = x.detach().abs().float()
    nd = x.dim()
    keep = {0, 1} | ({nd + h_axis} if granularity == "head" else set())
    dims = [d for d in range(nd) if d not in keep]
    amax = a.amax(dim=dims) if dims else a
    if granularity != "head":
        amax = amax.reshape(x.shape[0], x.shape[1], 1)
    else:
        amax = amax.reshape(x.shape[0], x.shape[1], x.shape[nd + h_axis])
    scale = amax / FP8_E4M3_MAX
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def quantize_fp8(x: torch.Tensor, scales: torch.Tensor, h_axis: int) -> torch.Tensor:
    s = _scale_view(scales.float(), x.dim(), h_axis)
    return (x.float() / s).clamp_(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def dequantize_fp8(q: torch.Tensor, scales: torch.Tensor, h_axis: int, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * _scale_view(scales.float(), q.dim(), h_axis)).to(dtype)


def cast_kv(
    x: torch.Tensor,
    src_dtype: str,
    dst_dtype: str,
    h_axis: int,
    src_scales: torch.Tensor | None = None,
    dst_scales: torch.Tensor | None = None,
    granularity: str = "tensor",
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cast ``[L, 2, ...]`` KV (heads on ``h_axis``, negative) from ``src_dtype`` to ``dst_dtype``.

    From fp8, ``src_scales`` dequantise. To fp8, ``dst_scales`` quantise, or dynamic scales of the given
    ``granularity`` are computed from the data. Returns the tensor and its scales (None unless fp8).
    fp8 -> fp8 with no ``dst_scales`` keeps the values and scales as they are.
    """
    src_fp8, dst_fp8 = src_dtype == "fp8_e4m3", dst_dtype == "fp8_e4m3"
    if src_fp8 and src_scales is None:
        raise ValueError("fp8 KV needs its scales to be converted")
    if src_fp8 and dst_fp8 and dst_scales is None:
        return x.clone(), src_scales.clone()  # type: ignore[union-attr]
    if src_fp8:
        wide = dequantize_fp8(x, src_scales, h_axis, torch.float32)  # type: ignore[arg-type]
    else:
        wide = x
    if dst_fp8:
        scales = fp8_scales(wide, granularity, h_axis) if dst_scales is None else dst_scales.float()
        return quantize_fp8(wide, scales, h_axis), scales
    return wide.to(TORCH_DTYPES[dst_dtype]), None


# ---- TP heads -----------------------------------------------------------------------------------
def reshard_heads(
    pieces: Sequence[tuple[int, torch.Tensor]], start: int, stop: int, h_axis: int
) -> torch.Tensor:
    """Global kv heads ``[start, stop)`` assembled from ``(head_start, tensor)`` shards (heads on ``h_axis``).

    Covers TP m -> n: joining shards (2 -> 1) and splitting one (1 -> 2) alike. Raises when a head is missing.
    """
    return _join_heads(pieces, start, stop, h_axis).clone()


def _join_heads(
    pieces: Sequence[tuple[int, torch.Tensor]], start: int, stop: int, h_axis: int, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """``reshard_heads`` without the defensive copy; with ``dtype``, the join also casts (one pass)."""
    parts = []
    covered = start
    for h0, t in sorted(pieces, key=lambda p: p[0]):
        h1 = h0 + t.shape[h_axis]
        lo, hi = max(h0, covered), min(h1, stop)
        if lo < hi:
            if lo > covered:
                break
            parts.append(t.narrow(h_axis, lo - h0, hi - lo))
            covered = hi
    if covered != stop:
        raise ValueError(f"kv heads [{covered}, {stop}) are in none of the shards")
    if dtype is None or (len(parts) == 1 and parts[0].dtype == dtype):
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=h_axis)
    shape = list(parts[0].shape)
    shape[h_axis] = stop - start
    out = torch.empty(shape, dtype=dtype, device=parts[0].device)
    offset = 0
    for t in parts:
        out.narrow(h_axis, offset, t.shape[h_axis]).copy_(t)
        offset += t.shape[h_axis]
    return out


# ---- composed -----------------------------------------------------------------------------------
def _per_head_scales(p: KVPayload) -> torch.Tensor:
    assert p.scales is not None
    return p.scales.float().expand(p.scales.shape[0], 2, p.num_heads).contiguous()


def convert(
    kv_src: KVPayload | Sequence[KVPayload],
    src: KVDescriptor,
    dst: KVDescriptor,
    num_tokens: int,
    heads: tuple[int, int] | None = None,
    dst_scales: torch.Tensor | None = None,
    consume: bool = False,
) -> KVPayload:
    """KV of one request's first ``num_tokens`` tokens from ``src``'s format into ``dst``'s.

    ``consume``: the source tensors are the caller's temporaries (writable, never used again): when nothing
    needs converting the result may be them (no copy), and padding may be zeroed in place.

    ``kv_src`` is one payload or the shards of several source TP ranks (all in ``src``'s format but for their
    heads). The result holds global heads ``heads`` (default: ``dst.head_range``). ``dst_scales``, for an fp8
    destination with fixed scales (``[L, 2, 1 | H]``); otherwise scales are computed from the data.
    Raises KVDescriptorMismatch (naming the field) when the formats cannot be converted.
    """
    check_compatible(src, dst)
    pieces = [kv_src] if isinstance(kv_src, KVPayload) else list(kv_src)
    if not pieces:
        raise ValueError("no KV to convert")
    for p in pieces:
        for f in ("dtype", "layout", "arrangement", "block_size"):
            if getattr(p.desc, f) != getattr(src, f):
                raise ValueError(f"payload {f} {getattr(p.desc, f)!r} is not the source's {getattr(src, f)!r}")
        if num_tokens > p.num_blocks * src.block_size:
            raise ValueError(f"{num_tokens} tokens but the payload holds {p.num_blocks} blocks of {src.block_size}")
    h0, h1 = dst.head_range if heads is None else heads
    src_fp8, dst_fp8 = src.dtype == "fp8_e4m3", dst.dtype == "fp8_e4m3"
    ha_src = head_axis(src.layout)
    # the heads the destination needs, per shard: (first global head, local offset, count)
    picks = [(p, max(p.head_start, h0), min(p.head_stop, h1)) for p in pieces]
    picks = [(p, lo, hi) for p, lo, hi in picks if lo < hi]
    if not dst_fp8:
        dst_scales = None
    elif dst_scales is not None:
        dst_scales = dst_scales.float().expand(dst.num_layers, 2, h1 - h0)
    scales_of = {id(p): _per_head_scales(p).narrow(2, lo - p.head_start, hi - lo) for p, lo, hi in picks} \
        if src_fp8 else {}

    def select(layers: slice) -> list[tuple[int, torch.Tensor, torch.Tensor | None]]:
        sel = []
        for p, lo, hi in picks:
            if p.desc.arrangement == "layer_major":
                (t,) = p.tensors[layers]
                x = t.unsqueeze(0)
            else:
                x = p.tensors[0].movedim(0, 2)
            sc = scales_of[id(p)][layers] if src_fp8 else None
            sel.append((lo, x.narrow(ha_src, lo - p.head_start, hi - lo), sc))
        return sel

    ds = dst_scales
    stacks = {id(p): stacked_view(p.tensors) for p, _, _ in picks} if src.arrangement == "layer_major" else {}
    if src.arrangement == "layer_major" and src.num_layers > 1 and all(v is not None for v in stacks.values()):
        # every shard's layers are views of one block: all layers in one pass (a few kernels, not a few per layer)
        sel = [(lo, stacks[id(p)].narrow(ha_src, lo - p.head_start, hi - lo),  # type: ignore[union-attr]
                scales_of[id(p)] if src_fp8 else None) for p, lo, hi in picks]
        x, scales, cur = _convert_stacked(sel, src, dst, h0, h1, num_tokens, ds, consume)
        tensors = LayerViews(x.contiguous()) if dst.arrangement == "layer_major" else unstacked(x, dst.arrangement)
    elif src.arrangement == "layer_major":
        # layer by layer: no [L, ...] stack to build, and each temporary is 1/L the size
        parts = [_convert_stacked(select(slice(i, i + 1)), src, dst, h0, h1, num_tokens,
                                  None if ds is None else ds[i : i + 1], consume) for i in range(src.num_layers)]
        cur = parts[0][2]
        scales = None if parts[0][1] is None else torch.cat([sc for _, sc, _ in parts if sc is not None])
        if dst.arrangement == "layer_major":
            tensors = [x[0].contiguous() for x, _, _ in parts]
        else:
            tensors = [torch.stack([x[0].movedim(1, 0) for x, _, _ in parts], dim=1)]  # [B, L, 2, ...]
    else:
        x, scales, cur = _convert_stacked(select(slice(None)), src, dst, h0, h1, num_tokens, ds, consume)
        tensors = unstacked(x, dst.arrangement)
    out_desc = dataclasses.replace(dst, dtype=cur)  # type: ignore[arg-type]
    return KVPayload(out_desc, num_tokens, tensors, h0, scales)


def _convert_stacked(
    sel: list[tuple[int, torch.Tensor, torch.Tensor | None]],
    src: KVDescriptor,
    dst: KVDescriptor,
    h0: int,
    h1: int,
    num_tokens: int,
    dst_scales: torch.Tensor | None,
    consume: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """Shards ``(first head, [l, 2, B, *block], per-head scales [l, 2, h] | None)`` -> heads ``[h0, h1)`` in
    ``dst``'s block size, layout and dtype, as ``[l, 2, B', *block']``, with scales (fp8) and the dtype."""
    src_fp8, dst_fp8 = src.dtype == "fp8_e4m3", dst.dtype == "fp8_e4m3"
    ha_src, ha_dst = head_axis(src.layout), head_axis(dst.layout)
    owned = consume  # does x belong to this function (may be modified in place)?

    # narrowing casts first (fp8 output always here: its scales must be known before shards join)
    cur = src.dtype
    narrowing = DTYPE_ITEMSIZE[dst.dtype] < DTYPE_ITEMSIZE[src.dtype] or (dst_fp8 and not src_fp8)
    if narrowing:
        shared = dst_scales
        if dst_fp8 and shared is None and dst.scale_granularity == "tensor":
            shared = torch.stack([fp8_scales(_wide(x, sc, ha_src), "tensor", ha_src) for _, x, sc in sel]).amax(0)
        cast = []
        for lo, x, sc in sel:
            d = shared
            if shared is not None and shared.shape[2] > 1:
                d = shared.narrow(2, lo - h0, x.shape[ha_src])
            y, ys = cast_kv(x, src.dtype, dst.dtype, ha_src, sc, d, "head")
            if ys is not None:
                ys = ys.expand(ys.shape[0], 2, y.shape[ha_src])
            cast.append((lo, y, ys))
        sel, cur, owned = cast, dst.dtype, True

    # a plain widening rides along with the first copy below (join or re-block) instead of a pass of its own
    fused = TORCH_DTYPES[dst.dtype] if cur != dst.dtype and "fp8_e4m3" not in (cur, dst.dtype) else None

    # join shards along heads
    x = _join_heads([(lo, t) for lo, t, _ in sel], h0, h1, ha_src, fused if len(sel) > 1 else None)
    owned = owned or len(sel) > 1
    scales = None
    if cur == "fp8_e4m3":
        scales = _join_heads([(lo, s) for lo, _, s in sel if s is not None], h0, h1, 2)

    # block size and layout in one copy (none when both match and x is ours)
    x = _rechunk(x, num_tokens, dst.block_size, src.layout, dst.layout, owned, fused)
    if fused is not None:
        cur = dst.dtype

    # widening (or same-width) casts last
    if cur != dst.dtype or (dst_fp8 and dst_scales is not None and not narrowing):
        x, scales = cast_kv(x, cur, dst.dtype, ha_dst, scales, dst_scales, "head")
        cur = dst.dtype

    # fp8 scale granularity of the destination
    if cur == "fp8_e4m3":
        assert scales is not None
        scales = scales.expand(scales.shape[0], 2, h1 - h0)
        if dst.scale_granularity == "tensor":
            common = scales.amax(dim=2, keepdim=True)
            if not torch.equal(scales, common.expand_as(scales)):
                x, _ = cast_kv(x, "fp8_e4m3", "fp8_e4m3", ha_dst, scales, common)
            scales = common
        scales = scales.contiguous()
    return x, scales, cur


def _wide(x: torch.Tensor, scales: torch.Tensor | None, h_axis: int) -> torch.Tensor:
    return x if scales is None else dequantize_fp8(x, scales, h_axis, torch.float32)
