"""The worker side of KV transfer: copy a request's blocks out of the KV cache, convert, move them over a
transport before a deadline (optionally paced to a declared link), and write them into the receiver's blocks.

The scheduler side (which blocks, pins, deadlines, re-prefill on failure) lives in the engine's scheduler
(``release_remote`` / ``finish_remote_kv``); a coordinator hands both halves the same ``transfer_id``:

- sender (each TP rank of the source instance): ``engine.send(peer, peer_desc, transfer_id, ...)`` once per
  destination rank; it returns a ``TransferResult`` and never raises for transport faults. Its blocks may be
  released as soon as it returns (the KV was copied out first).
- receiver (each TP rank of the destination instance): ``engine.expect(transfer_id, ...)`` with the blocks
  the scheduler allocated (``KVLoad``), then ``engine.poll()`` in its loop: it returns a result per finished
  transfer (success: the KV is in the blocks; failure: deadline passed, nothing was written that counts,
  and KV arriving later for it is dropped), for ``finish_remote_kv(req_id, success)``.

The receiver's result is the one that decides the request's fate: a sender can see a failure (its deadline
passed while the acknowledgement was on its way) for KV that did land.

Pacing emulates a slower link: the bytes really move, and the receiver may use the KV only once ``latency +
bytes / bandwidth`` has passed since the send began. Between processes of one host (``shm``, ``local``: one
monotonic clock) the sender commits at once with ``not_before_s`` (that instant) and the receiver holds the KV
until then, so the commit's round trip overlaps the wait and the declared time is the only cost when the real
movement is faster. Elsewhere (``tcp``, ``nixl``: maybe another host) the commit goes out after the wait.
"""

from __future__ import annotations

import time
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from hetserve.core.devices import LinkSpec
from hetserve.core.errors import HetserveError
from hetserve.runtime.kv_blocks import gather, scatter
from hetserve.runtime.kv_convert import DTYPE_NAMES, TORCH_DTYPES, KVPayload, LayerViews, convert, stacked_view
from hetserve.runtime.kv_layout import KVDescriptor, check_compatible, head_transfers, wire_descriptor
from hetserve.runtime.messages import KVCommit, KVData, TensorMeta
from hetserve.runtime.transport.base import TransferTimeout, Transport, TransportError

KVCaches = Sequence[torch.Tensor] | torch.Tensor
# transports whose two ends share one host, and so one ``time.monotonic()`` clock (``not_before_s`` commits)
ONE_HOST_TRANSPORTS = ("shm", "local")


# ---- cache <-> payload ---------------------------------------------------------------------------
def _as_list(kv_caches: KVCaches) -> list[torch.Tensor]:
    if isinstance(kv_caches, torch.Tensor):
        return [kv_caches]
    return kv_caches if isinstance(kv_caches, LayerViews) else list(kv_caches)  # keeps what it remembers


def _bytes_view(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def extract_blocks(
    kv_caches: KVCaches,
    block_ids: Sequence[int],
    num_tokens: int,
    desc: KVDescriptor,
    kv_scales: torch.Tensor | None = None,
) -> KVPayload:
    """Copy the first ``num_tokens`` tokens' KV out of a cache into a contiguous payload (same format).

    ``kv_caches``: layer_major, ``num_layers`` tensors ``[2, num_blocks, *block]``; block_major, one tensor
    ``[num_blocks, num_layers, 2, *block]``. ``block_ids``: the request's block table (extra blocks ignored).
    ``kv_scales`` (fp8 caches): the cache's float32 scales ``[L, 2, 1 | H]``. Slots past the last token are
    zero in the payload, whatever the cache holds there.
    """
    if num_tokens < 1:
        raise ValueError(f"nothing to extract: num_tokens={num_tokens}")
    nb = desc.num_blocks_for(num_tokens)
    if nb > len(block_ids):
        raise ValueError(f"{num_tokens} tokens need {nb} blocks of {desc.block_size}, the table has {len(block_ids)}")
    caches = _as_list(kv_caches)
    ids = list(block_ids[:nb])
    tail = num_tokens - (nb - 1) * desc.block_size  # tokens in the last block
    slot_axis = -3 if desc.layout == "NHD" else -2
    if desc.arrangement == "layer_major":
        if len(caches) != desc.num_layers:
            raise ValueError(f"{len(caches)} layer tensors for {desc.num_layers} layers")
        whole = stacked_view(caches) if len(caches) > 1 else None
        if whole is not None:  # one cache block for all layers: one gather, one zeroing
            x = gather(whole, 2, ids)
            _bytes_view(x.select(2, nb - 1)).narrow(slot_axis, tail, desc.block_size - tail).zero_()
            out = LayerViews(x)
        else:
            out = [gather(c, 1, ids) for c in caches]
            for t in out:
                _bytes_view(t.select(1, nb - 1)).narrow(slot_axis, tail, desc.block_size - tail).zero_()
    else:
        out = [gather(caches[0], 0, ids)]
        _bytes_view(out[0][nb - 1]).narrow(slot_axis, tail, desc.block_size - tail).zero_()
    scales = None
    if desc.dtype == "fp8_e4m3":
        if kv_scales is None:
            raise ValueError("an fp8 cache needs its kv_scales to be extracted")
        scales = kv_scales.detach().float().cpu().clone()
    return KVPayload(desc, num_tokens, out, desc.head_range[0], scales)


def insert_blocks(kv_caches: KVCaches, block_ids: Sequence[int], payload: KVPayload, desc: KVDescriptor) -> None:
    """Write a payload (already in this cache's format and heads) into the request's blocks ``block_ids``.

    Whole blocks are written; slots past the last token get zeros (they are this request's own blocks and
    later tokens overwrite them). An fp8 payload must carry the cache's own scales (convert with
    ``dst_scales``); that is the caller's contract.
    """
    for f in ("dtype", "layout", "arrangement", "block_size", "num_layers", "num_kv_heads", "head_dim"):
        if getattr(payload.desc, f) != getattr(desc, f):
            raise ValueError(f"payload {f} {getattr(payload.desc, f)!r} is not the cache's {getattr(desc, f)!r}")
    if (payload.head_start, payload.head_stop) != desc.head_range:
        raise ValueError(f"payload holds heads [{payload.head_start}, {payload.head_stop}), "
                         f"this shard holds {list(desc.head_range)}")
    nb = payload.num_blocks
    if nb > len(block_ids):
        raise ValueError(f"payload has {nb} blocks, the table {len(block_ids)}")
    caches = _as_list(kv_caches)
    ids = list(block_ids[:nb])
    if desc.arrangement == "layer_major":
        whole = stacked_view(caches) if len(caches) > 1 else None
        src = stacked_view(payload.tensors) if whole is not None else None
        if whole is not None and src is not None and len(payload.tensors) == len(caches):
            scatter(_bytes_view(whole), 2, ids, _bytes_view(src.to(whole.device, non_blocking=True)))
            return
        for c, t in zip(caches, payload.tensors, strict=True):
            scatter(_bytes_view(c), 1, ids, _bytes_view(t.to(c.device, non_blocking=True)))
    else:
        c = caches[0]
        scatter(_bytes_view(c), 0, ids, _bytes_view(payload.tensors[0].to(c.device, non_blocking=True)))


# ---- payload <-> wire ----------------------------------------------------------------------------
def _meta(t: torch.Tensor) -> TensorMeta:
    return TensorMeta(dtype=DTYPE_NAMES.get(t.dtype, str(t.dtype).removeprefix("torch.")), shape=list(t.shape))


def _from_buffer(buf: object, meta: TensorMeta) -> torch.Tensor:
    dtype = TORCH_DTYPES.get(meta.dtype) or getattr(torch, meta.dtype)
    if isinstance(buf, torch.Tensor):
        return buf.view(dtype).view(meta.shape)
    mv = memoryview(buf)  # type: ignore[arg-type]
    if mv.nbytes == 0:
        return torch.empty(meta.shape, dtype=dtype)
    with warnings.catch_warnings():  # read-only wire buffers: converted or copied, never written
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(mv, dtype=torch.uint8)
    return flat.view(dtype).view(meta.shape)


def payload_buffers(payload: KVPayload, device_ok: bool = False) -> list[object]:
    """Raw buffers of a payload in wire order: tensors, then scales. CUDA tensors stay on the device only
    when the transport takes device tensors."""
    out: list[object] = []
    for t in [*payload.tensors, *([payload.scales] if payload.scales is not None else [])]:
        t = t.contiguous()
        out.append(t if (t.is_cuda and device_ok) else t.cpu().reshape(-1).view(torch.uint8).numpy())
    return out


def payload_from_message(msg: KVData, buffers: Sequence[object]) -> KVPayload:
    n = len(msg.tensors) + (msg.scales is not None)
    if len(buffers) != n:
        raise ValueError(f"{n} buffers announced, {len(buffers)} arrived")
    tensors = [_from_buffer(b, m) for b, m in zip(buffers, msg.tensors, strict=False)]
    scales = _from_buffer(buffers[-1], msg.scales) if msg.scales is not None else None
    p = KVPayload(msg.desc, msg.num_tokens, tensors, msg.head_start, scales)
    if p.num_heads != msg.num_heads:
        raise ValueError(f"{msg.num_heads} heads announced, the tensors hold {p.num_heads}")
    return p


# ---- pacing --------------------------------------------------------------------------------------
class LinkPacer:
    """Holds a transfer until the declared link would have delivered it (no link: no wait)."""

    def __init__(self, link: LinkSpec | None, spin_s: float = 5e-4) -> None:
        self.link = link
        self.spin_s = spin_s

    def duration_s(self, num_bytes: int) -> float:
        return 0.0 if self.link is None else self.link.transfer_time_s(num_bytes)

    def wait_until(self, t_s: float) -> None:
        # sleep most of the way, then spin the last fraction of a millisecond: sleep alone overshoots
        while True:
            left = t_s - time.monotonic()
            if left <= 0:
                return
            if left > self.spin_s:
                time.sleep(left - self.spin_s)


# ---- the engine ----------------------------------------------------------------------------------
@dataclass
class TransferResult:
    transfer_id: str
    req_id: str
    success: bool
    num_bytes: int = 0
    elapsed_s: float = 0.0  # the whole call (sender) / since expect() (receiver)
    convert_s: float = 0.0  # extract + convert (sender) / convert + insert (receiver)
    error: str | None = None
    link_s: float = 0.0  # sender: from the first byte handed to the transport to the end (paced wait included)

    @property
    def achieved_bytes_per_s(self) -> float:
        return self.num_bytes / self.link_s if self.link_s > 0 else 0.0


@dataclass
class _Incoming:
    req_id: str
    block_ids: list[int]
    num_tokens: int
    deadline_s: float
    need: dict[int, tuple[int, int]]  # src rank -> heads it sends
    start_s: float
    pieces: dict[int, KVPayload] = field(default_factory=dict)
    committed: set[int] = field(default_factory=set)
    num_bytes: int = 0
    ready_at: float = 0.0  # the latest commit's ``not_before_s``: the KV is not used before then

    @property
    def complete(self) -> bool:
        return self.committed == set(self.need)


class KVTransferEngine:
    """KV transfer for one TP shard of one instance: sends its heads, receives into its cache.

    ``desc`` describes the local cache; ``kv_scales`` its fp8 scales (fp8 caches only); ``link`` the declared
    link to pace sends to (None: as fast as the transport goes). ``orphan_ttl_s``: how long KV that arrives
    before its ``expect`` is kept. The transport should carry KV only: ``poll`` drops other messages.
    ``send`` may run in its own thread(s) while another thread calls
    ``expect`` / ``poll`` / ``cancel`` (those three from one thread, or under one lock).
    """

    def __init__(
        self,
        transport: Transport,
        desc: KVDescriptor,
        kv_caches: KVCaches,
        kv_scales: torch.Tensor | None = None,
        link: LinkSpec | None = None,
        orphan_ttl_s: float = 30.0,
    ) -> None:
        if desc.dtype == "fp8_e4m3" and kv_scales is None:
            raise ValueError("an fp8 KV cache needs kv_scales")
        self.transport = transport
        self.desc = desc
        self.kv_caches = kv_caches
        self.kv_scales = kv_scales
        self.pacer = LinkPacer(link)
        self.orphan_ttl_s = orphan_ttl_s
        self.clock = time.monotonic  # deadlines are time.monotonic() instants, as in the transports
        self._incoming: dict[str, _Incoming] = {}
        self._orphans: OrderedDict[str, list[tuple[float, object, list[object]]]] = OrderedDict()
        self._closed_ids: OrderedDict[str, None] = OrderedDict()
        self._done: list[TransferResult] = []  # finished inside expect(), reported by the next poll()
        self.num_dropped = 0

    # ---- sending --------------------------------------------------------------------------------
    def send(
        self,
        peer: str,
        peer_desc: KVDescriptor,
        transfer_id: str,
        req_id: str,
        block_ids: Sequence[int],
        num_tokens: int,
        deadline_s: float,
    ) -> TransferResult:
        """Send this shard's part of a request's KV to one destination rank (``peer_desc.tp_rank``).

        Raises KVDescriptorMismatch when the formats cannot be converted (a configuration error); transport
        faults and deadlines come back as a failed result, promptly, with nothing left queued.
        """
        t0 = self.clock()
        parts = [(lo, hi) for s, d, lo, hi in head_transfers(self.desc, peer_desc)
                 if s == self.desc.tp_rank and d == peer_desc.tp_rank]
        if not parts:
            return TransferResult(transfer_id, req_id, True)
        (lo, hi), = parts
        wire = wire_descriptor(self.desc, peer_desc)
        num_bytes = wire.payload_bytes(num_tokens, hi - lo)
        need_s = self.pacer.duration_s(num_bytes)
        if t0 + need_s > deadline_s:
            return TransferResult(transfer_id, req_id, False, 0, self.clock() - t0, 0.0,
                                  f"the link needs {need_s:.4f} s for {num_bytes} bytes; "
                                  f"the deadline is {deadline_s - t0:.4f} s away")
        src = extract_blocks(self.kv_caches, block_ids, num_tokens, self.desc, self.kv_scales)
        payload = convert(src, self.desc, wire, num_tokens, heads=(lo, hi))
        need_s = self.pacer.duration_s(payload.num_bytes)
        t_send = self.clock()
        if t_send + need_s > deadline_s:
            return TransferResult(transfer_id, req_id, False, 0, t_send - t0, t_send - t0,
                                  f"the link needs {need_s:.4f} s after conversion; the deadline is "
                                  f"{deadline_s - t_send:.4f} s away")
        msg = KVData(transfer_id=transfer_id, req_id=req_id, src_rank=self.desc.tp_rank, num_tokens=num_tokens,
                     head_start=lo, num_heads=hi - lo, desc=wire, tensors=[_meta(t) for t in payload.tensors],
                     scales=None if payload.scales is None else _meta(payload.scales),
                     final=self.pacer.link is None)
        buffers = payload_buffers(payload, self.transport.accepts_device_tensors)
        try:
            self.transport.send(peer, msg, buffers, deadline_s)
            if self.pacer.link is not None:
                ready_s = t_send + need_s
                commit = KVCommit(transfer_id=transfer_id, req_id=req_id, src_rank=self.desc.tp_rank)
                if self.transport.name in ONE_HOST_TRANSPORTS:
                    # the receiver holds the KV until ``ready_s`` itself: the commit's round trip (and, with a send
                    # window, the data's acknowledgement) overlaps the wait
                    commit.not_before_s = ready_s
                    self.transport.send(peer, commit, [], deadline_s)
                    self.pacer.wait_until(ready_s)
                else:  # another host's clock: never early, the commit goes out once the declared time has passed
                    self.pacer.wait_until(ready_s)
                    self.transport.send(peer, commit, [], deadline_s)
            self.transport.flush(peer, deadline_s)  # delivered: every acknowledgement is in
        except TransportError as e:
            t1 = self.clock()
            return TransferResult(transfer_id, req_id, False, payload.num_bytes, t1 - t0, t_send - t0,
                                  f"{type(e).__name__}: {e}", t1 - t_send)
        t1 = self.clock()
        return TransferResult(transfer_id, req_id, True, payload.num_bytes, t1 - t0, t_send - t0, None, t1 - t_send)

    # ---- receiving ------------------------------------------------------------------------------
    def expect(
        self,
        transfer_id: str,
        req_id: str,
        block_ids: Sequence[int],
        num_tokens: int,
        src_desc: KVDescriptor,
        deadline_s: float,
    ) -> None:
        """KV for ``req_id`` will arrive from the instance described by ``src_desc`` (any of its ranks) into
        ``block_ids`` (a ``KVLoad``'s blocks). Raises KVDescriptorMismatch when it could not be converted."""
        if transfer_id in self._incoming:
            raise ValueError(f"transfer {transfer_id!r} is already expected")
        need = {s: (lo, hi) for s, d, lo, hi in head_transfers(src_desc, self.desc) if d == self.desc.tp_rank}
        inc = _Incoming(req_id, list(block_ids), num_tokens, deadline_s, need, self.clock())
        self._incoming[transfer_id] = inc
        self._closed_ids.pop(transfer_id, None)
        for _, header, buffers in self._orphans.pop(transfer_id, []):
            if transfer_id not in self._incoming:
                break
            done = self._take(transfer_id, header, buffers)
            if done is not None:
                self._done.append(done)

    def cancel(self, transfer_id: str) -> bool:
        """Stop waiting (the request was aborted); KV arriving for it later is dropped."""
        found = self._incoming.pop(transfer_id, None) is not None
        self._close(transfer_id)
        return found

    @property
    def num_expected(self) -> int:
        return len(self._incoming)

    def poll(self, timeout_s: float = 0.0) -> list[TransferResult]:
        """Take what arrived (waiting up to ``timeout_s`` for the first message, or less when a committed transfer
        becomes usable sooner), finish complete transfers whose KV may be used by now and fail expired ones.
        Returns one result per transfer that ended."""
        results, self._done = self._done, []
        wait = 0.0 if results else timeout_s
        held = [inc.ready_at for inc in self._incoming.values() if inc.complete]
        if held:
            wait = max(0.0, min(wait, min(held) - self.clock()))
        while True:
            try:
                header, buffers = self.transport.recv(wait)
            except TransferTimeout:
                break
            wait = 0.0
            tid = getattr(header, "transfer_id", None)
            if not isinstance(header, (KVData, KVCommit)) or tid is None:
                self.num_dropped += 1
                continue
            if tid in self._incoming:
                done = self._take(tid, header, buffers)
                if done is not None:
                    results.append(done)
            elif tid in self._closed_ids:
                self.num_dropped += 1
            else:
                self._orphans.setdefault(tid, []).append((self.clock(), header, buffers))
        now = self.clock()
        for tid, inc in list(self._incoming.items()):
            if inc.complete and inc.ready_at <= now + self.pacer.spin_s:  # (``_take`` failed any past the deadline)
                self.pacer.wait_until(inc.ready_at)  # the last fraction of a millisecond: never early
                results.append(self._finish(tid))
            elif now > inc.deadline_s:
                del self._incoming[tid]
                self._close(tid)
                missing = sorted(set(inc.need) - inc.committed)
                results.append(TransferResult(tid, inc.req_id, False, inc.num_bytes, now - inc.start_s, 0.0,
                                              f"deadline passed waiting for source ranks {missing}"))
        for tid in list(self._orphans):
            entries = self._orphans[tid]
            if now - entries[0][0] <= self.orphan_ttl_s:
                break
            del self._orphans[tid]
            self.num_dropped += len(entries)
        return results

    def _close(self, transfer_id: str) -> None:
        self._orphans.pop(transfer_id, None)
        self._closed_ids[transfer_id] = None
        while len(self._closed_ids) > 4096:
            self._closed_ids.popitem(last=False)

    def _take(self, tid: str, header: object, buffers: list[object]) -> TransferResult | None:
        """Keep a piece or a commit; the transfer's result once it is complete and its KV may be used now."""
        inc = self._incoming[tid]
        try:
            if isinstance(header, KVData):
                if header.src_rank not in inc.need:
                    raise ValueError(f"source rank {header.src_rank} was not expected to send")
                check_compatible(header.desc, self.desc)
                piece = payload_from_message(header, buffers)
                inc.pieces[header.src_rank] = piece
                inc.num_bytes += piece.num_bytes
                if header.final:
                    inc.committed.add(header.src_rank)
            elif isinstance(header, KVCommit) and header.src_rank in inc.pieces:
                inc.committed.add(header.src_rank)
                inc.ready_at = max(inc.ready_at, header.not_before_s)
        except (ValueError, TypeError, RuntimeError, HetserveError) as e:
            return self._fail(tid, e)
        if not inc.complete:
            return None
        if inc.ready_at > inc.deadline_s:  # the declared link would deliver it too late: it never counts
            return self._fail(tid, TransferTimeout(f"the KV may be used only {inc.ready_at - inc.deadline_s:.4f} s "
                                                   "after the deadline"))
        if inc.ready_at > self.clock():  # held until the declared link would have delivered it (``poll``)
            return None
        return self._finish(tid)

    def _finish(self, tid: str) -> TransferResult:
        inc = self._incoming[tid]
        try:
            t = self.clock()
            pieces = [inc.pieces[s] for s in sorted(inc.need)]
            kv = convert(pieces, pieces[0].desc, self.desc, inc.num_tokens, dst_scales=self.kv_scales)
            insert_blocks(self.kv_caches, inc.block_ids, kv, self.desc)
            conv_s = self.clock() - t
        except (ValueError, TypeError, RuntimeError, HetserveError) as e:
            return self._fail(tid, e)
        del self._incoming[tid]
        self._close(tid)
        return TransferResult(tid, inc.req_id, True, inc.num_bytes, self.clock() - inc.start_s, conv_s)

    def _fail(self, tid: str, e: Exception) -> TransferResult:
        # a malformed or mismatched message fails this transfer, not the worker
        inc = self._incoming.pop(tid)
        self._close(tid)
        return TransferResult(tid, inc.req_id, False, inc.num_bytes, self.clock() - inc.start_s, 0.0,
                              f"{type(e).__name__}: {e}")
