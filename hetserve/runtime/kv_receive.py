"""The receiving half of a worker's direct KV hand-offs (``kv_direct.DirectKV`` is the whole).

``ExpectKV``: which sender workers will send, the blocks, a timeout. Pieces come over the worker's endpoints:

- A whole hand-off in one piece (one sender, every token, nothing streamed before it) is written into the cache
  by the endpoint's receiving thread as it arrives (``_sink``): from buffers the transport lends (over CUDA IPC,
  views of the sender's staging), before the acknowledgement, under the books' lock. On a paced link that
  write overlaps the link's wait.
- Anything else (Cronus' streamed pieces, several senders) is queued; the worker loop polls the endpoints between
  commands, and once every expected sender committed, the shards are joined, converted to the local cache
  (``shard.insert_kv``) and written.

Either way the worker answers ``KVIn`` (with its conversion time) once the declared link's time has passed; past
the timeout it answers ``KVIn(ok=False)``. ``CancelKV`` drops the expectation (the coordinator gave up): it waits
for a write in progress, and pieces arriving later are dropped, so a reused block is never overwritten. Pieces
that arrive before their ``ExpectKV`` (the receiver was busy in a step) are kept for ``orphan_ttl_s``.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from hetserve.engine.kv_views import LayerViews
from hetserve.runtime import kv_batch
from hetserve.runtime.kv_convert import TORCH_DTYPES
from hetserve.runtime.kv_messages import ExpectKV, KVIn
from hetserve.runtime.messages import KVBatch, KVCommit, KVPiece
from hetserve.runtime.transport import TransferTimeout, Transport

if TYPE_CHECKING:
    from hetserve.engine.runner import ModelRunner
    from hetserve.runtime.kv_layout import KVDescriptor


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass
class _Expect:
    req_id: str
    block_ids: list[int]
    num_tokens: int
    sources: set[int]
    deadline_s: float
    start_s: float
    seq: int
    wire: Any
    # committed pieces in arrival order: (token_start, num_tokens, src, shard)
    ready_at: float = 0.0  # the latest ``not_before_s`` of a commit (a paced link on one host)
    error: str = ""  # a malformed piece: the transfer fails
    shards: list[tuple[int, int, int, Any]] = field(default_factory=list)
    committed: set[int] = field(default_factory=set)  # sources whose last piece (all tokens) is committed
    pending: dict[int, list[tuple[int, int, int, Any]]] = field(default_factory=dict)  # src -> not committed
    num_bytes: int = 0
    taken_s: float = 0.0  # when the last commit was taken off the endpoint (monotonic)
    inserted: dict[str, float] = field(default_factory=dict)  # written into the cache on arrival (``_sink``)
    marks: dict[str, float] = field(default_factory=dict)  # the endpoint's marks for that message (diagnostics)


class KVReceiver:
    """The receiving books of a worker's endpoints; ``DirectKV`` adds the sending half."""

    runner: ModelRunner
    desc: KVDescriptor
    endpoints: dict[str, Transport]

    def _init_receiving(self, sink: bool, orphan_ttl_s: float) -> None:
        self.orphan_ttl_s = orphan_ttl_s
        self.expects: dict[str, _Expect] = {}
        self._orphans: OrderedDict[str, list[tuple[float, Any, list[Any]]]] = OrderedDict()
        self._closed: OrderedDict[str, None] = OrderedDict()
        # the books are shared with the endpoints' threads, which write a whole hand-off as it arrives
        # (``_sink``); one lock around every change to them
        self._lock = threading.RLock()
        self._sink_stream: Any = None
        self.sunk = 0  # hand-offs written into the cache on arrival by ``_sink``
        # ``sink``: False where the cache may be swapped under the endpoints' threads (a Hetis main re-dispatching
        # heads); HETSERVE_KV_SINK=0 turns it off everywhere (the ordinary path, for comparison)
        if sink and os.environ.get("HETSERVE_KV_SINK", "1") != "0":
            for ep in self.endpoints.values():
                if hasattr(ep, "sink"):
                    ep.sink = self._sink

    @property
    def busy(self) -> bool:
        """Anything to poll for (an expected transfer, or pieces waiting for their ``ExpectKV``)?"""
        return bool(self.expects or self._orphans)

    def expect(self, cmd: ExpectKV) -> None:
        with self._lock:
            self._expect(cmd)

    def _expect(self, cmd: ExpectKV) -> None:
        if cmd.transfer_id in self.expects:
            raise ValueError(f"transfer {cmd.transfer_id!r} is already expected")
        now = time.monotonic()
        self.expects[cmd.transfer_id] = _Expect(cmd.req_id, list(cmd.block_ids), cmd.num_tokens, set(cmd.sources),
                                                now + cmd.timeout_s, now, cmd.seq, cmd.wire)
        self._closed.pop(cmd.transfer_id, None)
        for _, header, bufs in self._orphans.pop(cmd.transfer_id, []):
            self._take(header, bufs)

    def cancel(self, transfer_id: str) -> None:
        with self._lock:  # waits for an insert in progress on an endpoint's thread: nothing lands later
            self.expects.pop(transfer_id, None)
            self._close(transfer_id)

    def _close(self, transfer_id: str) -> None:
        self._orphans.pop(transfer_id, None)
        self._closed[transfer_id] = None
        while len(self._closed) > 4096:
            self._closed.popitem(last=False)

    def poll(self, timeout_s: float = 0.0) -> list[KVIn]:
        """Take what arrived on every endpoint; the transfers that ended (done or past their timeout)."""
        now = time.monotonic()
        # a hand-off whose bytes are all here but whose paced link is not through yet: wake up when it is
        due = [e.ready_at - now for e in self.expects.values() if e.committed >= e.sources and e.ready_at > now]
        if due:
            timeout_s = min(timeout_s, max(0.0, min(due)))
        for ep in self.endpoints.values():
            wait = timeout_s if len(self.endpoints) == 1 else min(timeout_s, 0.001)
            while True:
                try:
                    header, bufs = ep.recv(wait)
                except TransferTimeout:
                    break
                wait = 0.0
                if isinstance(header, KVBatch):  # parts not all written on arrival: each goes on its own
                    try:
                        messages = kv_batch.split(header, bufs[0])
                    except Exception:  # noqa: BLE001 - a malformed batch fails its parts, not the worker
                        with self._lock:
                            for part in header.parts:
                                if part.transfer_id in self.expects:
                                    self.expects[part.transfer_id].error = "a malformed KV batch"
                        continue
                else:
                    messages = [(header, bufs)]
                for header, bufs in messages:
                    tid = getattr(header, "transfer_id", None)
                    if not isinstance(header, (KVPiece, KVCommit)) or tid is None:
                        continue  # (a consumed hand-off's wake-up, {"sunk": True}, lands here)
                    with self._lock:
                        if tid in self._closed:
                            continue
                        if tid in self.expects:
                            self._take(header, bufs, getattr(ep, "recv_marks", None))
                        else:
                            self._orphans.setdefault(tid, []).append((time.monotonic(), header, bufs))
        with self._lock:
            return self._ended()

    def _ended(self) -> list[KVIn]:
        done: list[KVIn] = []
        now = time.monotonic()
        for tid, e in list(self.expects.items()):
            if e.error:
                del self.expects[tid]
                self._close(tid)
                done.append(KVIn(seq=e.seq, transfer_id=tid, ok=False, num_bytes=e.num_bytes, error=e.error))
            elif e.committed >= e.sources and now >= e.ready_at:
                done.append(self._finish(tid, e))
            elif now > e.deadline_s:
                del self.expects[tid]
                self._close(tid)
                done.append(KVIn(seq=e.seq, transfer_id=tid, ok=False, num_bytes=e.num_bytes,
                                 error=f"deadline passed waiting for sender workers "
                                       f"{sorted(e.sources - e.committed)}"))
        for tid in list(self._orphans):
            if now - self._orphans[tid][0][0] <= self.orphan_ttl_s:
                break
            del self._orphans[tid]
        return done

    @staticmethod
    def _shard(header: KVPiece, bufs: list[Any], e: _Expect) -> Any:
        """The piece's layers as a ``KVShard`` over ``bufs`` (no copy); None (and ``e.error``) if malformed."""
        from hetserve.runtime.worker import KVShard

        # valid while held (transport contract); copied on insert. CUDA tensors (CUDA IPC) stay tensors
        data = [b if isinstance(b, torch.Tensor) else memoryview(b).cast("B") for b in bufs]
        e.num_bytes += sum(b.nbytes for b in data)
        if len(data) == 1 and len(header.shapes) > 1:  # packed: the layers back to back in one buffer
            item = torch.empty(0, dtype=TORCH_DTYPES[header.desc.dtype]).element_size()
            sizes = [item * _numel(sh) for sh in header.shapes]
            if sum(sizes) != data[0].nbytes:  # fail the transfer, not the worker
                e.error = f"a packed piece of {data[0].nbytes} bytes for layers of {sum(sizes)} bytes"
                return None
            from hetserve.runtime.shard import _read_only_tensor

            flat = _read_only_tensor(data[0])  # views of one tensor: the insert moves all layers at once
            if all(n == sizes[0] for n in sizes):  # rows of one [layers, bytes] tensor, which it remembers
                data = LayerViews(flat.view(len(sizes), sizes[0]))
            else:
                offs = [sum(sizes[:i]) for i in range(len(sizes))]
                data = [flat.narrow(0, a, n) for a, n in zip(offs, sizes, strict=True)]
        return KVShard(layer_start=header.layer_start, head_start=header.head_start, shapes=header.shapes,
                       buffers=data)

    def _sink(self, header: Any, bufs: list[Any], arrived_s: float) -> bool:
        """On an endpoint's thread, with buffers borrowed from the transport: a whole hand-off in one piece
        (one sender, all tokens, nothing else pending) is converted into the cache at once, before the
        acknowledgement (no copy out of the sender's staging, no hand-over to the worker's thread). True: done
        (or failed, in ``e.error``); False: the ordinary way (queued for ``poll``)."""
        if isinstance(header, KVBatch):
            return self._sink_batch(header, bufs, arrived_s)
        if not isinstance(header, KVPiece) or not header.final or header.token_start != 0:
            return False
        with self._lock:
            locked = time.monotonic()
            e = self._sinkable(header)
            if e is None:
                return False
            sh = self._shard(header, bufs, e)
            if sh is not None:  # (else malformed: ``e.error`` says why)
                self._write_on_arrival([header], [e], lambda: self._insert_shard(e, header, sh), arrived_s, locked)
        return True

    def _write_on_arrival(self, parts: list[KVPiece], es: list[_Expect], write: Any, arrived_s: float,
                          locked: float) -> None:
        """``write()`` the hand-offs ``parts`` (expectations ``es``) into the cache on the sink's stream, wait for
        it (the buffers are borrowed until the acknowledgement), and book them as written on arrival. Under the
        books' lock; a failure fails them, not the worker."""
        t0 = time.perf_counter()
        cuda = self.runner.device.type == "cuda"
        if cuda and self._sink_stream is None:
            self._sink_stream = torch.cuda.Stream(device=self.runner.device)
        try:
            with torch.cuda.stream(self._sink_stream) if cuda else contextlib.nullcontext():
                write()
            t1, inserted = time.perf_counter(), time.monotonic()
            if cuda:
                self._sink_stream.synchronize()
        except Exception as ex:  # noqa: BLE001 - a malformed transfer fails, not the worker
            for e in es:
                e.error = f"{type(ex).__name__}: {ex}"
            return
        n = len(es)
        for p, e in zip(parts, es, strict=True):
            e.inserted = {"insert": (t1 - t0) / n, "sync": (time.perf_counter() - t1) / n, "at_taken": arrived_s,
                          "at_locked": locked, "at_inserted": inserted, "at_synced": time.monotonic(),
                          "at_rx": arrived_s, "batch": float(n)}
            e.taken_s = arrived_s
            e.ready_at = max(e.ready_at, p.not_before_s)
            e.committed.add(p.src_rank)
            self.sunk += 1

    def _sinkable(self, header: KVPiece) -> _Expect | None:
        """The expectation a whole one-piece hand-off completes, if it may be written on arrival."""
        e = self.expects.get(header.transfer_id)
        if (e is None or e.error or e.inserted or len(e.sources) != 1 or header.src_rank not in e.sources
                or e.shards or e.pending or header.num_tokens != e.num_tokens or not header.final
                or header.token_start != 0):
            return None
        return e

    def _sink_batch(self, header: KVBatch, bufs: list[Any], arrived_s: float) -> bool:
        """Every part of a batch written on arrival (one pass when the formats allow: ``kv_batch.insert_batch``),
        or none: then the batch is queued and ``poll`` splits it."""
        with self._lock:
            locked = time.monotonic()
            es = [self._sinkable(p) for p in header.parts]
            if len(bufs) != 1 or any(e is None for e in es) or len({p.transfer_id for p in header.parts}) != len(es):
                return False
            ok = [e for e in es if e is not None]

            def write() -> None:
                if kv_batch.insert_batch(self.runner.kv_caches, self.desc, self.runner.parallel.layer_start,
                                         header, bufs[0], [e.block_ids for e in ok]):
                    b0 = bufs[0]
                    total = b0.numel() * b0.element_size() if isinstance(b0, torch.Tensor) else memoryview(b0).nbytes
                    for e, nb in zip(ok, header.blocks, strict=True):
                        e.num_bytes += total * nb // sum(header.blocks)
                    return
                for (p, b), e in zip(kv_batch.split(header, bufs[0]), ok, strict=True):
                    sh = self._shard(p, b, e)
                    if sh is None:
                        raise ValueError(e.error)
                    self._insert_shard(e, p, sh)

            self._write_on_arrival(header.parts, ok, write, arrived_s, locked)
        return True

    def _insert_shard(self, e: _Expect, header: KVPiece, sh: Any) -> None:
        from hetserve.runtime.shard import insert_kv
        from hetserve.runtime.worker import InsertKV

        insert_kv(self.runner, self.desc, InsertKV(seq=e.seq, transfer_id=header.transfer_id, block_ids=e.block_ids,
                                                   num_tokens=e.num_tokens, wire=e.wire, shards=[sh]), borrowed=True)

    def _take(self, header: Any, bufs: list[Any], marks: dict[str, float] | None = None) -> None:
        e = self.expects[header.transfer_id]
        if isinstance(header, KVPiece):
            if header.src_rank not in e.sources:
                return
            sh = self._shard(header, bufs, e)
            if sh is None:
                return
            e.pending.setdefault(header.src_rank, []).append((header.token_start, header.num_tokens,
                                                              header.src_rank, sh))
            if header.final:
                e.taken_s = time.monotonic()
                e.marks = dict(marks or {})  # the endpoint's diagnostics for this message
                self._commit(e, header.src_rank, header.not_before_s)
        elif header.src_rank in e.pending:
            e.taken_s = time.monotonic()
            self._commit(e, header.src_rank, header.not_before_s)

    @staticmethod
    def _commit(e: _Expect, src: int, not_before_s: float = 0.0) -> None:
        pieces = e.pending.pop(src)
        e.ready_at = max(e.ready_at, not_before_s)
        e.shards.extend(pieces)
        if any(n == e.num_tokens for _, n, _, _ in pieces):
            e.committed.add(src)  # a sender's pieces arrive in order: its last one covers the end

    def _finish(self, tid: str, e: _Expect) -> KVIn:
        from hetserve.runtime.shard import insert_kv
        from hetserve.runtime.worker import InsertKV

        del self.expects[tid]
        self._close(tid)
        if e.inserted:  # written on arrival by ``_sink``: usable now (its insert already done, unlike below)
            ready = time.monotonic()
            st = dict(e.inserted)
            st["at_ready"] = ready
            st["at_done"] = time.monotonic()
            return KVIn(seq=e.seq, transfer_id=tid, ok=True, num_bytes=e.num_bytes,
                        convert_s=st["insert"] + st["sync"], wall_s=time.monotonic() - e.start_s, ready_mono=ready,
                        stages=st)
        ready = time.monotonic()
        t0 = time.perf_counter()
        try:
            # one insert per token range (streamed pieces first, then the hand-off's rest), each from every
            # source; the ranges must cover [0, num_tokens) without a gap
            ranges: dict[tuple[int, int], list[Any]] = {}
            for a, n, _, sh in e.shards:
                ranges.setdefault((a, n), []).append(sh)
            covered = 0
            for (a, n), shards in sorted(ranges.items()):
                if a > covered:
                    raise ValueError(f"tokens [{covered}, {a}) of the transfer never arrived")
                bs = self.desc.block_size
                if a % bs:
                    raise ValueError(f"a piece starts at token {a}, not on a block of {bs}")
                insert_kv(self.runner, self.desc, InsertKV(seq=e.seq, transfer_id=tid, block_ids=e.block_ids[a // bs:],
                                                           num_tokens=n - a, wire=e.wire, shards=shards))
                covered = max(covered, n)
            t1 = time.perf_counter()
            if self.runner.device.type == "cuda":
                torch.cuda.synchronize(self.runner.device)
            stages = {"insert": t1 - t0, "sync": time.perf_counter() - t1, "at_taken": e.taken_s,
                      "at_ready": ready, "at_inserted": ready + (t1 - t0), "at_done": time.monotonic(), **e.marks}
        except Exception as ex:  # noqa: BLE001 - a malformed transfer fails, not the worker
            return KVIn(seq=e.seq, transfer_id=tid, ok=False, error=f"{type(ex).__name__}: {ex}",
                        num_bytes=e.num_bytes)
        return KVIn(seq=e.seq, transfer_id=tid, ok=True, num_bytes=e.num_bytes,
                    convert_s=time.perf_counter() - t0, wall_s=time.monotonic() - e.start_s, ready_mono=ready,
                    stages=stages)
