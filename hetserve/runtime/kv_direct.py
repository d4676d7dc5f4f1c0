"""Worker-to-worker KV hand-offs: inside a worker, its transport endpoints and the two halves of a transfer.

The coordinator never sees the bytes (``kv_handoff.py`` decides who sends what to whom):

- ``SendKV`` (sender worker): its stage's layers and TP rank's heads of a request's KV (tokens
  ``[token_start, num_tokens)``) are extracted and converted to the wire format at once (in command order, so
  before any later step can reuse the blocks), then a background thread hands each receiving worker the layers
  it holds (``KVPiece`` + its layers as ONE raw buffer when they lie in one block of memory, else one per
  layer) over the pair's transport (``shm`` on one host, ``tcp`` otherwise, ``nixl`` when asked for). A
  declared link is emulated by when the receiver may use the bytes: ``latency + bytes / bandwidth`` after the
  first byte (and after the link is free of earlier sends). On one host (``Transport.same_host``: shm, local,
  nixl on loopback; one monotonic clock) the last piece says so itself (``final``, ``not_before_s``), one message per hand-off; across hosts
  a timer sends ``KVCommit`` once the declared link is through. ``KVSent`` (bytes, conversion, wall and
  declared seconds) goes out when the declared link is through. One thread, jobs in order: the hand-offs to
  one set of receivers share their declared link first come, first served (as the simulator's links do): a
  hand-off's declared bytes start when the link is free of the earlier ones, but the thread does not wait for
  that, so one hand-off's fixed costs (extract, staging, control messages) overlap the earlier ones' link time.
- ``SendKV(layerwise=True)`` (Cronus' head, sent just before a step): during that step a forward hook on each
  decoder layer extracts and queues that layer's share as soon as the layer has run (its KV is written), so
  the bytes leave while the next layers compute; after the step the layers no hook saw (a fused path that
  bypasses ``__call__``) follow, then the commit.
- ``ExpectKV`` / ``CancelKV`` (receiver worker): ``kv_receive.py``.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from hetserve.core.devices import LinkSpec
from hetserve.runtime import kv_batch, stack_sampler
from hetserve.runtime.kv_convert import convert, stacked_view
from hetserve.runtime.kv_messages import KVSent, SendKV
from hetserve.runtime.kv_receive import KVReceiver
from hetserve.runtime.kv_timer import Timer
from hetserve.runtime.kv_transfer import extract_blocks
from hetserve.runtime.messages import KVCommit, KVPiece
from hetserve.runtime.transport import Transport, TransportError, make_transport
from hetserve.runtime.transport.shm import buffers_ready

if TYPE_CHECKING:
    from hetserve.engine.runner import ModelRunner
    from hetserve.runtime.kv_layout import KVDescriptor


def open_endpoints(kinds: tuple[str, ...], host: str = "127.0.0.1") -> dict[str, Transport]:
    """One receiving endpoint per transport kind this worker may be sent KV over."""
    out: dict[str, Transport] = {}
    for k in kinds:
        if k in out:
            continue
        # shm, nixl: a piece's send returns once its bytes are in memory the receiver reads (shared memory, CUDA
        # staging, the receiver's landing region), up to ``window`` unacknowledged; KVSent waits for ``flush``
        window = int(os.environ.get("HETSERVE_KV_WINDOW", os.environ.get("HETSERVE_SHM_WINDOW", "8")))
        kw: dict[str, Any] = {"window": window} if k in ("shm", "nixl") else {}
        if k in ("tcp", "nixl"):
            kw["bind"] = f"tcp://{host}:*"
        out[k] = make_transport(k, **kw)
    return out


@dataclass
class _Out:
    """A sender worker's converted share of layers from ``layer_start``: one buffer per layer, or ``packed``,
    one buffer holding them all back to back (``layer_bytes`` each). ``ready``: a CUDA event the buffers are
    complete at (None on the host)."""

    layer_start: int
    head_start: int
    wire: Any
    shapes: list[list[int]]
    buffers: list[Any]
    packed: Any = None
    layer_bytes: list[int] = field(default_factory=list)
    ready: Any = None
    last: bool = False  # the send's last piece (a one-shot hand-off's only one)
    stages: dict[str, float] = field(default_factory=dict)

    def layers(self, lo: int, hi: int) -> list[Any]:
        """The buffers of local layers ``[lo, hi)``: one slice of ``packed``, or one buffer per layer."""
        if self.packed is None:
            return self.buffers[lo:hi]
        a = sum(self.layer_bytes[:lo])
        return [self.packed[a:a + sum(self.layer_bytes[lo:hi])]]


class DirectKV(KVReceiver):
    """A worker's side of direct hand-offs over ``endpoints`` (kind -> its receiving transport): the sending
    half here, the receiving half in ``kv_receive.KVReceiver``."""

    def __init__(self, runner: ModelRunner, desc: KVDescriptor, endpoints: dict[str, Transport],
                 reply: Callable[[Any], None], stall_s: float = 0.0, orphan_ttl_s: float = 30.0,
                 sink: bool = True) -> None:
        self.runner = runner
        self.desc = desc
        self.endpoints = endpoints
        self.reply = reply  # thread-safe: sends a reply to the coordinator
        self.stall_s = stall_s
        self._jobs: queue.Queue[Any] = queue.Queue()
        self._next_step: list[SendKV] = []  # layer-wise sends for the next step
        self._deferred: list[SendKV] = []  # one-shot sends that may share a message (``flush_sends``)
        self._active: list[SendKV] = []  # ... for the step running now
        self._done_layers: dict[int, set[int]] = {}
        self._hooked: dict[tuple[str, int], int] = {}  # (transfer, seq) -> layers sent from a hook
        self._sending: dict[tuple[str, int], dict[str, Any]] = {}  # the sender thread's per-send books
        self._link_free: dict[tuple[str, ...], float] = {}  # receivers' addresses -> their declared link's free time
        self._timer = Timer()  # what waits for a declared link (a cross-host commit, KVSent)
        self._init_receiving(sink, orphan_ttl_s)
        self._sampler = stack_sampler.from_env("kv-worker")  # HETSERVE_SAMPLE_DIR: where the threads' time goes
        self._thread = threading.Thread(target=self._send_loop, name="kv-send", daemon=True)
        self._thread.start()

    @property
    def addresses(self) -> dict[str, str]:
        return {k: t.address for k, t in self.endpoints.items()}

    # ---- sending --------------------------------------------------------------------------------
    def send(self, cmd: SendKV, defer: bool = False) -> None:
        """Extract and convert now (command order) and queue the bytes for the sender thread; a layer-wise
        send waits for the next step instead (``begin_step`` / the layer hooks / ``end_step``). ``defer``: a
        send that may share one message with the next ones (``kv_batch.py``) waits for ``flush_sends``, which
        the worker calls once no command is waiting or before any other command."""
        if cmd.token_start % self.desc.block_size:
            raise ValueError(f"token_start {cmd.token_start} is not on a block of {self.desc.block_size}")
        if cmd.layerwise:
            self._next_step.append(cmd)
            return
        if defer and kv_batch.enabled() and self._can_batch(cmd):
            if self._deferred and kv_batch.batch_key(self._deferred[-1]) != kv_batch.batch_key(cmd):
                self.flush_sends()
            self._deferred.append(cmd)
            return
        self.flush_sends()
        self._queue_one(cmd)

    def _queue_one(self, cmd: SendKV) -> None:
        self._queue_layers(cmd, range(self.desc.num_layers), last=True)
        self._jobs.put(("commit", cmd))

    def _can_batch(self, cmd: SendKV) -> bool:
        return (kv_batch.batchable(self.desc, self.runner.kv_caches, cmd)
                and all(self._endpoint(t.kind).same_host(t.address) for t in cmd.targets))

    def flush_sends(self) -> None:
        """Extract the deferred sends: one alone as ever, several in one gather and one message per receiver."""
        cmds, self._deferred = self._deferred, []
        if not cmds:
            return
        t0, at_cmd = time.perf_counter(), time.monotonic()
        try:
            if len(cmds) == 1:
                self._queue_one(cmds[0])
                return
            out = kv_batch.extract_batch(self.runner.kv_caches, self.desc, cmds)
            ready = None
            if out.x.is_cuda:
                ready = torch.cuda.Event()
                ready.record()
        except Exception as e:  # noqa: BLE001 - every send it held fails with it
            for c in cmds:
                self.reply(KVSent(seq=c.seq, transfer_id=c.transfer_id, ok=False, error=f"{type(e).__name__}: {e}"))
            return
        self._jobs.put(("batch", cmds, out, ready, time.perf_counter() - t0, at_cmd))

    def _queue_layers(self, cmd: SendKV, layers: Any, last: bool = False) -> None:
        """Extract and convert ``layers`` (local indices) of ``cmd``'s tokens; their bytes go to the thread."""
        t0 = time.perf_counter()
        at_cmd = time.monotonic()
        layers = list(layers)
        if not layers:
            return
        bs = self.desc.block_size
        n = cmd.num_tokens - cmd.token_start
        ids = cmd.block_ids[cmd.token_start // bs:]
        local = dataclasses.replace(self.desc, num_layers=len(layers))
        kv = self.runner.kv_caches
        caches = kv if len(layers) == len(kv) and layers[0] == 0 else [kv[i] for i in layers]
        src = extract_blocks(caches, ids, n, local)
        t1 = time.perf_counter()
        p = convert(src, local, dataclasses.replace(cmd.wire, num_layers=len(layers)), n, heads=self.desc.head_range,
                    consume=True)  # the extracted copy is ours: no second copy when the formats already match
        t2 = time.perf_counter()
        device = self._device_buffers(cmd)
        whole = stacked_view(p.tensors) if len(p.tensors) > 1 else None
        packed, ready = None, None
        if whole is not None and whole.is_contiguous():
            # every layer in one block of memory: one buffer (one IPC span / one shm write / one tcp frame)
            flat = whole.reshape(-1).view(torch.uint8)
            packed = flat if device else flat.cpu().numpy()
            bufs = []
        elif device:
            # GPU to GPU on one host: the shm transport hands CUDA tensors over by CUDA IPC (the receiver copies
            # device to device before it acknowledges), no host round trip
            bufs = [t.contiguous().reshape(-1).view(torch.uint8) for t in p.tensors]
        else:
            # one host buffer per layer, no extra copy (the transport reads them; shm copies them once)
            bufs = [t.contiguous().reshape(-1).view(torch.uint8).cpu().numpy() for t in p.tensors]
        if device:
            ready = torch.cuda.Event()
            ready.record()  # the sender thread waits for this, not for the whole stream (a step may follow)
        start = self.runner.parallel.layer_start + layers[0]
        out = _Out(start, p.head_start, p.desc, [list(t.shape) for t in p.tensors], bufs, packed,
                   [t.numel() * t.element_size() for t in p.tensors], ready, last)
        t3 = time.perf_counter()
        # host seconds per stage (a GPU stage's kernels may still run after its host part returns)
        out.stages = {"extract": t1 - t0, "convert": t2 - t1, "pack": t3 - t2,
                      # "at_" marks: this host's monotonic clock, for a timeline across both processes
                      "at_cmd": at_cmd, "at_queued": time.monotonic()}
        self._jobs.put(("piece", cmd, out, t3 - t0))

    # layer-wise: the layer hooks send each layer's KV as soon as the step wrote it
    def install_layer_hooks(self) -> int:
        """Forward hooks on the model's decoder layers (None where the model has no ``stage_layers``; a fused
        path that bypasses ``__call__`` just falls back to ``end_step``). Returns the number hooked."""
        layers = getattr(self.runner.model, "stage_layers", None) or []
        for i, layer in enumerate(layers):
            layer.register_forward_hook(lambda *_a, i=i: self._on_layer(i))
        return len(layers)

    def begin_step(self) -> None:
        self._active, self._next_step = self._next_step, []
        self._done_layers = {id(c): set() for c in self._active}

    def _on_layer(self, i: int) -> None:
        for cmd in self._active:
            done = self._done_layers[id(cmd)]
            if i not in done:
                done.add(i)
                self._queue_layers(cmd, [i])
                self._hooked[cmd.transfer_id, cmd.seq] = self._hooked.get((cmd.transfer_id, cmd.seq), 0) + 1

    def end_step(self) -> None:
        """The layers no hook sent (a fused path, or a layer-wise send with no step) go now, then the commit."""
        for cmd in self._active:
            done = self._done_layers[id(cmd)]
            self._queue_layers(cmd, [i for i in range(self.desc.num_layers) if i not in done])
            self._jobs.put(("commit", cmd))
        self._active, self._done_layers = [], {}

    def _send_loop(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job[0] == "batch":
                self._send_batch(*job[1:])
                continue
            cmd = job[1]
            key = (cmd.transfer_id, cmd.seq)
            st = self._sending.setdefault(key, {"bytes": 0, "conv": 0.0, "t0": None, "failed": ""})
            try:
                if job[0] == "piece":
                    if not st["failed"]:
                        self._send_piece(cmd, job[2], st)
                    st["conv"] += job[3]
                    books = st.setdefault("stages", {})
                    for k, v in job[2].stages.items():  # seconds add up over pieces; marks keep the latest
                        books[k] = max(books.get(k, 0.0), v) if k.startswith("at_") else books.get(k, 0.0) + v
                else:
                    del self._sending[key]
                    self._commit_job(cmd, st)
            except Exception as e:  # noqa: BLE001 - reported to the coordinator with the commit
                st["failed"] = f"{type(e).__name__}: {e}"
                if job[0] != "piece":
                    self._reply_sent(cmd, st)

    def _device_buffers(self, cmd: SendKV) -> bool:
        """Send CUDA tensors as they are: the cache is on a GPU and every target's transport takes device tensors."""
        if self.runner.device.type != "cuda" or os.environ.get("HETSERVE_KV_HOST_STAGING") == "1":
            return False
        return all(getattr(self._endpoint(tg.kind), "accepts_device_tensors", False) for tg in cmd.targets)

    def _link(self, cmd: SendKV) -> LinkSpec | None:
        if cmd.link_bandwidth <= 0:
            return None
        return LinkSpec("declared", "ethernet", cmd.link_bandwidth, cmd.link_latency_s)

    def _send_piece(self, cmd: SendKV, out: _Out, st: dict[str, Any]) -> None:
        tw = time.perf_counter()
        if out.ready is not None:
            out.ready.synchronize()  # the conversion is done (the transport's copy does not wait for our stream)
        out.stages["wait_ready"] = time.perf_counter() - tw
        out.stages["at_ready"] = time.monotonic()
        link = self._link(cmd)
        if st["t0"] is None:
            st["first"], st["t0"] = self._start_on_link(cmd)
            out.stages["at_first"] = st["first"]
        oa, n_layers = out.layer_start, len(out.shapes)
        deadline_s = st["first"] + cmd.timeout_s
        total = st["bytes"] + sum(out.layer_bytes)
        for tg in cmd.targets:
            lo, hi = max(tg.layer_start, oa), min(tg.layer_end, oa + n_layers)
            if lo >= hi:
                continue
            # the last piece to a same-host receiver commits itself (one message per hand-off), paced by its clock
            final = out.last and self._endpoint(tg.kind).same_host(tg.address)
            not_before = st["t0"] + link.transfer_time_s(total) if final and link is not None else 0.0
            piece = KVPiece(transfer_id=cmd.transfer_id, src_rank=cmd.src_rank, layer_start=lo,
                            head_start=out.head_start, num_tokens=cmd.num_tokens, desc=out.wire,
                            shapes=out.shapes[lo - oa:hi - oa], token_start=cmd.token_start, final=final,
                            not_before_s=not_before)
            try:
                ts = time.perf_counter()
                with buffers_ready():  # ``out.ready`` was waited for above
                    self._endpoint(tg.kind).send(tg.address, piece, out.layers(lo - oa, hi - oa), deadline_s)
                out.stages["transport"] = out.stages.get("transport", 0.0) + time.perf_counter() - ts
                out.stages["at_sent"] = time.monotonic()
                out.stages.update(getattr(self._endpoint(tg.kind), "send_marks", {}))
            except TransportError as e:
                st["failed"] = f"{type(e).__name__}: {e}"
                return
            if final:
                st.setdefault("committed", set()).add(tg.address)
        st["bytes"] = total

    def _commit_job(self, cmd: SendKV, st: dict[str, Any]) -> None:
        """Commit to same-host receivers now (their ``not_before_s`` paces them); the rest waits for the declared
        link on the timer: commits to receivers on other hosts, every piece acknowledged (``flush``), KVSent.
        The sender thread goes on to the next hand-off meanwhile."""
        link = self._link(cmd)
        if st["failed"] or st["t0"] is None:
            self._reply_sent(cmd, st)
            return
        ready = st["t0"] + (0.0 if link is None else link.transfer_time_s(st["bytes"]))
        if link is not None:
            self._link_free[_link_key(cmd)] = ready
        done = st.get("committed", set())
        later = []  # receivers on another host: committed once the declared link is through
        for tg in cmd.targets:
            if tg.address in done:
                continue
            if link is not None and not self._endpoint(tg.kind).same_host(tg.address):
                later.append(tg)  # never early: the receiver uses the KV once it commits
            elif not self._send_commit(cmd, st, tg, ready if link is not None else 0.0):
                break

        def at_ready() -> None:
            for tg in later:
                if st["failed"] or not self._send_commit(cmd, st, tg, 0.0):
                    break
            if not st["failed"]:
                self._flush(cmd, st)
            self._reply_sent(cmd, st)  # the sender's books end when the declared link is through

        if link is None and not self._windowed(cmd):
            at_ready()
        else:
            self._timer.at(ready, at_ready)

    def _start_on_link(self, cmd: SendKV) -> tuple[float, float]:
        """(the first byte leaves now, the declared bytes start): once the link is free of the earlier
        hand-offs to these receivers, first come first served."""
        if self.stall_s > 0:
            time.sleep(self.stall_s)  # test hook: a stalled link
        now = time.monotonic()
        return now, (max(now, self._link_free.get(_link_key(cmd), 0.0)) if self._link(cmd) else now)

    def _windowed(self, cmd: SendKV) -> bool:
        """May a send to one of ``cmd``'s receivers return before it is acknowledged (``flush`` then waits)?"""
        return any(getattr(self._endpoint(tg.kind), "window", 1) > 1 for tg in cmd.targets)

    def _send_batch(self, cmds: list[SendKV], out: kv_batch.BatchOut, ready: Any, conv_s: float,
                    at_cmd: float) -> None:
        """One message per receiver for the whole batch; each part then has its own books, as one hand-off."""
        at_queued = time.monotonic()
        if ready is not None:
            ready.synchronize()
        now, t = self._start_on_link(cmds[0])
        link = self._link(cmds[0])
        sts, not_before = [], []
        for i, c in enumerate(cmds):  # the parts take the declared link one after another
            nbytes = out.part_bytes(i)
            stages = {"extract": conv_s / len(cmds), "at_cmd": at_cmd, "at_queued": at_queued, "at_ready": now,
                      "at_first": now, "batch": float(len(cmds))}
            sts.append({"bytes": nbytes, "conv": conv_s / len(cmds), "t0": t, "first": now, "failed": "",
                        "stages": stages})
            t = t + link.transfer_time_s(nbytes) if link is not None else t
            not_before.append(t if link is not None else 0.0)
        oa, n_layers = self.runner.parallel.layer_start, out.x.shape[0]
        device = self._device_buffers(cmds[0])
        x = out.x if device else out.x.cpu()
        ts, marks = time.perf_counter(), {}
        for tg in cmds[0].targets:
            lo, hi = max(tg.layer_start, oa), min(tg.layer_end, oa + n_layers)
            if lo >= hi:
                continue
            flat = x[lo - oa:hi - oa].reshape(-1).view(torch.uint8)
            try:
                with buffers_ready():
                    self._endpoint(tg.kind).send(tg.address, out.pieces(cmds, oa, lo - oa, hi - oa, not_before),
                                                 [flat if device else flat.numpy()],
                                                 now + min(c.timeout_s for c in cmds))
            except TransportError as e:
                for st in sts:
                    st["failed"] = f"{type(e).__name__}: {e}"
                break
            for st in sts:
                st.setdefault("committed", set()).add(tg.address)
            marks = marks or dict(getattr(self._endpoint(tg.kind), "send_marks", {}))
        sent = time.monotonic()
        for c, st in zip(cmds, sts, strict=True):
            st["stages"].update(marks, transport=time.perf_counter() - ts, at_sent=sent)
            self._commit_job(c, st)

    def _send_commit(self, cmd: SendKV, st: dict[str, Any], tg: Any, not_before_s: float) -> bool:
        commit = KVCommit(transfer_id=cmd.transfer_id, req_id="", src_rank=cmd.src_rank, not_before_s=not_before_s)
        try:
            self._endpoint(tg.kind).send(tg.address, commit, [], st["first"] + cmd.timeout_s)
        except TransportError as e:
            st["failed"] = f"{type(e).__name__}: {e}"
            return False
        return True

    def _flush(self, cmd: SendKV, st: dict[str, Any]) -> None:
        for tg in cmd.targets:  # every piece acknowledged (a windowed send's failure shows here)
            try:
                self._endpoint(tg.kind).flush(tg.address, st["first"] + cmd.timeout_s)
            except TransportError as e:
                st["failed"] = f"{type(e).__name__}: {e}"
                return

    def _reply_sent(self, cmd: SendKV, st: dict[str, Any]) -> None:

        link = self._link(cmd)
        t0 = st["t0"] if st["t0"] is not None else time.monotonic()
        self.reply(KVSent(seq=cmd.seq, transfer_id=cmd.transfer_id, ok=not st["failed"], error=st["failed"],
                          num_bytes=st["bytes"], convert_s=st["conv"], wall_s=time.monotonic() - t0,
                          declared_s=0.0 if link is None else link.transfer_time_s(st["bytes"]),
                          hooked_layers=self._hooked.pop((cmd.transfer_id, cmd.seq), 0), t0_mono=t0,
                          stages=st.get("stages", {})))

    def _endpoint(self, kind: str) -> Transport:
        ep = self.endpoints.get(kind)
        if ep is None:
            raise TransportError(f"this worker has no {kind!r} endpoint (has {sorted(self.endpoints)})")
        return ep

    def close(self) -> None:
        self._jobs.put(None)
        self._timer.close()
        if self._sampler is not None:
            self._sampler.dump()
        for ep in self.endpoints.values():
            try:
                ep.close()
            except TransportError:
                pass


def _link_key(cmd: SendKV) -> tuple[str, ...]:
    """The declared link a hand-off uses: one per set of receiving endpoints."""
    return tuple(sorted(tg.address for tg in cmd.targets))
