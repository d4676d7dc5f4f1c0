"""What a KV cache looks like in memory, as plain data both sides of a transfer exchange when they connect.

A descriptor is torch-free so that the handshake, the coordinator and the scheduler side can reason about
conversions (and about bytes on the wire) without touching tensors. Shapes, for ``B`` blocks of ``block_size``
tokens, ``H`` kv heads held by this shard and head size ``D``:

- ``layer_major``: one tensor per layer, ``[2, B, *block]`` (the model runner's cache, index 0 = K, 1 = V)
- ``block_major``: one tensor ``[B, num_layers, 2, *block]`` (a whole block's KV is contiguous)

with ``block`` = ``[block_size, H, D]`` for ``NHD`` and ``[H, block_size, D]`` for ``HND``.

Tensor parallelism splits kv heads: with ``num_kv_heads >= tp_size`` rank ``r`` holds the ``r``-th equal slice;
with fewer heads than ranks, heads are replicated and rank ``r`` holds head ``r // (tp_size // num_kv_heads)``
(as vLLM does for GQA models at high TP).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from hetserve.core.errors import HetserveError, ValidationError

KVDtype = Literal["float32", "bfloat16", "float16", "fp8_e4m3"]
KVLayout = Literal["NHD", "HND"]
KVArrangement = Literal["layer_major", "block_major"]
ScaleGranularity = Literal["tensor", "head"]

KV_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16", "fp8_e4m3")
DTYPE_ITEMSIZE: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8_e4m3": 1}
# the largest finite float8 e4m3fn value: quantised values are clamped to +-this
FP8_E4M3_MAX = 448.0
SCALE_ITEMSIZE = 4  # fp8 scales travel as float32

# conversion names check_compatible reports, in the order convert() applies them on the narrowing side
CONVERSIONS: tuple[str, ...] = ("tp", "dtype", "block_size", "layout", "arrangement")


class KVDescriptorMismatch(HetserveError):
    """Two KV caches cannot exchange KV: ``field`` names the descriptor field that differs."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


@dataclass(frozen=True)
class KVDescriptor:
    """The in-memory format of one shard's KV cache (see the module docstring for shapes)."""

    num_layers: int
    num_kv_heads: int  # total over all TP shards
    head_dim: int
    block_size: int
    dtype: KVDtype = "bfloat16"
    layout: KVLayout = "NHD"
    arrangement: KVArrangement = "layer_major"
    tp_size: int = 1
    tp_rank: int = 0
    # fp8 only: one scale per (layer, K|V) tensor, or one per (layer, K|V, kv head)
    scale_granularity: ScaleGranularity = "tensor"
    # checkpoint identity (name or hash); two non-empty ids must match, "" matches only ""
    model_id: str = ""

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size", "tp_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValidationError(f"kv_descriptor.{name}", f"must be a positive integer, got {v!r}")
        if self.dtype not in KV_DTYPES:
            raise ValidationError("kv_descriptor.dtype", f"{self.dtype!r} is not one of {', '.join(KV_DTYPES)}")
        if self.layout not in ("NHD", "HND"):
            raise ValidationError("kv_descriptor.layout", f"must be NHD or HND, got {self.layout!r}")
        if self.arrangement not in ("layer_major", "block_major"):
            raise ValidationError(
                "kv_descriptor.arrangement", f"must be layer_major or block_major, got {self.arrangement!r}"
            )
        if self.scale_granularity not in ("tensor", "head"):
            raise ValidationError(
                "kv_descriptor.scale_granularity", f"must be tensor or head, got {self.scale_granularity!r}"
            )
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValidationError("kv_descriptor.tp_rank", f"must be in [0, {self.tp_size}), got {self.tp_rank}")
        h, t = self.num_kv_heads, self.tp_size
        if (h >= t and h % t) or (h < t and t % h):
            raise ValidationError(
                "kv_descriptor.tp_size", f"{t} ranks cannot share {h} kv heads (one must divide the other)"
            )

    # ---- heads ------------------------------------------------------------------------------
    def heads_of_rank(self, rank: int) -> tuple[int, int]:
        """Global kv head range ``[start, stop)`` that TP rank ``rank`` holds."""
        h, t = self.num_kv_heads, self.tp_size
        if h >= t:
            per = h // t
            return rank * per, (rank + 1) * per
        head = rank // (t // h)
        return head, head + 1

    @property
    def head_range(self) -> tuple[int, int]:
        return self.heads_of_rank(self.tp_rank)

    @property
    def num_local_heads(self) -> int:
        start, stop = self.head_range
        return stop - start

    def for_rank(self, rank: int) -> KVDescriptor:
        return dataclasses.replace(self, tp_rank=rank)

    # ---- sizes ------------------------------------------------------------------------------
    @property
    def itemsize(self) -> int:
        return DTYPE_ITEMSIZE[self.dtype]

    def block_shape(self, num_heads: int | None = None) -> tuple[int, int, int]:
        h = self.num_local_heads if num_heads is None else num_heads
        if self.layout == "NHD":
            return (self.block_size, h, self.head_dim)
        return (h, self.block_size, self.head_dim)

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def scale_bytes(self, num_heads: int | None = None) -> int:
        if self.dtype != "fp8_e4m3":
            return 0
        h = self.num_local_heads if num_heads is None else num_heads
        per = h if self.scale_granularity == "head" else 1
        return self.num_layers * 2 * per * SCALE_ITEMSIZE

    def payload_bytes(self, num_tokens: int, num_heads: int | None = None) -> int:
        """Bytes of ``num_tokens`` tokens' KV in this format: whole blocks (the last one padded) plus scales."""
        h = self.num_local_heads if num_heads is None else num_heads
        per_block = 2 * self.num_layers * self.block_size * h * self.head_dim * self.itemsize
        return self.num_blocks_for(num_tokens) * per_block + self.scale_bytes(h)


def _same(src: KVDescriptor, dst: KVDescriptor, name: str, what: str) -> None:
    a, b = getattr(src, name), getattr(dst, name)
    if a != b:
        raise KVDescriptorMismatch(name, f"{what} differ: sender has {a!r}, receiver has {b!r}; not convertible")


def check_compatible(src: KVDescriptor, dst: KVDescriptor) -> list[str]:
    """The conversions KV in ``src``'s format needs to land in ``dst``'s (names from ``CONVERSIONS``).

    Raises ``KVDescriptorMismatch`` naming the field when no conversion exists (another model, another
    number of layers, kv heads or head size). ``tp`` is listed when the two sides split heads differently
    (whatever the ranks), ``dtype`` also covers a change of fp8 scale granularity.
    """
    _same(src, dst, "model_id", "models")
    _same(src, dst, "num_layers", "numbers of layers")
    _same(src, dst, "num_kv_heads", "total kv heads")
    _same(src, dst, "head_dim", "head sizes")
    needed = []
    if src.tp_size != dst.tp_size:
        needed.append("tp")
    fp8_scales_differ = src.dtype == dst.dtype == "fp8_e4m3" and src.scale_granularity != dst.scale_granularity
    if src.dtype != dst.dtype or fp8_scales_differ:
        needed.append("dtype")
    if src.block_size != dst.block_size:
        needed.append("block_size")
    if src.layout != dst.layout:
        needed.append("layout")
    if src.arrangement != dst.arrangement:
        needed.append("arrangement")
    return needed


def head_transfers(src: KVDescriptor, dst: KVDescriptor) -> list[tuple[int, int, int, int]]:
    """Which source rank sends which heads to which destination rank: ``(src_rank, dst_rank, start, stop)``.

    Each destination rank's heads are covered exactly once; where heads are replicated on the source side,
    the lowest source rank holding a head sends it (so no head crosses the wire twice to one receiver).
    """
    check_compatible(src, dst)
    out = []
    for d in range(dst.tp_size):
        d0, d1 = dst.heads_of_rank(d)
        covered = d0
        for s in range(src.tp_size):
            s0, s1 = src.heads_of_rank(s)
            lo, hi = max(s0, covered), min(s1, d1)
            if lo < hi:
                out.append((s, d, lo, hi))
                covered = hi
        assert covered == d1, "every destination head has a source"
    return out


def narrower_dtype(src: KVDtype, dst: KVDtype) -> KVDtype:
    """The dtype KV should cross the wire in: the narrower of the two; at equal width, the receiver's."""
    return src if DTYPE_ITEMSIZE[src] < DTYPE_ITEMSIZE[dst] else dst


def wire_descriptor(src: KVDescriptor, dst: KVDescriptor) -> KVDescriptor:
    """The format a payload from ``src`` to ``dst`` travels in, to send the fewest bytes.

    The sender narrows (dtype), slices heads and re-blocks into the receiver's block size, layout and
    arrangement; the receiver only widens the dtype (if at all) and joins head slices from several senders.
    """
    check_compatible(src, dst)
    dtype = narrower_dtype(src.dtype, dst.dtype)
    gran = dst.scale_granularity
    if dtype == "fp8_e4m3" and src.dtype == "fp8_e4m3" and dst.dtype != "fp8_e4m3":
        gran = src.scale_granularity  # sent as stored, dequantised by the receiver
    return dataclasses.replace(dst, dtype=dtype, scale_granularity=gran)


def descriptor_to_dict(desc: KVDescriptor) -> dict[str, object]:
    return dataclasses.asdict(desc)


def descriptor_from_dict(data: dict[str, object]) -> KVDescriptor:
    names = {f.name for f in dataclasses.fields(KVDescriptor)}
    unknown = set(data) - names
    if unknown:
        raise ValidationError("kv_descriptor", f"unknown fields {sorted(unknown)}")
    return KVDescriptor(**data)  # type: ignore[arg-type]
