"""NIXL transport (UCX through NVIDIA's NIXL: RDMA, CUDA IPC / NVLink, shared memory), where ``import nixl`` works.

Control travels as in ``tcp`` (pyzmq: envelope + msgspec header, then the receiver's acknowledgement); the payload
does not. The sender copies the buffers into its registered staging; then, by default, it WRITEs them into a
landing region the receiver granted it and sends the header naming where they lie (``nixl_write.py``: UCX takes
CUDA IPC for a VRAM WRITE where its READ crawls); with ``HETSERVE_NIXL_OP=READ`` it sends the header naming the
staging and the receiver READs from it (``nixl_read.py``), as described below. The sender picks: a receiver
takes both.

- One NIXL agent per endpoint (UCX with ``ucx_error_handling_mode=none``: the default "peer" mode completed
  through a slow lane, ~8 ms over tcp/lo; no progress thread: it spins a core) and, per memory kind (DRAM, VRAM
  of one GPU), a staging pool (sent bytes are copied there) and a landing pool (received bytes are read there):
  one registered block reused by every message (first-fit ranges); a message that does not fit registers a
  block twice as large, older blocks are deregistered once nothing in them is held. No registration per message.
- ``send`` copies the buffers into staging (CUDA tensors on a copy stream, synchronised before anything goes
  out); the envelope names each buffer's (address, bytes, device) there and carries this agent's metadata only
  when the peer lacks the current one (first message on a connection, or a new staging block): one exchange
  per peer. The staging range is held until the acknowledgement.
- The receiving thread loads that metadata (replacing the older: loading again would merge), takes a landing
  range, READs every buffer in one NIXL request per memory kind, polls it to completion (``check_xfer_state``
  drives UCX's progress) and then acknowledges. A message costs the two control messages of ``tcp`` plus one
  one-sided read; the receiver allocates its own memory and sees the completion where the bytes land. (A WRITE
  would first need a landing range from the receiver, per message or as per-peer credits, and completes at the
  sender, so the receiver would still need a message saying the bytes are there.)
- Lending (the ``Transport`` contract): host buffers are read-only views of the landing block whose range is
  reused once every view is gone (``weakref.finalize``); CUDA buffers are cloned out for ``recv``, and a ``sink``
  borrows views (it is done with them, synchronised, when it returns). Host messages up to ``inline_max_bytes``
  (64 KiB) travel inline as zmq frames: a read costs more there.
- A sender that gave up (deadline, lost connection) cannot know whether the peer still reads its staging: those
  ranges are quarantined until ``2 * _SKEW_S`` past the deadline, which the envelope carries (wall clock): the
  receiver neither starts nor continues a read past it plus ``_SKEW_S``. While reads of its staging are pending,
  a helper thread progresses the sender's agent (UCX over plain TCP emulates RMA and needs it; shared memory,
  CMA, RDMA and CUDA IPC do not). One lock serialises every call into the agent.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zmq

from hetserve.runtime.messages import Envelope, MessageDecodeError, decode
from hetserve.runtime.transport.base import Buffer, TransportError, as_bytes_view, buffer_nbytes
from hetserve.runtime.transport.nixl_pool import MIB, Block, Pool, layout
from hetserve.runtime.transport.nixl_read import ReadPath
from hetserve.runtime.transport.nixl_write import WritePath
from hetserve.runtime.transport.tcp import ZmqTransport

_INLINE_MAX_BYTES = 64 * 1024
_READ_TIMEOUT_S = 60.0
_SKEW_S = 5.0  # wall clocks of two hosts agree to within this
_PROGRESS_S = 0.001  # how often the helper progresses the agent while peers read this endpoint's staging


def nixl_unavailable_reason() -> str | None:
    """None when NIXL can be used here, else why not."""
    try:
        import nixl._api  # noqa: F401
    except ImportError as e:
        return f"NIXL is not importable ({e}); install NIXL with a UCX backend, or use the tcp or shm transport"
    return None


def _is_cuda(buf: Any) -> bool:
    return getattr(buf, "is_cuda", False) is True


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


_thread_ctx = threading.local()


def _cuda_current(dev: int) -> None:
    """The GPU's primary context current on this thread: UCX's CUDA transports act in the calling thread's context
    (an endpoint's thread has none until it is set) and fall back to a slow lane without one."""
    if getattr(_thread_ctx, "dev", None) != dev:
        import torch

        torch.cuda.set_device(dev)
        _thread_ctx.dev = dev


@dataclass
class _Staged:
    """What a sent message holds in the staging pools until it is acknowledged."""

    ranges: list[tuple[Pool, Block, int]] = field(default_factory=list)
    deadline_s: float = 0.0
    failed: bool = False
    progress: bool = False  # counted in ``_outstanding`` (the peer READs the staging until acknowledged)


class NixlTransport(ReadPath, WritePath, ZmqTransport):
    """``bind`` / ``advertise`` / ``connect_timeout_s`` / ``max_queued`` / ``window``: as ``ZmqTransport``.
    ``inline_max_bytes``: host messages up to this size go inline (0: every non-empty one is read through NIXL;
    default ``HETSERVE_NIXL_INLINE_KB``, 64). ``pool_mb``: each pool's first block (``HETSERVE_NIXL_POOL_MB``, 16).
    ``device``: the GPU that CUDA buffers land on (default: the sender's device index, as on one host).
    ``backend_params``: the UCX backend's (default ``{"ucx_error_handling_mode": "none"}``). ``op``: "WRITE"
    (default ``HETSERVE_NIXL_OP``, WRITE) or "READ". ``landing_max_mb``: the largest landing region this endpoint
    grants one sender (``HETSERVE_NIXL_LANDING_MAX_MB``, 4096)."""

    name = "nixl"

    def same_host(self, address: str) -> bool:  # a peer on this host's loopback
        return address.startswith(("tcp://127.", "tcp://localhost:", "tcp://[::1]:"))

    def __init__(self, bind: str = "tcp://127.0.0.1:*", connect_timeout_s: float = 1.0, max_queued: int = 64,
                 advertise: str | None = None, window: int = 1, inline_max_bytes: int | None = None,
                 pool_mb: float | None = None, device: int | None = None,
                 backend_params: dict[str, str] | None = None, op: str | None = None,
                 landing_max_mb: float | None = None) -> None:
        if (reason := nixl_unavailable_reason()) is not None:
            raise TransportError(reason)
        from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t

        logging.getLogger("nixl").setLevel(logging.WARNING)  # it logs every agent and backend at INFO, to stdout
        self._agent_lock = threading.RLock()
        self._name = f"hetserve-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        cfg = nixl_agent_config(enable_prog_thread=False, backends=[],
                                sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT)
        self._agent = nixl_agent(self._name, cfg)
        params = {"ucx_error_handling_mode": "none"} if backend_params is None else dict(backend_params)
        self._agent.create_backend("UCX", params)
        if inline_max_bytes is None:
            inline_max_bytes = int(float(os.environ.get("HETSERVE_NIXL_INLINE_KB", _INLINE_MAX_BYTES / 1024)) * 1024)
        self.inline_max_bytes = inline_max_bytes
        mb = float(os.environ.get("HETSERVE_NIXL_POOL_MB", "16")) if pool_mb is None else pool_mb
        self.pool_bytes = max(MIB, int(mb * MIB))
        self.device = device
        self.op = (op or os.environ.get("HETSERVE_NIXL_OP", "WRITE")).upper()
        if self.op not in ("READ", "WRITE"):
            raise ValueError(f"op must be READ or WRITE, got {self.op!r}")
        self._init_write(landing_max_mb)
        self.accepts_device_tensors = _cuda_available()
        self._epoch = 0  # bumped by every registration: peers need newer metadata to reach the new block
        self._md_sent: dict[str, int] = {}  # peer -> the epoch whose metadata it has
        self._staging: dict[tuple[str, int], Pool] = {}
        self._landing: dict[tuple[str, int], Pool] = {}
        self._keys = itertools.count(1)
        self._remote: dict[str, str] = {}  # a sender's agent name -> the name NIXL knows it by
        self._freed: collections.deque[tuple[Pool, Block, int]] = collections.deque()  # landing views dropped
        self._lent: list[tuple[Pool, Block, int]] = []  # CUDA landing ranges a sink borrowed
        self._landed: tuple[int, list[Buffer], list[tuple[Pool, Block, int]]] | None = None
        self._copy_streams: dict[int, Any] = {}
        self._tls = threading.local()
        self._outstanding = 0  # sent, staged messages not yet acknowledged: the progress thread runs meanwhile
        self._progress_cv = threading.Condition()
        super().__init__(bind, connect_timeout_s, max_queued, advertise=advertise, window=window)
        self._progress = threading.Thread(target=self._progress_loop, name="nixl-progress", daemon=True)
        self._progress.start()

    def _call(self, method: str, *args: Any) -> Any:
        with self._agent_lock:
            return getattr(self._agent, method)(*args)

    def _pool(self, table: dict[tuple[str, int], Pool], mem: str, dev: int) -> Pool:
        pool = table.get((mem, dev))  # (a pool registers nothing until its first range: a spare one costs nothing)
        return pool if pool is not None else table.setdefault((mem, dev), Pool(self, mem, dev, table is self._staging))

    def _pack(self, peer: str, msg_id: int, buffers: Sequence[Buffer]) -> tuple[Envelope, list[Any], Any]:
        env = Envelope(msg_id=msg_id, sender=self.address, num_buffers=len(buffers))
        sizes = [buffer_nbytes(b) for b in buffers]
        cuda = [_is_cuda(b) for b in buffers]
        if not any(cuda) and sum(sizes) <= self.inline_max_bytes:
            return env, [as_bytes_view(b) for b in buffers], None
        staged = _Staged()
        try:
            handles = self._stage(buffers, sizes, cuda, staged)
        except BaseException:
            self._free_staged(staged)
            raise
        staged.deadline_s = getattr(self._tls, "deadline_s", time.monotonic() + _READ_TIMEOUT_S)
        env.kind, env.segment, env.handles = "nixl", self._name, handles
        if self.op == "WRITE":
            try:
                self._write_out(peer, env, buffers, handles, staged)
            except BaseException:
                self._free_staged(staged)
                raise
            self._free_staged(staged)  # written: the staging is free, the landing range held until freed
            env.kind = "nixl-w"
            return env, [], staged
        epoch = self._epoch
        if self._md_sent.get(peer) != epoch:  # the agent's metadata after the blocks this message lies in
            handles[0]["md"] = self._call("get_agent_metadata")
            self._md_sent[peer] = epoch
        handles[0]["deadline_wall"] = time.time() + (staged.deadline_s - time.monotonic())
        staged.progress = True
        with self._progress_cv:
            self._outstanding += 1
            self._progress_cv.notify()
        return env, [], staged

    def send(self, peer: str, header: Any, buffers: Sequence[Buffer], deadline_s: float) -> None:
        self._tls.deadline_s = deadline_s  # for ``_pack`` (called in this thread): the peer reads by it
        super().send(peer, header, buffers, deadline_s)

    def _stage(self, buffers: Sequence[Buffer], sizes: list[int], cuda: list[bool],
               staged: _Staged) -> list[dict[str, Any]]:
        """Copy ``buffers`` into staging (one range per memory kind); the descriptors the receiver reads."""
        groups: dict[tuple[str, int], list[int]] = {}
        for i, b in enumerate(buffers):
            key = ("VRAM", b.device.index or 0) if cuda[i] else ("DRAM", 0)
            groups.setdefault(key, []).append(i)
        handles: list[dict[str, Any]] = [{} for _ in buffers]
        for (mem, dev), idx in groups.items():
            offs, total = layout([sizes[i] for i in idx])
            pool = self._pool(self._staging, mem, dev)
            key = next(self._keys)
            blk, base = pool.alloc(key, total)
            staged.ranges.append((pool, blk, key))
            if mem == "VRAM":
                self._copy_cuda(blk, base, [buffers[i] for i in idx], offs, [sizes[i] for i in idx])
            for i, off in zip(idx, offs, strict=True):
                if mem == "DRAM" and sizes[i]:
                    blk.buf[base + off: base + off + sizes[i]] = np.frombuffer(as_bytes_view(buffers[i]), np.uint8)
                handles[i] = {"mem": mem, "dev": dev, "addr": blk.addr + base + off, "n": sizes[i]}
                if mem == "VRAM":
                    handles[i].update(dtype=str(buffers[i].dtype).removeprefix("torch."), shape=list(buffers[i].shape))
        return handles

    def _copy_cuda(self, blk: Block, base: int, tensors: list[Any], offs: list[int], sizes: list[int]) -> None:
        import torch

        from hetserve.runtime.transport import shm

        dev = torch.device("cuda", blk.dev)
        if (stream := self._copy_streams.get(blk.dev)) is None:
            stream = self._copy_streams[blk.dev] = torch.cuda.Stream(device=dev)
        if not getattr(shm._ready, "on", False):  # ``shm.buffers_ready()``: the caller synchronised already
            stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.device(dev), torch.cuda.stream(stream):
            for t, off, n in zip(tensors, offs, sizes, strict=True):
                if n:
                    blk.buf.narrow(0, base + off, n).copy_(t.contiguous().reshape(-1).view(torch.uint8))
        stream.synchronize()  # the peer reads the staging as soon as it has the envelope

    def _may_return_early(self, state: Any) -> bool:  # type: ignore[override]
        return state is not None  # staged: the caller's buffers were copied

    def _release(self, state: Any) -> None:
        if state.progress:
            state.progress = False
            with self._progress_cv:
                self._outstanding -= 1
        self._free_staged(state)

    def _free_staged(self, staged: _Staged) -> None:
        # a failed send's peer may still be reading: hold its ranges past the deadline the peer reads by
        hold = staged.deadline_s + 2 * _SKEW_S if staged.failed else 0.0
        for pool, blk, key in staged.ranges:
            pool.free(blk, key, hold)
        staged.ranges = []

    def _drop(self, peer: str) -> None:
        with self._table_lock:
            conn = self._peers.get(peer)
        if conn is not None:
            for _, state in list(conn.outstanding.values()):
                if state is not None:
                    state.failed = True
        super()._drop(peer)

    def _peer_dropped(self, peer: str) -> None:
        self._md_sent.pop(peer, None)  # a new connection may lead to a new endpoint: send the metadata again
        self._forget_peer(peer)

    def _progress_loop(self) -> None:
        if self.accepts_device_tensors:
            _cuda_current(self.device or 0)
        while not self._stop.is_set():
            with self._progress_cv:
                if self._outstanding <= 0 and not self._grant_ids:  # UCX over TCP: a target progresses too
                    self._progress_cv.wait(0.5)
                    continue
            time.sleep(_PROGRESS_S)  # first: a read over shared memory / RDMA is often done by then
            if self._outstanding > 0 or self._grant_ids:
                with contextlib.suppress(Exception):  # best effort: the reader's poll decides
                    self._call("get_new_notifs")

    def _take(self, frames: list[zmq.Frame]) -> bool:
        if len(frames) == 3 and b"nixl-hello" in frames[1].bytes:
            try:
                env = decode(frames[1].buffer)
            except MessageDecodeError:
                env = None
            if isinstance(env, Envelope) and env.kind == "nixl-hello":
                self._grant(frames[0].bytes, env)
                return True
        return super()._take(frames)

    def _unpack(self, env: Envelope, frames: list[zmq.Frame]) -> list[Buffer]:
        if env.kind not in ("nixl", "nixl-w"):
            return super()._unpack(env, frames)
        landed, self._landed = self._landed, None
        if env.kind == "nixl-w":
            bufs, groups = landed[1:] if landed is not None and landed[0] == env.msg_id else self._land(env)
            out = self._cloned(bufs)
            self._wlent = [r for r in self._wlent if r not in groups]
            for g, lent in groups:
                self._wrelease(g, lent)
            return out
        bufs, ranges = landed[1:] if landed is not None and landed[0] == env.msg_id else self._read(env)
        out = self._cloned(bufs)
        dev_ranges = [r for r in ranges if r[0].mem == "VRAM"]
        self._lent = [r for r in self._lent if r not in dev_ranges]
        for pool, blk, key in dev_ranges:
            pool.free(blk, key)
        return out

    @staticmethod
    def _cloned(bufs: list[Buffer]) -> list[Buffer]:
        out = [b.clone() if _is_cuda(b) else b for b in bufs]  # a device range is reused at once: copy it out
        if any(_is_cuda(b) for b in out):
            import torch

            for dev in {b.device for b in out if _is_cuda(b)}:
                torch.cuda.synchronize(dev)
        return out

    def _unpack_borrowed(self, env: Envelope, frames: list[zmq.Frame]) -> list[Buffer] | None:
        if env.kind == "nixl-w":
            bufs, groups = self._land(env)
            self._landed = (env.msg_id, bufs, groups)
            self._wlent.extend(groups)  # released after the sink returned (``_service``)
            return list(bufs)
        if env.kind != "nixl":
            return super()._unpack_borrowed(env, frames)
        bufs, ranges = self._read(env)
        self._landed = (env.msg_id, bufs, ranges)
        # VRAM ranges are freed after the sink returned (``_service``); host ones when the views are dropped
        self._lent.extend(r for r in ranges if r[0].mem == "VRAM")
        return list(bufs)

    def _service(self) -> None:
        """Free what the last message lent (its sink returned) and the host ranges whose views were dropped."""
        self._landed = None
        lent, self._lent = self._lent, []
        for pool, blk, key in lent:
            pool.free(blk, key)
        while self._freed:
            pool, blk, key = self._freed.popleft()
            pool.free(blk, key)
        self._service_write()

    def _wake_fd(self) -> int | None:
        return self._wake_r

    def _landing_kind(self, mem: str, dev: int) -> tuple[str, int]:
        if mem != "VRAM" or not self.accepts_device_tensors:
            return "DRAM", 0
        import torch

        return "VRAM", self.device if self.device is not None else (dev if dev < torch.cuda.device_count() else 0)

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        with self._progress_cv:
            self._progress_cv.notify_all()
        self._progress.join(timeout=5)
        self._landed, self._lent = None, []
        with contextlib.suppress(Exception):
            for pool in [*self._staging.values(), *self._landing.values()]:
                pool.close()
            for name in self._remote.values():
                self._call("remove_remote_agent", name)
        self._remote.clear()
        self._close_write()

