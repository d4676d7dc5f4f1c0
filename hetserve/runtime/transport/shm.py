"""Same-host transport: headers over a zmq ``ipc://`` socket, payloads through shared memory.

The sender writes all buffers of a message into one fresh POSIX shared-memory segment (a file under
``/dev/shm``), sends its name, waits for the receiver's acknowledgement and unlinks the segment, whether the
send succeeded or not. The receiver maps the segment read-only and returns memoryviews into the mapping (no
copy on its side; the mapping outlives the unlink until the last view is dropped). Small messages travel
inline. Raw ``os.open`` + ``mmap`` is used instead of ``multiprocessing.shared_memory`` so that no resource
tracker process unlinks or warns about segments another process owns.

CUDA tensors in ``buffers`` (when CUDA is available and the peer is another process) move by CUDA IPC: the
sender exports the storage handle, the receiver opens it, copies into its own memory and synchronises before
it acknowledges, so the sender may reuse its tensor once ``send`` returns. This path needs a GPU and is
exercised only by the ``gpu`` tests.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
import re
import tempfile
import uuid
from collections.abc import Sequence
from typing import Any

import zmq

from hetserve.runtime.messages import Envelope, MessageDecodeError
from hetserve.runtime.transport.base import Buffer, as_bytes_view, buffer_nbytes
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
    if not re.fullmatch(rf"{_PREFIX}-\d+-[0-9a-f]+", name):
        raise MessageDecodeError(f"not a segment name: {name!r}")
    return os.path.join(SHM_DIR, name)


def sweep_stale_segments() -> int:
    """Unlink segments left by processes that died mid-send; returns how many."""
    n = 0
    for entry in os.listdir(SHM_DIR):
        m = re.fullmatch(rf"{_PREFIX}-(\d+)-[0-9a-f]+", entry)
        if m is None:
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(SHM_DIR, entry))
                n += 1
        except PermissionError:
            pass
    return n


def live_segments() -> list[str]:
    """Segments this process created that still exist (empty whenever no send is in progress)."""
    mine = f"{_PREFIX}-{os.getpid()}-"
    return sorted(e for e in os.listdir(SHM_DIR) if e.startswith(mine))


class ShmTransport(ZmqTransport):
    name = "shm"

    def __init__(self, bind: str | None = None, connect_timeout_s: float = 1.0, max_queued: int = 64) -> None:
        if bind is None:
            sock = os.path.join(tempfile.gettempdir(), f"hetserve-{os.getpid()}-{next(_ids)}-{uuid.uuid4().hex[:6]}")
            bind = f"ipc://{sock}"
        sweep_stale_segments()
        super().__init__(bind, connect_timeout_s, max_queued)
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
        handles: list[dict[str, Any] | None] = []
        host: list[Buffer] = []
        keep: list[Any] = []  # exported device tensors stay alive until the peer acknowledged
        for b in buffers:
            if _is_cuda_tensor(b) and not same_process:
                t = b.contiguous()
                keep.append(t)
                handles.append(_export_cuda(t))
                host.append(b"")
            else:
                handles.append(None)
                host.append(b)
        if keep:
            env.handles = handles
        total = sum(buffer_nbytes(b) for b in host)
        if total <= _INLINE_MAX_BYTES:
            return env, [as_bytes_view(b) for b in host], (None, keep)
        name, spans = _write_segment([as_bytes_view(b) for b in host])
        env.kind, env.segment, env.spans = "shm", name, spans
        return env, [], (name, keep)

    def _release(self, state: Any) -> None:
        name, _keep = state
        if name is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(SHM_DIR, name))

    def _unpack(self, env: Envelope, frames: list[zmq.Frame]) -> list[Buffer]:
        if env.kind == "inline":
            bufs: list[Buffer] = super()._unpack(env, frames)
        elif env.kind == "shm":
            if len(env.spans) != env.num_buffers:
                raise MessageDecodeError(f"{env.num_buffers} buffers announced, {len(env.spans)} spans")
            fd = os.open(_segment_path(env.segment), os.O_RDONLY)
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
        for i, c in enumerate(env.handles):
            if c is not None:
                bufs[i] = _import_cuda(c)
        return bufs

    def close(self) -> None:
        if self._closed:
            return
        _local_addresses.discard(self.address)
        super().close()
        if self.address.startswith("ipc://"):  # zmq leaves the socket file behind
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.address.removeprefix("ipc://"))


def _write_segment(views: list[memoryview]) -> tuple[str, list[tuple[int, int]]]:
    spans = []
    offset = 0
    for v in views:
        spans.append((offset, v.nbytes))
        offset += -(-v.nbytes // _ALIGN) * _ALIGN
    name = f"{_PREFIX}-{os.getpid()}-{uuid.uuid4().hex}"
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, max(offset, 1))
        with mmap.mmap(fd, max(offset, 1), flags=mmap.MAP_SHARED | _POPULATE) as mm:
            for (off, n), v in zip(spans, views, strict=True):
                mm[off : off + n] = v
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        raise
    finally:
        os.close(fd)
    return name, spans


def _export_cuda(t: Any) -> dict[str, Any]:
    storage = t.untyped_storage()
    dev, handle, size, offset, ref_handle, ref_offset, ev_handle, ev_sync = storage._share_cuda_()
    return {
        "pid": os.getpid(), "device": dev, "handle": handle, "storage_size": size, "storage_offset": offset,
        "ref_handle": ref_handle, "ref_offset": ref_offset, "event_handle": ev_handle, "event_sync": ev_sync,
        "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "stride": list(t.stride()),
        "tensor_offset": t.storage_offset(),
    }


def _import_cuda(c: dict[str, Any]) -> Any:
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
        out = view.clone()
        torch.cuda.current_stream().synchronize()
    return out
