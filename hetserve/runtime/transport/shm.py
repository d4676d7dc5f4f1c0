"""Same-host transport: headers over a zmq ``ipc://`` socket, payloads through shared memory.

The sender writes all buffers of a message into a range of its pool file for that peer (``shm_pool.py``: one
sparse ``/dev/shm`` file per peer, mapped once, ranges reused once the receiver released them) and sends the
range; the receiver returns views into its own mapping of the pool (no copy on its side) and tells the sender
when the caller dropped them. Only when the pool has no room does a message get a fresh segment of its own,
unlinked once acknowledged (the receiver's mapping outlives the unlink). Small messages travel inline. With
``window`` > 1 (default 1; the KV endpoints of ``kv_direct.py`` use ``HETSERVE_SHM_WINDOW``, 8) a host-memory
message does not wait for its acknowledgement: its bytes are already in shared memory, so ``send`` returns once
they are queued, and a stream of pieces is not paced by the receiving process's thread hand-offs (``flush``
waits for the acknowledgements, and raises a late failure). Raw ``os.open`` + ``mmap`` is used instead of ``multiprocessing.shared_memory`` so that no resource
tracker process unlinks or warns about segments another process owns.

CUDA tensors in ``buffers`` (when CUDA is available and the peer is another process) move by CUDA IPC. The
sender copies them (on a copy stream of its own) into a range of one persistent staging ring per device, exported once;
the receiver opens each exported buffer once and keeps it open (opening an IPC handle costs milliseconds, and
one handle per tensor per message made a hand-off of 32 layers slow), copies the message's span into its own
memory as one tensor (on its own copy stream) and synchronises before it acknowledges; the sender's range is
free once acknowledged, and its tensors once ``send`` returns (``window`` > 1: before the acknowledgement). The copy stream waits for the caller's current
stream, unless the caller says its tensors are ready (``with buffers_ready():`` after synchronising the work
that wrote them, e.g. on an event): on the legacy default stream that wait would hold the copy behind every
kernel queued on the device, a whole model step included. A message larger than ``HETSERVE_SHM_STAGING_MAX_MB`` (default 1024) exports its
tensors one by one instead. This path needs a GPU and is exercised only by the ``gpu`` tests.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import re
import tempfile
import threading
import uuid
from collections.abc import Sequence
from typing import Any

import zmq

from hetserve.runtime.messages import Envelope, MessageDecodeError
from hetserve.runtime.shm_files import new_owned_file, sweep_dead_owners
from hetserve.runtime.transport.base import Buffer, as_bytes_view, buffer_nbytes
from hetserve.runtime.transport.shm_pool import POOL_PREFIX, PoolReader, SlotPool, first_fit, pool_bytes
from hetserve.runtime.transport.tcp import ZmqTransport

SHM_DIR = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
_PREFIX = "hetserve-shm"
_INLINE_MAX_BYTES = 64 * 1024
_ALIGN = 64
_ids = itertools.count()
_local_addresses: set[str] = set()
# fault the whole segment in with one call rather than page by page
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def _is_cuda_tensor(buf: Any) -> bool:
    return getattr(buf, "is_cuda", False) is True


def _segment_path(name: str) -> str:
    if not re.fullmatch(rf"({_PREFIX}|{POOL_PREFIX})-\d+-[0-9a-f]+", name):
        raise MessageDecodeError(f"not a segment name: {name!r}")
    return os.path.join(SHM_DIR, name)


def sweep_stale_segments() -> int:
    """Unlink segments and pools left by processes that died; returns how many."""
    return sweep_dead_owners(SHM_DIR, _PREFIX) + sweep_dead_owners(SHM_DIR, POOL_PREFIX)


def live_segments() -> list[str]:
    """One-off segments this process created that still exist (empty whenever no send is outstanding)."""
    mine = f"{_PREFIX}-{os.getpid()}-"
    return sorted(e for e in os.listdir(SHM_DIR) if e.startswith(mine))


def live_pools() -> list[str]:
    """Pool files this process created that still exist (one per peer of an open endpoint)."""
    mine = f"{POOL_PREFIX}-{os.getpid()}-"
    return sorted(e for e in os.listdir(SHM_DIR) if e.startswith(mine))


class ShmTransport(ZmqTransport):
    name = "shm"

    def same_host(self, address: str) -> bool:  # shared memory and ipc:// sockets: one host by construction
        return True

    def __init__(self, bind: str | None = None, connect_timeout_s: float = 1.0, max_queued: int = 64,
                 window: int = 1) -> None:
        if bind is None:
            sock = os.path.join(tempfile.gettempdir(), f"hetserve-{os.getpid()}-{next(_ids)}-{uuid.uuid4().hex[:6]}")
            bind = f"ipc://{sock}"
        sweep_stale_segments()
        self._staging: dict[int | None, _Staging] = {}
        self._staging_lock = threading.Lock()
        self._imported = _ImportCache()
        self._pools: dict[str, SlotPool] = {}  # peer -> its pool (used under that peer's send lock)
        self._pool_bytes = pool_bytes()
        self._reader = PoolReader()
        super().__init__(bind, connect_timeout_s, max_queued, window=window)
        _local_addresses.add(self.address)

    @property
    def accepts_device_tensors(self) -> bool:  # type: ignore[override]
        try:
            import torch
        except ImportError:
            return False
        return torch.cuda.is_available()

    def _pack(self, peer: str, msg_id: int, buffers: Sequence[Buffer]) -> tuple[Envelope, list[Any], Any]:
        env = Envelope(msg_id=msg_id, sender=self.address, num_buffers=len(buffers))
        same_process = peer in _local_addresses  # CUDA IPC cannot open a handle in the process that made it
        handles: list[dict[str, Any] | None] = [None] * len(buffers)
        host: list[Buffer] = list(buffers)
        keep: list[Any] = []  # exported device tensors stay alive until the peer acknowledged
        cuda = [i for i, b in enumerate(buffers) if _is_cuda_tensor(b) and not same_process]
        staged = None
        if cuda:
            staged = self._stage([buffers[i] for i in cuda])
            if staged is None:  # too large for the staging buffer: one export per tensor
                for i in cuda:
                    t = buffers[i].contiguous()
                    keep.append(t)
                    handles[i] = _export_cuda(t)
            else:
                for i, h in zip(cuda, staged[1], strict=True):
                    handles[i] = h
            for i in cuda:
                host[i] = b""
            env.handles = handles
        try:
            total = sum(buffer_nbytes(b) for b in host)
            if total <= _INLINE_MAX_BYTES:
                if self.window > 1 and not keep and staged is None:  # copied: ``send`` may return before the ack
                    return env, [bytes(as_bytes_view(b)) for b in host], (None, keep, staged, True)
                return env, [as_bytes_view(b) for b in host], (None, keep, staged, False)
            views = [as_bytes_view(b) for b in host]
            pooled = self._pool_write(peer, msg_id, views)
            if pooled is not None:
                env.kind, env.segment, env.spans = "shm", *pooled
                return env, [], (None, keep, staged, True)
            name, spans = _write_segment(views)
        except BaseException:
            if staged is not None:
                staged[0].release()
            raise
        env.kind, env.segment, env.spans = "shm", name, spans
        return env, [], (name, keep, staged, True)

    def _stage(self, tensors: list[Any]) -> tuple[Any, list[dict[str, Any]]] | None:
        """Copy ``tensors`` (CUDA, ready) into this endpoint's staging buffer of their device; the per-tensor
        handles (the buffer's export plus a span). Holds the buffer until ``_release``. None: too large."""
        import torch

        dev = tensors[0].device
        if any(t.device != dev for t in tensors):
            return None
        sizes = [t.numel() * t.element_size() for t in tensors]
        offsets, total = [], 0
        for n in sizes:
            offsets.append(total)
            total += -(-n // _ALIGN) * _ALIGN
        if total > _staging_max_bytes():
            return None
        with self._staging_lock:
            st = self._staging.get(dev.index)
            if st is None:
                st = self._staging[dev.index] = _Staging(dev)
        held = st.alloc(total)
        if held is None:  # the ring is full of unacknowledged messages and may not grow: export one by one
            return None
        buf, base = held.buf, held.offset
        try:
            if not getattr(_ready, "on", False):
                st.stream.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.device(dev), torch.cuda.stream(st.stream):
                for t, off, n in zip(tensors, offsets, sizes, strict=True):
                    if n:
                        buf.narrow(0, base + off, n).copy_(t.contiguous().reshape(-1).view(torch.uint8))
            st.stream.synchronize()
        except BaseException:
            held.release()
            raise
        hs = [dict(held.export, span=[base + off, n], dtype=str(t.dtype).removeprefix("torch."), shape=list(t.shape))
              for t, off, n in zip(tensors, offsets, sizes, strict=True)]
        return held, hs

    def _pool_write(self, peer: str, msg_id: int, views: list[memoryview]) -> tuple[str, list[tuple[int, int]]] | None:
        """``views`` written to a free range of ``peer``'s pool: (pool name, spans); None: no room."""
        aligns, total = [], 0
        for v in views:
            aligns.append(total)
            total += -(-v.nbytes // _ALIGN) * _ALIGN
        if total > self._pool_bytes // 2:  # one message may not take the whole pool (a stream needs two)
            return None
        pool = self._pools.get(peer)
        if pool is None:
            pool = self._pools[peer] = SlotPool(SHM_DIR, self._pool_bytes)
        off = pool.alloc(msg_id, total)
        if off is None:
            return None
        try:
            pool.write(off, views, aligns)
        except BaseException:
            pool.free([msg_id])
            raise
        return pool.name, [(off + a, v.nbytes) for a, v in zip(aligns, views, strict=True)]

    def _may_return_early(self, state: Any) -> bool:  # type: ignore[override]
        # host bytes are in shared memory already, CUDA bytes in a staging range held until acknowledged; only
        # tensors exported as they are (too large for the staging) must be read before the caller reuses them
        _name, keep, staged, copied = state
        return (copied or staged is not None) and not keep

    def _on_free(self, peer: str, msg_ids: list[int]) -> None:
        pool = self._pools.get(peer)
        if pool is not None:
            pool.free(msg_ids)

    def _peer_dropped(self, peer: str) -> None:
        pool = self._pools.pop(peer, None)
        if pool is not None:
            pool.close()

    def _wake_fd(self) -> int | None:
        return self._reader.wake_r

    def _service(self) -> None:
        self._reader.drain(lambda ident, ids: self._reply_to(ident, {"free": ids}))

    def _release(self, state: Any) -> None:
        name, _keep, staged, _copied = state
        if staged is not None:
            staged[0].release()
        if name is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(SHM_DIR, name))

    def _unpack(self, env: Envelope, frames: list[zmq.Frame]) -> list[Buffer]:
        if env.kind == "inline":
            bufs: list[Buffer] = super()._unpack(env, frames)
        elif env.kind == "shm":
            if len(env.spans) != env.num_buffers:
                raise MessageDecodeError(f"{env.num_buffers} buffers announced, {len(env.spans)} spans")
            path = _segment_path(env.segment)
            if env.segment.startswith(POOL_PREFIX):
                bufs = self._reader.views(path, self._unpacking_for, env.msg_id, [tuple(s) for s in env.spans])
                return self._cuda_handles(env, bufs)
            fd = os.open(path, os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ) if size else b""
                view = memoryview(mm)
            finally:
                os.close(fd)
            if any(off < 0 or n < 0 or off + n > size for off, n in env.spans):
                raise MessageDecodeError(f"spans outside the {size}-byte segment {env.segment}")
            bufs = [view[off : off + n] for off, n in env.spans]
        else:
            raise MessageDecodeError(f"unknown buffer kind {env.kind!r}")
        return self._cuda_handles(env, bufs)

    def _unpack_borrowed(self, env: Envelope, frames: list[zmq.Frame]) -> list[Buffer] | None:
        """Inline host frames, or CUDA buffers staged by the sender: views of its staging buffer (no copy; the
        sender keeps it until this message is acknowledged, after ``sink`` returned)."""
        if env.kind != "inline" or len(frames) != env.num_buffers:
            return None
        handles = env.handles or []
        if not handles:
            return [f.buffer for f in frames]
        if not all(c is not None and "span" in c for c in handles):
            return None
        return self._imported.take(list(handles), copy=False)

    def _cuda_handles(self, env: Envelope, bufs: list[Buffer]) -> list[Buffer]:
        staged = [(i, c) for i, c in enumerate(env.handles) if c is not None and "span" in c]
        for i, c in enumerate(env.handles):
            if c is not None and "span" not in c:
                bufs[i] = _import_cuda(c)
        if staged:
            for i, t in zip([i for i, _ in staged], self._imported.take([c for _, c in staged]), strict=True):
                bufs[i] = t
        return bufs

    def close(self) -> None:
        if self._closed:
            return
        _local_addresses.discard(self.address)
        super().close()
        self._reader.close()
        for peer in list(self._pools):
            self._peer_dropped(peer)
        if self.address.startswith("ipc://"):  # zmq leaves the socket file behind
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.address.removeprefix("ipc://"))


def _write_segment(views: list[memoryview]) -> tuple[str, list[tuple[int, int]]]:
    spans = []
    offset = 0
    for v in views:
        spans.append((offset, v.nbytes))
        offset += -(-v.nbytes // _ALIGN) * _ALIGN
    with new_owned_file(SHM_DIR, _PREFIX) as (path, fd):
        os.ftruncate(fd, max(offset, 1))
        with mmap.mmap(fd, max(offset, 1), flags=mmap.MAP_SHARED | _POPULATE) as mm:
            for (off, n), v in zip(spans, views, strict=True):
                mm[off : off + n] = v
    return os.path.basename(path), spans


def _export_cuda(t: Any) -> dict[str, Any]:
    storage = t.untyped_storage()
    dev, handle, size, offset, ref_handle, ref_offset, ev_handle, ev_sync = storage._share_cuda_()
    return {
        "pid": os.getpid(), "device": dev, "handle": handle, "storage_size": size, "storage_offset": offset,
        "ref_handle": ref_handle, "ref_offset": ref_offset, "event_handle": ev_handle, "event_sync": ev_sync,
        "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "stride": list(t.stride()),
        "tensor_offset": t.storage_offset(),
    }


def _open_cuda(c: dict[str, Any]) -> Any:
    """A view of the exported tensor ``c`` in this process (the IPC handle opened; no copy)."""
    import torch

    # the handle is opened in this process's CUDA context: make sure there is one (a process that has not touched
    # CUDA yet segfaulted inside _new_shared_cuda on torch 2.11 / H100)
    torch.cuda.init()
    torch.cuda.set_device(c["device"])
    storage = torch.UntypedStorage._new_shared_cuda(
        c["device"], c["handle"], c["storage_size"], c["storage_offset"], c["ref_handle"], c["ref_offset"],
        c["event_handle"], c["event_sync"],
    )
    dtype = getattr(torch, c["dtype"])
    with torch.cuda.device(c["device"]):
        view = torch.empty(0, dtype=dtype, device=f"cuda:{c['device']}")
        view.set_(storage, c["tensor_offset"], c["shape"], c["stride"])
    return view


def _import_cuda(c: dict[str, Any]) -> Any:
    import torch

    view = _open_cuda(c)
    with torch.cuda.device(c["device"]):
        out = view.clone()
        torch.cuda.current_stream().synchronize()
    return out


_ready = threading.local()


@contextlib.contextmanager
def buffers_ready() -> Any:
    """In this thread, CUDA tensors handed to ``send`` are complete already: the staging copy need not wait for
    the current stream (see the module docstring)."""
    prev = getattr(_ready, "on", False)
    _ready.on = True
    try:
        yield
    finally:
        _ready.on = prev


def _staging_max_bytes() -> int:
    return int(float(os.environ.get("HETSERVE_SHM_STAGING_MAX_MB", "1024")) * 2**20)


class _Staging:
    """A device's staging ring for CUDA IPC: one exported buffer (a new, larger one when a message does not fit,
    up to ``HETSERVE_SHM_STAGING_MAX_MB``; a new buffer is a new export) and its copy stream. Each message holds
    its range (first fit) from the copy in to its acknowledgement, so a stream of messages need not wait for each
    one's acknowledgement before the next is staged; ranges of an older buffer keep it alive until released."""

    def __init__(self, device: Any) -> None:
        import torch

        self.device = device
        self.stream = torch.cuda.Stream(device=device)
        self.lock = threading.Lock()
        self.buf: Any = None
        self.export: dict[str, Any] = {}
        self.held: dict[int, tuple[int, int]] = {}  # ranges held in ``buf``: id -> (offset, bytes)
        self._ids = itertools.count()

    def alloc(self, nbytes: int) -> _Held | None:
        """A range of ``nbytes`` (released by ``_Held.release``); None when it would exceed the maximum."""
        import torch

        key = next(self._ids)
        with self.lock:
            cur = 0 if self.buf is None else self.buf.numel()
            off = first_fit(self.held, cur, key, nbytes, _ALIGN)
            if off is None:
                size = max(nbytes, 2 * cur, 16 * 2**20)
                if self.held:  # no room among the held ranges: a larger buffer, at most the maximum
                    size = min(size, _staging_max_bytes())
                    if size < nbytes or size <= cur:
                        return None
                self.buf = torch.empty(size, dtype=torch.uint8, device=self.device)
                self.export = _export_cuda(self.buf)
                self.export["staging"] = uuid.uuid4().hex  # names this buffer for the receiver's cache
                self.held = {}
                off = first_fit(self.held, size, key, nbytes, _ALIGN)
            return _Held(self, key, self.buf, self.export, off)  # type: ignore[arg-type]

    def release(self, held: _Held) -> None:
        with self.lock:
            if held.buf is self.buf:
                self.held.pop(held.key, None)


class _Held:
    """One message's range of a staging buffer (the buffer stays alive as long as this does)."""

    def __init__(self, staging: _Staging, key: int, buf: Any, export: dict[str, Any], offset: int) -> None:
        self.staging, self.key, self.buf, self.export, self.offset = staging, key, buf, export, offset

    def release(self) -> None:
        self.staging.release(self)


class _ImportCache:
    """The receiver's opened staging buffers (a few per sender, oldest closed first) and its copy stream."""

    def __init__(self, keep: int = 8) -> None:
        self.keep = keep
        self.opened: dict[str, Any] = {}
        self._streams: dict[int, Any] = {}

    def take(self, handles: list[dict[str, Any]], copy: bool = True) -> list[Any]:
        """Copies of the spans ``handles`` name: one device copy of the range they cover, views into it
        (``copy=False``: views of the sender's staging buffer itself, to be read before acknowledging)."""
        import torch

        key = handles[0]["staging"]
        if any(c["staging"] != key for c in handles):  # one staging buffer per message by construction
            return [self.take([c], copy)[0] for c in handles]
        src = self.opened.pop(key, None)
        if src is None:
            c = dict(handles[0], shape=[handles[0]["storage_size"] - handles[0]["tensor_offset"]], stride=[1],
                     dtype="uint8")
            src = _open_cuda(c)
            while len(self.opened) >= self.keep:
                self.opened.pop(next(iter(self.opened)))
        self.opened[key] = src  # most recently used last
        lo = min(c["span"][0] for c in handles)
        hi = max(c["span"][0] + c["span"][1] for c in handles)
        if not copy:
            return [src.narrow(0, c["span"][0], c["span"][1]).view(getattr(torch, c["dtype"])).view(c["shape"])
                    for c in handles]
        dev = src.device.index
        stream = self._streams.get(dev)
        if stream is None:
            stream = self._streams[dev] = torch.cuda.Stream(device=src.device)
        with torch.cuda.device(dev), torch.cuda.stream(stream):
            whole = src.narrow(0, lo, hi - lo).clone()
        stream.synchronize()
        out = []
        for c in handles:
            off, n = c["span"]
            dtype = getattr(torch, c["dtype"])
            out.append(whole.narrow(0, off - lo, n).view(dtype).view(c["shape"]))
        return out
