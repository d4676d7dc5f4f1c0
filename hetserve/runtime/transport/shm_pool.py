"""Reused shared memory for the ``shm`` transport: a sender's pool segment per peer, and the receiver's side.

Creating, sizing, faulting in and unlinking a fresh ``/dev/shm`` file per message cost more than the copy
itself below ~16 MiB (the kernel zeroes every new page). Instead each sender keeps one pool file per peer
(sparse: pages are allocated on first use and then reused), maps it once, and places each message's bytes in a
free range of it. The range stays reserved (``held``) until the receiver says it no longer reads it: the
receiver maps the whole pool once too, hands the caller a view per message (a numpy array over the mapping, so
that it can tell when the caller dropped the last view: ``weakref.finalize``) and then sends ``{"free":
[msg_id, ...]}`` back over the socket. So a range is never rewritten while the receiver may still read it,
and the receiver copies nothing (the caller's insert reads the pool directly).

When the pool has no free range large enough (the receiver keeps many messages, e.g. pieces waiting for their
``ExpectKV``, or one message is larger than the pool) the sender falls back to a one-off segment, as before:
slower, never blocked. A dropped peer (dead, closed) closes and unlinks its pool at once: a receiver still
holding views keeps its own mapping, and a new connection gets a new pool file, so nothing is overwritten.

``HETSERVE_SHM_POOL_MB`` (default 256; 0: no pool) sizes a pool (virtual: resident only what was used).
"""

from __future__ import annotations

import collections
import contextlib
import mmap
import os
import threading
import weakref
from collections.abc import Callable
from typing import Any

from hetserve.runtime.shm_files import new_owned_file

POOL_PREFIX = "hetserve-shmpool"
PAGE = mmap.PAGESIZE


def pool_bytes() -> int:
    return int(float(os.environ.get("HETSERVE_SHM_POOL_MB", "256")) * 2**20) // PAGE * PAGE


def first_fit(held: dict[int, tuple[int, int]], size: int, key: int, nbytes: int, align: int) -> int | None:
    """The first ``align``ed gap of ``nbytes`` among the ranges ``held`` (key -> (offset, bytes)) of ``size``
    bytes, taken for ``key``; None: no room. (The shm pool, the CUDA staging ring, NIXL's blocks and grants.)"""
    need = -(-max(nbytes, 1) // align) * align
    at = 0
    for off, n in sorted(held.values()):
        if off - at >= need:
            break
        at = max(at, off + -(-n // align) * align)
    if at + need > size:
        return None
    held[key] = (at, nbytes)
    return at


class SlotPool:
    """The sender's pool file for one peer: ``alloc`` a page-aligned range for a message, ``free`` it once the
    receiver released it. Not thread-safe: used under the peer's send lock (frees come through that peer's
    socket, read under the same lock)."""

    def __init__(self, directory: str, size: int) -> None:
        self.size = size
        with new_owned_file(directory, POOL_PREFIX) as (path, fd):
            os.ftruncate(fd, size)
            self.mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        self.path = path
        self.name = os.path.basename(path)
        self.held: dict[int, tuple[int, int]] = {}  # msg_id -> (offset, bytes), until the receiver frees it

    def alloc(self, msg_id: int, nbytes: int) -> int | None:
        """A free range of ``nbytes`` (first fit, page-aligned), reserved for ``msg_id``; None: none free."""
        return first_fit(self.held, self.size, msg_id, nbytes, PAGE)

    def free(self, msg_ids: list[int]) -> None:
        for m in msg_ids:
            self.held.pop(m, None)

    def write(self, offset: int, views: list[memoryview], aligns: list[int]) -> None:
        for v, a in zip(views, aligns, strict=True):
            self.mm[offset + a : offset + a + v.nbytes] = v

    def close(self) -> None:
        """Unlink the file and drop the mapping (a receiver's mapping stays valid until it lets go)."""
        self.held.clear()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        with contextlib.suppress(BufferError):
            self.mm.close()


class PoolReader:
    """The receiver's side: the senders' pools mapped once each (the most recent ``keep``), a view per message
    whose release is reported through ``on_free(ident, msg_id)`` (called from whatever thread drops the last
    view: it only queues the id and wakes the transport's thread through a pipe)."""

    def __init__(self, keep: int = 4) -> None:
        self.keep = keep
        self._maps: collections.OrderedDict[str, mmap.mmap] = collections.OrderedDict()
        self.freed: collections.deque[tuple[bytes, int]] = collections.deque()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self._lock = threading.Lock()
        self._closed = False

    def views(self, path: str, ident: bytes, msg_id: int, spans: list[tuple[int, int]]) -> list[memoryview]:
        """Read-only views of ``spans`` (offsets into the pool file ``path``); the range counts as in use by this
        receiver until every view (and anything made from one) is gone."""
        import numpy as np

        mm = self._maps.pop(path, None)
        if mm is None:
            fd = os.open(path, os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
            while len(self._maps) >= self.keep:  # views into an evicted map keep it mapped until dropped
                self._maps.popitem(last=False)
        self._maps[path] = mm
        if any(off < 0 or n < 0 or off + n > len(mm) for off, n in spans):
            raise ValueError(f"spans outside the {len(mm)}-byte pool {os.path.basename(path)}")
        lo = min((off for off, _ in spans), default=0)
        hi = max((off + n for off, n in spans), default=0)
        arr = np.frombuffer(mm, dtype=np.uint8, count=hi - lo, offset=lo)
        weakref.finalize(arr, self._on_release, ident, msg_id)
        whole = memoryview(arr)
        return [whole[off - lo : off - lo + n] for off, n in spans]

    def _on_release(self, ident: bytes, msg_id: int) -> None:
        self.freed.append((ident, msg_id))
        with self._lock:
            if not self._closed:
                with contextlib.suppress(OSError):  # a full pipe already wakes the thread
                    os.write(self.wake_w, b"x")

    def drain(self, send: Callable[[bytes, list[int]], Any]) -> None:
        """Report the released ranges, one message per sender (called by the transport's thread)."""
        with contextlib.suppress(OSError):
            os.read(self.wake_r, 4096)
        by_ident: dict[bytes, list[int]] = {}
        while self.freed:
            ident, m = self.freed.popleft()
            by_ident.setdefault(ident, []).append(m)
        for ident, ids in by_ident.items():
            send(ident, ids)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            os.close(self.wake_r)
            os.close(self.wake_w)
        self._maps.clear()
