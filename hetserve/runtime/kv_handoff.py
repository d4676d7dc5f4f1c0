"""The coordinator's KV hand-offs between instances (PD, Cronus), for instances of any shape.

A transfer asks every worker of the sending instance for its share (``ExtractKV``: its stage's layers, its TP
rank's heads, already converted to the receiver's declared format, the narrower dtype on the wire). Once all
shares are in, the sender's pinned blocks are released and each worker of the receiving instance gets the
shares that cover its layers and heads (``InsertKV``: it joins them along heads and converts them to its own
cache); the transfer succeeded when every receiving worker acknowledged. Any share failing, the deadline
passing, or either instance dying fails it: the receiver computes the request from scratch
(``finish_remote_kv(success=False)``). Worker commands run in order, so a step sent after an insert sees the
KV, and a late insert lands before any later step reuses the blocks.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from hetserve.runtime.instances import Instance
from hetserve.runtime.kv_layout import wire_descriptor
from hetserve.runtime.worker import ExtractKV, InsertKV, KVIn, KVOut, KVShard, WorkerDied


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
    ) -> None:
        self.instances = instances
        self.pending_src = pending_src
        self.deadline_s = deadline_s
        self.on_dead = on_dead
        self.transfers: dict[str, Transfer] = {}
        self._ids = itertools.count()
        self.num_ok = 0
        self.num_failed = 0

    def start(self, rid: str, dst: str, block_ids: list[int], num_tokens: int) -> None:
        """The receiver reserved ``block_ids`` for the first ``num_tokens`` tokens of ``rid``."""
        src = self.pending_src.pop(rid, None)
        t = Transfer(rid, src or "", dst, list(block_ids), num_tokens, time.monotonic() + self.deadline_s)
        if src is None or not self.instances[src].alive:
            self.finish(t, False)
            return
        si, di = self.instances[src], self.instances[dst]
        tid = f"kv{next(self._ids)}"
        self.transfers[tid] = t
        wire = wire_descriptor(si.desc, di.declared)
        ids = si.scheduler.kv.get_block_ids(rid)
        try:
            si.send_all(
                lambda seq: ExtractKV(seq=seq, transfer_id=tid, block_ids=ids, num_tokens=num_tokens, wire=wire)
            )
        except WorkerDied as e:
            self.on_dead(si, str(e))

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

    def check_deadlines(self) -> None:
        now = time.monotonic()
        for tid, t in list(self.transfers.items()):
            if now > t.deadline_s:
                del self.transfers[tid]
                self.finish(t, False)

    def drop_request(self, rid: str) -> None:
        """An aborted request: forget its transfers (the coordinator releases its blocks everywhere)."""
        for tid, t in list(self.transfers.items()):
            if t.req_id == rid:
                del self.transfers[tid]
                self.instances[t.src].scheduler.release_remote(rid)

    def on_instance_dead(self, name: str) -> None:
        """Transfers from the dead sender fail (the receiver re-prefills); to the dead receiver are dropped."""
        for tid, t in list(self.transfers.items()):
            if t.src == name:
                del self.transfers[tid]
                self.finish(t, False)
            elif t.dst == name:
                del self.transfers[tid]
                self.instances[t.src].scheduler.release_remote(t.req_id)
