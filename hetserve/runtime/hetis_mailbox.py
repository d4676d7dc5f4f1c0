"""The Hetis mailbox: one persistent shared buffer per (main worker, attention worker) pair that carries a
layer's q / k / v rows of the offloaded heads in and the attention output out, so that only a small header
goes over the socket.

The main worker allocates it (:meth:`Mailbox.create`), announces it with a ``MailboxOpen`` message
(:meth:`Mailbox.announce`) and the attention worker opens it once (:meth:`Mailbox.open`) and keeps it open.
Backings:

* ``"cuda_ipc"``: both sides on CUDA; a CUDA storage exported with ``_share_cuda_()`` and opened with
  ``UntypedStorage._new_shared_cuda`` (after ``torch.cuda.init()`` and ``set_device``: a process that has not
  touched CUDA segfaults in it otherwise).
* ``"shm"``: a host file ``/dev/shm/hetis-mb-<pid>-<hex>`` (mode 0600) mapped by both. The main unlinks it as
  soon as the worker has it open (the mappings stay valid), and again on close, so neither a killed worker nor
  a killed main leaves it behind; :func:`sweep_stale` removes files of dead creators. A CUDA main registers it
  as pinned memory where it can (copies to and from it are then DMA).

The buffer is sized in bytes; each layer's regions follow from (tokens, held heads) by :func:`layout`, which
both sides compute, so a re-dispatch that changes the held heads needs no new buffer unless it outgrows it.
Visibility: the writer calls :meth:`Mailbox.fence` (a CUDA event synchronised; nothing on the CPU) before it
sends the header that hands the buffer over; the protocol is strictly one request, one answer.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from typing import Any

import torch

from hetserve.runtime.hetis_messages import MailboxOpen
from hetserve.runtime.hetis_wire import WIRE_DTYPES
from hetserve.runtime.shm_files import new_owned_file, sweep_dead_owners

SHM_DIR = "/dev/shm"
PREFIX = "hetis-mb"
ALIGN = 256  # bytes; every region starts on a multiple
KINDS = ("cuda_ipc", "shm")


def _up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def layout(tokens: int, heads: int, group: int, head_dim: int, elem: int) -> list[tuple[int, tuple[int, ...]]]:
    """``[(byte offset, shape)]`` of q ``[T, heads*group, D]``, k, v ``[T, heads, D]`` and out
    ``[T, heads*group, D]``."""
    shapes = [(tokens, heads * group, head_dim), (tokens, heads, head_dim), (tokens, heads, head_dim),
              (tokens, heads * group, head_dim)]
    out, off = [], 0
    for s in shapes:
        out.append((off, s))
        off += _up(s[0] * s[1] * s[2] * elem)
    return out


def region_bytes(tokens: int, heads: int, group: int, head_dim: int, elem: int) -> int:
    off, (t, h, d) = layout(tokens, heads, group, head_dim, elem)[-1]
    return off + _up(t * h * d * elem)


def backings(main_device: torch.device | str, worker_device: torch.device | str) -> list[str]:
    """Mailbox kinds to try, best first, for a main on ``main_device`` and a worker on ``worker_device``
    (both on this host)."""
    m, w = torch.device(main_device), torch.device(worker_device)
    return ["cuda_ipc", "shm"] if m.type == "cuda" and w.type == "cuda" else ["shm"]


def _path_ok(path: str) -> bool:
    return os.path.dirname(path) == SHM_DIR and re.fullmatch(rf"{PREFIX}-\d+-[0-9a-f]+", os.path.basename(path)) \
        is not None


def sweep_stale() -> int:
    """Unlink mailbox files whose creating process is gone; returns how many."""
    return sweep_dead_owners(SHM_DIR, PREFIX)


def live_files(pid: int | None = None) -> list[str]:
    """Mailbox files of process ``pid`` (default: this one) that still exist."""
    mine = f"{PREFIX}-{os.getpid() if pid is None else pid}-"
    with contextlib.suppress(OSError):
        return sorted(os.path.join(SHM_DIR, e) for e in os.listdir(SHM_DIR) if e.startswith(mine))
    return []


def _export_cuda(buf: torch.Tensor) -> dict[str, Any]:
    storage = buf.untyped_storage()
    dev, handle, size, offset, ref_handle, ref_offset, ev_handle, ev_sync = storage._share_cuda_()
    return {"cuda_device": int(dev), "cuda_handle": bytes(handle), "cuda_storage_size": int(size),
            "cuda_storage_offset": int(offset), "cuda_ref_handle": bytes(ref_handle), "cuda_ref_offset": int(ref_offset),
            "cuda_event_handle": None if ev_handle is None else bytes(ev_handle), "cuda_event_sync": bool(ev_sync)}


def _import_cuda(m: MailboxOpen) -> torch.Tensor:
    torch.cuda.init()  # the handle opens in this process's CUDA context: there must be one
    prev = torch.cuda.current_device()
    torch.cuda.set_device(m.cuda_device)
    try:
        storage = torch.UntypedStorage._new_shared_cuda(
            m.cuda_device, m.cuda_handle, m.cuda_storage_size, m.cuda_storage_offset, m.cuda_ref_handle,
            m.cuda_ref_offset, m.cuda_event_handle, m.cuda_event_sync,
        )
        buf = torch.empty(0, dtype=torch.uint8, device=f"cuda:{m.cuda_device}")
        buf.set_(storage, 0, (m.cuda_storage_size,), (1,))
        torch.cuda.current_stream().synchronize()
    finally:
        torch.cuda.set_device(prev)  # the worker's own tensors stay where they were
    if buf.numel() < m.nbytes:
        raise RuntimeError(f"CUDA mailbox holds {buf.numel()} bytes, {m.nbytes} announced")
    return buf[: m.nbytes]


def _create_shm(nbytes: int) -> tuple[str, torch.Tensor]:
    sweep_stale()
    with new_owned_file(SHM_DIR, PREFIX) as (path, fd):
        os.ftruncate(fd, nbytes)
        buf = torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)
    return path, buf


def _open_shm(path: str, nbytes: int) -> torch.Tensor:
    if not _path_ok(path):
        raise ValueError(f"not a mailbox file: {path!r}")
    if os.stat(path).st_size < nbytes:
        raise RuntimeError(f"mailbox file {path} is smaller than {nbytes} bytes")
    return torch.from_file(path, shared=True, size=nbytes, dtype=torch.uint8)


@dataclass
class Mailbox:
    """One shared buffer (``buf``: flat uint8 of ``nbytes``) and how to cut it into a layer's regions."""

    kind: str
    gen: int
    nbytes: int
    dtype: torch.dtype
    group: int
    head_dim: int
    buf: torch.Tensor
    path: str = ""  # "shm": the file (until unlinked)
    owner: bool = False  # created here: unlinks the file on close
    pinned: bool = False  # "shm" on a CUDA main: registered with cudaHostRegister

    # ---- the main worker's side --------------------------------------------------------------------------
    @classmethod
    def create(cls, kind: str, nbytes: int, dtype: torch.dtype, group: int, head_dim: int,
               device: torch.device | str, gen: int) -> Mailbox:
        nbytes = max(_up(nbytes), ALIGN)
        device = torch.device(device)
        if kind == "cuda_ipc":
            if device.type != "cuda":
                raise ValueError(f"a CUDA IPC mailbox needs a CUDA main, not {device}")
            return cls(kind, gen, nbytes, dtype, group, head_dim, torch.zeros(nbytes, dtype=torch.uint8,
                                                                               device=device), owner=True)
        if kind != "shm":
            raise ValueError(f"unknown mailbox kind {kind!r}")
        path, buf = _create_shm(nbytes)
        mb = cls(kind, gen, nbytes, dtype, group, head_dim, buf, path=path, owner=True)
        if device.type == "cuda":
            mb.pinned = _register(buf)
        return mb

    def announce(self) -> MailboxOpen:
        """The message that lets the attention worker open this mailbox."""
        extra = _export_cuda(self.buf) if self.kind == "cuda_ipc" else {}
        return MailboxOpen(kind=self.kind, gen=self.gen, nbytes=self.nbytes, dtype=str(self.dtype).removeprefix(
            "torch."), group=self.group, head_dim=self.head_dim, path=self.path, **extra)

    def unlink(self) -> None:
        """Remove the host file (mappings stay valid): once the peer has it open, and on close."""
        if self.owner and self.path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    # ---- the attention worker's side ---------------------------------------------------------------------
    @classmethod
    def open(cls, m: MailboxOpen) -> Mailbox:
        dtype = WIRE_DTYPES.get(m.dtype)
        if dtype is None or m.nbytes <= 0 or m.group <= 0 or m.head_dim <= 0:
            raise ValueError(f"bad mailbox {m.kind} {m.dtype} {m.nbytes} bytes")
        if m.kind == "cuda_ipc":
            buf = _import_cuda(m)
        elif m.kind == "shm":
            buf = _open_shm(m.path, m.nbytes)
        else:
            raise ValueError(f"unknown mailbox kind {m.kind!r}")
        return cls(m.kind, m.gen, m.nbytes, dtype, m.group, m.head_dim, buf, path=m.path)

    # ---- both ---------------------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.buf.device

    def need(self, tokens: int, heads: int) -> int:
        return region_bytes(tokens, heads, self.group, self.head_dim, self.dtype.itemsize)

    def fits(self, tokens: int, heads: int) -> bool:
        return self.need(tokens, heads) <= self.nbytes

    def views(self, tokens: int, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v, out of a layer with ``tokens`` rows of ``heads`` KV heads (views into the buffer)."""
        if not self.fits(tokens, heads):
            raise ValueError(f"{tokens} tokens x {heads} heads need {self.need(tokens, heads)} bytes; the mailbox "
                             f"holds {self.nbytes}")
        es = self.dtype.itemsize
        out = []
        for off, shape in layout(tokens, heads, self.group, self.head_dim, es):
            n = shape[0] * shape[1] * shape[2] * es
            out.append(self.buf[off : off + n].view(self.dtype).view(shape))
        return out[0], out[1], out[2], out[3]

    def fence(self, stream_device: torch.device | None = None) -> None:
        """Make what this process wrote (on its current CUDA stream) visible before handing the buffer over."""
        dev = stream_device if stream_device is not None else self.device
        for d in {x for x in (dev, self.device) if x.type == "cuda"}:  # both, when two GPUs took part
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(d))
            ev.synchronize()

    def close(self) -> None:
        if self.pinned:
            with contextlib.suppress(Exception):
                torch.cuda.cudart().cudaHostUnregister(self.buf.data_ptr())
            self.pinned = False
        self.unlink()
        self.buf = torch.empty(0, dtype=torch.uint8)


def _register(buf: torch.Tensor) -> bool:
    """Pin a host mapping for DMA (a CUDA main's copies into a "shm" mailbox); False where CUDA refuses."""
    try:
        cudart = torch.cuda.cudart()
        ok = int(cudart.cudaHostRegister(buf.data_ptr(), buf.numel(), 1)) == 0  # 1: cudaHostRegisterPortable
        if not ok and hasattr(cudart, "cudaGetLastError"):
            cudart.cudaGetLastError()  # do not leave the refusal for the next kernel launch check to find
        return ok
    except Exception:  # noqa: BLE001 - pinning is an optimisation only
        return False
