"""The coordinator's KV hand-offs between instances (PD, Cronus), for instances of any shape.

A transfer asks every worker of the sending instance for its share (``ExtractKV``: its stage's layers, its TP
rank's heads, already converted to the receiver's declared format, the narrower dtype on the wire). Once all
shares are in, the sender's pinned blocks are released and each worker of the receiving instance gets the
shares that cover its layers and heads (``InsertKV``: it joins them along heads and converts them to its own
cache); the transfer succeeded when every receiving worker acknowledged. Any share failing, the deadline
passing, or either instance dying fails it: the receiver computes the request from scratch
(``finish_remote_kv(success=False)``). Worker commands run in order, so a step sent after an insert sees the
KV, and a late insert lands before any later step reuses the blocks.

Direct mode (every worker of both instances has a KV endpoint, ``WorkerSpec.kv_transports``): the bytes go
worker to worker (``kv_direct.py``). Each receiving worker is told which sender workers cover its layers and
heads (``ExpectKV``), then each sender worker which receivers to send which layers (``SendKV``), over the
pair's transport and paced to the pair's declared link (``links``). The receivers' ``KVIn`` decide; the
sender's pinned blocks are released when the transfer ends (its workers extract in command order, before any
later step). A failed or abandoned transfer sends ``CancelKV`` to the receivers, so nothing lands later.
Per transfer the bytes, sender / receiver conversion seconds, wall and declared-link seconds are kept
(``stats``; ``handoff_s``: from the hand-off's start to the receivers' last acknowledgement).

Streaming (Cronus' head): with each step of the head (``stream_step``, before the step is sent), the KV of the
whole blocks the step completes leaves for the request's main instance (``SendKV`` with ``token_start`` and
``layerwise``, under the transfer id the final hand-off will use): the head worker sends each layer's share as
soon as that layer has written it, while it computes the next layers and steps. The main's workers keep those pieces
until the hand-off's ``ExpectKV`` names their blocks; the final hand-off then sends only the rest. A streamed
piece that failed makes the final hand-off start again from token 0 under a new id.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from hetserve.runtime.instances import Instance
from hetserve.runtime.kv_layout import wire_descriptor
from hetserve.runtime.kv_messages import CancelKV, ExpectKV, KVSent, KVTarget, SendKV
from hetserve.runtime.worker import ExtractKV, InsertKV, KVIn, KVOut, KVShard, WorkerDied


@dataclass(frozen=True)
class KVLink:
    """How KV moves from one instance to another: the transport kind and the declared link (0: unpaced)."""

    kind: str = "shm"
    bandwidth_bytes_per_s: float = 0.0
    latency_s: float = 0.0


@dataclass
class Transfer:
    req_id: str
    src: str
    dst: str
    block_ids: list[int]
    num_tokens: int
    deadline_s: float
    stage: str = "extract"
    outs: dict[int, KVOut] = field(default_factory=dict)  # sender worker index -> its share
    inserts_due: set[int] = field(default_factory=set)  # receiver workers yet to acknowledge
    direct: bool = False
    tid: str = ""
    start_s: float = field(default_factory=time.monotonic)


@dataclass
class _Stream:
    """A head request's KV streamed ahead of its hand-off: tokens ``[0, sent)`` are on their way."""

    tid: str
    src: str
    dst: str
    align: int  # pieces start on whole blocks of both sides
    sent: int = 0
    broken: bool = False


def _num_heads(out: KVOut) -> int:
    assert out.wire is not None
    shape = out.shapes[0]
    return shape[-2] if out.wire.layout == "NHD" else shape[-3]


class KVHandoffs:
    """Transfers in flight; ``pending_src`` (request -> sending instance) is shared with the coordinator."""

    def __init__(
        self,
        instances: dict[str, Instance],
        pending_src: dict[str, str],
        deadline_s: float,
        on_dead: Callable[[Instance, str], None],
        links: dict[tuple[str, str], KVLink] | None = None,
    ) -> None:
        self.instances = instances
        self.pending_src = pending_src
        self.deadline_s = deadline_s
        self.on_dead = on_dead
        self.transfers: dict[str, Transfer] = {}
        self._ids = itertools.count()
        self.num_ok = 0
        self.num_failed = 0
        self.links = links or {}  # (sender, receiver) instance -> KVLink; missing: shm / tcp, unpaced
        self.stats: dict[str, dict[str, object]] = {}  # transfer id -> its record (direct transfers)
        self.streams: dict[str, _Stream] = {}  # request id -> its KV streamed ahead of the hand-off
        self.stream = True

    def start(self, rid: str, dst: str, block_ids: list[int], num_tokens: int) -> None:
        """The receiver reserved ``block_ids`` for the first ``num_tokens`` tokens of ``rid``."""
        src = self.pending_src.pop(rid, None)
        t = Transfer(rid, src or "", dst, list(block_ids), num_tokens, time.monotonic() + self.deadline_s)
        if src is None or not self.instances[src].alive:
            self.finish(t, False)
            return
        si, di = self.instances[src], self.instances[dst]
        wire = wire_descriptor(si.desc, di.declared)
        ids = si.scheduler.kv.get_block_ids(rid)
        if self._direct_ok(si, di):
            st = self.streams.pop(rid, None)
            if st is not None and (st.dst != dst or st.broken):
                self._cancel_tid(st.dst, st.tid)
                st = None
            t.direct, t.tid = True, st.tid if st is not None else f"kv{next(self._ids)}"
            self.transfers[t.tid] = t
            self._record(t.tid, rid, si.name, di.name)
            self._start_direct(t, si, di, ids, wire, st.sent if st is not None else 0)
            return
        tid = f"kv{next(self._ids)}"
        self.transfers[tid] = t
        try:
            si.send_all(
                lambda seq: ExtractKV(seq=seq, transfer_id=tid, block_ids=ids, num_tokens=num_tokens, wire=wire)
            )
        except WorkerDied as e:
            self.on_dead(si, str(e))

    def _direct_ok(self, si: Instance, di: Instance) -> bool:
        return si.alive and di.alive and all(w.kv_addresses for w in [*si.workers, *di.workers])

    def _kind(self, si: Instance, di: Instance) -> str:
        kinds = set(di.workers[0].kv_addresses)
        kind = self.links.get((si.name, di.name), KVLink()).kind
        return kind if kind in kinds else ("shm" if "shm" in kinds else min(kinds))

    @staticmethod
    def _covers(si: Instance, di: Instance) -> dict[int, list[int]]:
        """Sender worker -> the receiver workers holding some of its layers and heads."""
        covers: dict[int, list[int]] = {i: [] for i in range(len(si.workers))}
        for i, js in covers.items():
            a, b = si.layer_range(i)
            h0, h1 = si.descs[i].head_range
            for j in range(len(di.workers)):
                c, d = di.layer_range(j)
                g0, g1 = di.descs[j].head_range
                if max(a, c) < min(b, d) and max(h0, g0) < min(h1, g1):
                    js.append(j)
        return covers

    def _record(self, tid: str, rid: str, src: str, dst: str) -> None:
        if tid in self.stats:
            return
        self.stats[tid] = {"transfer_id": tid, "req_id": rid, "src": src, "dst": dst, "kind": "", "ok": None,
                           "num_bytes": 0, "send_convert_s": 0.0, "recv_convert_s": 0.0, "wall_s": 0.0,
                           "declared_s": 0.0, "recv_wall_s": 0.0, "handoff_s": 0.0, "streamed_tokens": 0,
                           "hooked_layers": 0, "t0_mono": 0.0, "ready_mono": 0.0, "delivered_s": 0.0}
        while len(self.stats) > 10000:
            del self.stats[next(iter(self.stats))]

    def _send(self, si: Instance, di: Instance, tid: str, ids: list[int], num_tokens: int, wire: object,
              token_start: int, layerwise: bool = False) -> None:
        """``SendKV`` to every sender worker: tokens ``[token_start, num_tokens)``. Raises WorkerDied."""
        link = self.links.get((si.name, di.name), KVLink())
        kind = self._kind(si, di)
        self.stats[tid]["kind"] = kind
        for i, js in self._covers(si, di).items():
            w = si.workers[i]
            targets = [KVTarget(kind=kind, address=di.workers[j].kv_addresses[kind],
                                layer_start=di.layer_range(j)[0], layer_end=di.layer_range(j)[1]) for j in js]
            w.send(SendKV(seq=w.next_seq(), transfer_id=tid, block_ids=ids, num_tokens=num_tokens, wire=wire,
                          src_rank=i, targets=targets, timeout_s=self.deadline_s,
                          link_bandwidth=link.bandwidth_bytes_per_s, link_latency_s=link.latency_s,
                          token_start=token_start, layerwise=layerwise))

    def _start_direct(self, t: Transfer, si: Instance, di: Instance, ids: list[int], wire: object,
                      token_start: int) -> None:
        covers = self._covers(si, di)
        try:
            for j, w in enumerate(di.workers):
                srcs = [i for i, js in covers.items() if j in js]
                w.send(ExpectKV(seq=w.next_seq(), transfer_id=t.tid, req_id=t.req_id, block_ids=t.block_ids,
                                num_tokens=t.num_tokens, wire=wire, sources=srcs, timeout_s=self.deadline_s))
                t.inserts_due.add(j)
        except WorkerDied as e:
            self.on_dead(di, str(e))
            return
        try:
            self._send(si, di, t.tid, ids, t.num_tokens, wire, token_start)
        except WorkerDied as e:
            self.on_dead(si, str(e))

    def stream_step(self, inst: Instance, so: object, dest_of: Callable[[str], str | None]) -> None:
        """Before ``inst`` runs step ``so``: its hand-off requests' whole blocks that this step completes (and
        that were not sent yet) leave during the step, layer by layer as each layer writes them (``SendKV``
        with ``layerwise``, sent ahead of the step); their final hand-off sends the rest."""
        if not self.stream:
            return
        sched = inst.scheduler
        for s in so.scheduled:  # type: ignore[attr-defined]
            req = sched.requests.get(s.req_id)
            kt = None if req is None else req.kv_transfer
            if kt is None or not kt.send or kt.compute_limit is None:
                continue
            limit = min(kt.compute_limit, req.num_prompt_tokens)  # type: ignore[union-attr]
            done = s.num_computed_tokens + s.num_tokens
            st = self.streams.get(s.req_id)
            if st is None:
                dst = dest_of(s.req_id)
                if dst is None or dst not in self.instances or not self._direct_ok(inst, self.instances[dst]):
                    continue
                bs = math.lcm(inst.desc.block_size, self.instances[dst].desc.block_size)
                st = self.streams[s.req_id] = _Stream(f"kv{next(self._ids)}", inst.name, dst, bs)
                self._record(st.tid, s.req_id, inst.name, dst)
            upto = min(done, limit - 1) // st.align * st.align  # the final hand-off always sends something
            if st.broken or upto <= st.sent:
                continue
            di = self.instances[st.dst]
            try:
                self._send(inst, di, st.tid, sched.kv.get_block_ids(s.req_id), upto,
                           wire_descriptor(inst.desc, di.declared), st.sent, layerwise=True)
            except WorkerDied as e:
                self.on_dead(inst, str(e))
                return
            self.stats[st.tid]["streamed_tokens"] = upto
            st.sent = upto

    def _cancel_tid(self, dst: str, tid: str) -> None:
        di = self.instances.get(dst)
        if di is None or not di.alive:
            return
        for w in di.workers:
            try:
                w.send(CancelKV(seq=w.next_seq(), transfer_id=tid))
            except WorkerDied as e:
                self.on_dead(di, str(e))
                return

    def on_kv_sent(self, idx: int, reply: KVSent) -> None:
        rec = self.stats.get(reply.transfer_id)
        if rec is not None:
            rec["num_bytes"] = int(rec["num_bytes"]) + reply.num_bytes  # type: ignore[call-overload]
            rec["hooked_layers"] = int(rec["hooked_layers"]) + reply.hooked_layers  # type: ignore[call-overload]
            for k, v in (("send_convert_s", reply.convert_s), ("wall_s", reply.wall_s),
                         ("declared_s", reply.declared_s)):
                rec[k] = max(float(rec[k]), v)  # type: ignore[arg-type]
            _merge_stages(rec, "send_stages", reply.stages)
            if reply.t0_mono and (not rec["t0_mono"] or reply.t0_mono < float(rec["t0_mono"])):  # type: ignore[arg-type]
                rec["t0_mono"] = reply.t0_mono
            _delivered(rec)
        if not reply.ok:
            for st in self.streams.values():
                if st.tid == reply.transfer_id:
                    st.broken = True
        t = self.transfers.get(reply.transfer_id)
        if t is not None and not reply.ok:
            del self.transfers[reply.transfer_id]
            self.finish(t, False)

    def on_kv_out(self, src: Instance, idx: int, reply: KVOut) -> None:
        t = self.transfers.get(reply.transfer_id)
        if t is None:
            return
        di = self.instances[t.dst]
        if not reply.ok or not di.alive:
            del self.transfers[reply.transfer_id]
            self.finish(t, False)
            return
        t.outs[idx] = reply
        if len(t.outs) < len(src.workers):
            return
        src.scheduler.release_remote(t.req_id)  # every share was copied out of the sender's blocks
        t.stage = "insert"
        outs = [t.outs[i] for i in sorted(t.outs)]
        wire = outs[0].wire
        assert wire is not None
        for j, w in enumerate(di.workers):
            a, b = di.layer_range(j)
            h0, h1 = di.descs[j].head_range
            shards = []
            for o in outs:
                oa = o.layer_start
                lo, hi = max(a, oa), min(b, oa + len(o.buffers))
                if lo < hi and max(h0, o.head_start) < min(h1, o.head_start + _num_heads(o)):
                    shards.append(
                        KVShard(
                            layer_start=lo,
                            head_start=o.head_start,
                            shapes=o.shapes[lo - oa : hi - oa],
                            buffers=o.buffers[lo - oa : hi - oa],
                        )
                    )
            try:
                w.send(
                    InsertKV(
                        seq=w.next_seq(),
                        transfer_id=reply.transfer_id,
                        block_ids=t.block_ids,
                        num_tokens=t.num_tokens,
                        wire=wire,
                        shards=shards,
                    )
                )
            except WorkerDied as e:
                self.on_dead(di, str(e))
                return
            t.inserts_due.add(j)
        t.outs.clear()  # the bytes are with the receivers now

    def on_kv_in(self, idx: int, reply: KVIn) -> None:
        rec = self.stats.get(reply.transfer_id)
        if rec is not None and reply.ok:
            rec["recv_convert_s"] = max(float(rec["recv_convert_s"]), reply.convert_s)  # type: ignore[arg-type]
            rec["recv_wall_s"] = max(float(rec["recv_wall_s"]), reply.wall_s)  # type: ignore[arg-type]
            rec["ready_mono"] = max(float(rec["ready_mono"]), reply.ready_mono)  # type: ignore[arg-type]
            _merge_stages(rec, "recv_stages", reply.stages)
            _delivered(rec)
        t = self.transfers.get(reply.transfer_id)
        if t is None:
            return
        if not reply.ok:
            del self.transfers[reply.transfer_id]
            self.finish(t, False)
            return
        t.inserts_due.discard(idx)
        if not t.inserts_due:
            del self.transfers[reply.transfer_id]
            self.finish(t, True)

    def finish(self, t: Transfer, ok: bool) -> None:
        if t.tid in self.stats:
            self.stats[t.tid]["ok"] = ok
            self.stats[t.tid]["handoff_s"] = time.monotonic() - t.start_s
        if t.direct and not ok:
            self._cancel(t)
        if t.src and t.src in self.instances:
            self.instances[t.src].scheduler.release_remote(t.req_id)
        di = self.instances[t.dst]
        if di.alive:
            # failure: the blocks are freed and the request is computed on the receiving side from scratch; a late
            # insert still queued to a worker lands before any later step, so reusing the blocks is safe
            di.scheduler.finish_remote_kv(t.req_id, success=ok)
        if ok:
            self.num_ok += 1
        else:
            self.num_failed += 1

    def _cancel(self, t: Transfer) -> None:
        """Nothing of ``t`` may land in the receiver's blocks from now on (commands run in order)."""
        self._cancel_tid(t.dst, t.tid)

    def check_deadlines(self) -> None:
        now = time.monotonic()
        for tid, t in list(self.transfers.items()):
            if now > t.deadline_s:
                del self.transfers[tid]
                self.finish(t, False)

    def drop_request(self, rid: str) -> None:
        """An aborted request: forget its transfers (the coordinator releases its blocks everywhere)."""
        st = self.streams.pop(rid, None)
        if st is not None:
            self._cancel_tid(st.dst, st.tid)
        for tid, t in list(self.transfers.items()):
            if t.req_id == rid:
                del self.transfers[tid]
                if t.direct:
                    self._cancel(t)
                self.instances[t.src].scheduler.release_remote(rid)

    def on_instance_dead(self, name: str) -> None:
        """Transfers from the dead sender fail (the receiver re-prefills); to the dead receiver are dropped."""
        for st in self.streams.values():
            if name in (st.src, st.dst):
                st.broken = True
        for tid, t in list(self.transfers.items()):
            if t.src == name:
                del self.transfers[tid]
                self.finish(t, False)
            elif t.dst == name:
                del self.transfers[tid]
                self.instances[t.src].scheduler.release_remote(t.req_id)
                # the dead receiver's books: the request waits there again (and is retried elsewhere)
                self.instances[name].scheduler.finish_remote_kv(t.req_id, success=False)


def _delivered(rec: dict[str, object]) -> None:
    """``delivered_s``: the first byte sent -> every receiver may use the KV (both clocks are one host's
    ``time.monotonic()``: meaningful for shm / local hand-offs and tcp on one machine)."""
    t0, ready = float(rec["t0_mono"]), float(rec["ready_mono"])  # type: ignore[arg-type]
    if t0 and ready:
        rec["delivered_s"] = ready - t0


def _merge_stages(rec: dict[str, object], key: str, stages: dict[str, float]) -> None:
    """Per stage the slowest worker's host seconds (the workers of an instance run side by side)."""
    cur = rec.setdefault(key, {})
    assert isinstance(cur, dict)
    for k, v in stages.items():
        cur[k] = max(float(cur.get(k, 0.0)), v)
