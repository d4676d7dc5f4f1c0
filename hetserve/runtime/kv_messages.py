"""The coordinator <-> worker commands of direct KV hand-offs (``kv_direct.py``, ``kv_handoff.py``); part of
``worker.py``'s ``Command`` / ``Reply`` unions (tagged by ``type``, like every worker message)."""

from __future__ import annotations

import msgspec

from hetserve.runtime.kv_layout import KVDescriptor


class _Cmd(msgspec.Struct, tag_field="type"):
    seq: int


class KVTarget(msgspec.Struct):
    """A receiving worker of a direct hand-off: where it listens and which layers it holds."""

    kind: str
    address: str
    layer_start: int
    layer_end: int


class SendKV(_Cmd, tag="send_kv"):
    """Direct hand-off, sender side: extract this worker's share (converted to ``wire``) and send each target
    the layers it holds; pace to the declared link (``link_bandwidth`` bytes/s, 0: unpaced)."""

    transfer_id: str
    block_ids: list[int]
    num_tokens: int
    wire: KVDescriptor
    src_rank: int
    targets: list[KVTarget]
    timeout_s: float
    link_bandwidth: float = 0.0
    link_latency_s: float = 0.0
    token_start: int = 0  # send tokens [token_start, num_tokens) only (on a block boundary of both sides)
    # send during the next step: each layer's KV as soon as that layer wrote it (layer hooks, kv_direct.py)
    layerwise: bool = False


class ExpectKV(_Cmd, tag="expect_kv"):
    """Direct hand-off, receiver side: KV for ``req_id`` comes from the sender workers ``sources`` into
    ``block_ids`` within ``timeout_s``; answered by ``KVIn`` when it is in (or failed)."""

    transfer_id: str
    req_id: str
    block_ids: list[int]
    num_tokens: int
    wire: KVDescriptor
    sources: list[int]
    timeout_s: float


class CancelKV(_Cmd, tag="cancel_kv"):
    """Stop waiting for ``transfer_id``: nothing of it may be written from now on (no reply)."""

    transfer_id: str


class _KVDone(_Cmd):
    """What both ends of a hand-off answer when their part is over."""

    transfer_id: str
    ok: bool
    error: str = ""
    num_bytes: int = 0
    convert_s: float = 0.0  # sender: extract + convert; receiver: convert + insert
    wall_s: float = 0.0
    stages: dict[str, float] = {}  # host seconds per stage of ``convert_s`` and the sending


class KVSent(_KVDone, tag="kv_sent"):
    """A direct hand-off's sender worker is done: bytes sent, extract + convert seconds, seconds from the first
    byte to the commit (paced wait included) and what the declared link needs for those bytes. ``stages``:
    extract, convert, pack (command order), wait_ready, transport (the sender thread)."""

    declared_s: float = 0.0
    hooked_layers: int = 0  # layers sent from inside a step (layer-wise streaming)
    t0_mono: float = 0.0  # the first byte's ``time.monotonic()`` (one host: comparable with KVIn.ready_mono)


class KVIn(_KVDone, tag="kv_in"):
    """A receiver worker's KV is in its blocks (or failed): the relay path (``InsertKV``) and direct hand-offs
    (bytes received, convert + insert seconds, seconds since ``ExpectKV``; ``stages``: insert, sync)."""

    ready_mono: float = 0.0  # when every sender's KV was usable (``time.monotonic()``), before the insert


__all__ = ["CancelKV", "ExpectKV", "KVIn", "KVSent", "KVTarget", "SendKV"]
