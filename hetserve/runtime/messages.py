"""Typed control messages and the ONE encode / decode pair every socket in the runtime uses.

Messages are msgspec Structs tagged by a ``type`` field and serialised as MessagePack: no pickle anywhere
(a pickled object handed to ``decode`` is rejected, never executed). A header may also be a plain dict of
builtins (str, int, float, bool, None, bytes, lists, dicts); a dict whose ``type`` names a message here
comes back as that message, so ``type`` is reserved.

To add a message: define a Struct with ``tag="..."`` below and add it to ``Message``.
"""

from __future__ import annotations

from typing import Any, Union

import msgspec

from hetserve.core.errors import HetserveError
from hetserve.runtime.kv_layout import KVDescriptor


class MessageDecodeError(HetserveError):
    """Bytes that are not a valid message (malformed MessagePack, wrong fields, or not MessagePack at all)."""


class _Msg(msgspec.Struct, tag_field="type", forbid_unknown_fields=True):
    pass


class TensorMeta(msgspec.Struct, forbid_unknown_fields=True):
    """One raw buffer of a payload: a C-contiguous tensor's dtype (torch name without ``torch.``) and shape."""

    dtype: str
    shape: list[int]


class KVHello(_Msg, tag="kv_hello"):
    """Sent when two instances' workers connect: who is where, and the format of its KV cache."""

    instance: str
    rank: int
    address: str
    desc: KVDescriptor


class KVData(_Msg, tag="kv_data"):
    """One sender shard's slice of a request's KV; the buffers follow as raw frames, in ``tensors`` order,
    then the fp8 scales (float32) when ``scales`` is set.

    ``desc`` is the wire format (see ``kv_layout.wire_descriptor``); the payload holds global kv heads
    ``[head_start, head_start + num_heads)``. ``final`` is false when a ``KVCommit`` follows (paced links:
    the receiver must not use the KV before the emulated link would have delivered it)."""

    transfer_id: str
    req_id: str
    src_rank: int
    num_tokens: int
    head_start: int
    num_heads: int
    desc: KVDescriptor
    tensors: list[TensorMeta]
    scales: TensorMeta | None = None
    final: bool = True


class KVCommit(_Msg, tag="kv_commit"):
    """The KV of ``(transfer_id, src_rank)`` sent earlier may be used now, or from ``not_before_s`` (the
    sender's ``time.monotonic()``; set only between processes of one host, where that clock is shared)."""

    transfer_id: str
    req_id: str
    src_rank: int
    not_before_s: float = 0.0


class KVPiece(_Msg, tag="kv_piece"):
    """A worker-to-worker KV hand-off piece (``kv_direct.py``): one sender worker's layers from ``layer_start``
    (one raw buffer per layer, shapes in ``shapes``, dtype ``desc.dtype``), global kv heads from ``head_start``,
    for the tokens ``[token_start, num_tokens)`` in ``desc``'s (the wire) format. ``final`` is false when a
    ``KVCommit`` follows (paced links). ``src_rank``: the sender worker's index in its instance."""

    transfer_id: str
    src_rank: int
    layer_start: int
    head_start: int
    num_tokens: int
    desc: KVDescriptor
    shapes: list[list[int]]
    token_start: int = 0
    final: bool = True
    not_before_s: float = 0.0  # a final piece on one host: usable from this ``time.monotonic()`` (a paced link)


class KVBatch(_Msg, tag="kv_batch"):
    """Several one-piece hand-offs from one sender worker in ONE message (``kv_batch.py``): ``parts`` are their
    pieces, all in one wire format, and the one raw buffer holds them as one tensor ``[layers, 2, sum of
    blocks, *block]``: part ``i`` is blocks ``[offsets[i], offsets[i] + blocks[i])`` of it."""

    parts: list[KVPiece]
    offsets: list[int]
    blocks: list[int]


class Envelope(_Msg, tag="envelope"):
    """Transport-level framing: a message id the receiver acknowledges, and where the buffers live
    (``inline`` frames, an ``shm`` segment, or a ``nixl`` region; CUDA IPC handles per buffer in ``handles``)."""

    msg_id: int
    sender: str
    num_buffers: int
    kind: str = "inline"
    # shm: one segment holding every buffer back to back; (offset, size) per buffer
    segment: str = ""
    spans: list[tuple[int, int]] = []
    # shm: per buffer, None (bytes inline / in the segment) or a CUDA IPC handle; nixl: the staging region
    handles: list[dict[str, Any] | None] = []


class Ack(_Msg, tag="ack"):
    """The whole message ``msg_id`` is in the receiver's memory (``ok``), or it was refused (``error``)."""

    msg_id: int
    ok: bool = True
    error: str = ""


Message = Union[KVHello, KVData, KVPiece, KVBatch, KVCommit, Envelope, Ack]  # noqa: UP007 - msgspec needs a Union
_TAGS = frozenset(cls.__struct_config__.tag for cls in (KVHello, KVData, KVPiece, KVBatch, KVCommit, Envelope, Ack))

_encoder = msgspec.msgpack.Encoder()
_raw_decoder = msgspec.msgpack.Decoder()


def encode(msg: msgspec.Struct | dict[str, Any]) -> bytes:
    """The one serialiser of the runtime: a Message or a dict of builtins -> MessagePack bytes."""
    if not isinstance(msg, (msgspec.Struct, dict)):
        raise TypeError(f"can only encode a message Struct or a dict, got {type(msg).__name__}")
    return _encoder.encode(msg)


def decode(data: bytes | memoryview) -> Message | dict[str, Any]:
    """The inverse of ``encode``. Raises MessageDecodeError for anything else (a pickle included)."""
    try:
        raw = _raw_decoder.decode(data)
    except msgspec.DecodeError as e:
        raise MessageDecodeError(f"not a MessagePack message: {e}") from None
    if not isinstance(raw, dict):
        raise MessageDecodeError(f"a message is a map, got {type(raw).__name__}")
    if raw.get("type") in _TAGS:
        try:
            return msgspec.convert(raw, Message)  # type: ignore[arg-type]
        except (msgspec.ValidationError, ValueError) as e:
            raise MessageDecodeError(f"invalid {raw['type']} message: {e}") from None
    return raw
