"""The bookkeeping of the ``shm`` transport's CUDA staging ring, kept free of CUDA so that it is tested on a CPU.

A sender copies a message's CUDA tensors into a span of its staging buffer for that peer (exported once by
CUDA IPC). The receiver acknowledges as soon as it has the header and has *enqueued* its copy out of the span
(on its copy stream, an event recorded behind it), so ``send`` does not wait for the copy. The span stays
``held`` until the receiver reports the copy done (``{"span_free": [msg_id]}``, sent once the event completed):
only then may a later message reuse those bytes. A send finds room or waits for such a report (the ring is
full), never overwrites a held span. A dropped peer retires its whole ring (a new connection gets a new buffer;
the old one is not written again), since the receiver may still be copying out of spans nobody reported.

- ``SpanRing``: the sender's side, ``alloc`` / ``free`` over one buffer's bytes (next fit: spans go round the
  buffer in send order, so frees, which come back in copy order, open room where the next message goes).
- ``CopyReleaser``: the receiver's side, one thread that waits for each enqueued copy's completion (anything
  with ``synchronize()``: a blocking CUDA event) in order and reports ``(ident, msg_id)`` through ``on_done``.
"""

from __future__ import annotations

import collections
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any

_ALIGN = 256  # CUDA IPC spans start on 256 bytes (the allocator's granularity; any dtype's alignment)


class SpanRing:
    """The spans of one staging buffer of ``capacity`` bytes handed to messages and not yet released by the
    receiver. Not thread-safe: used under the peer's send lock (releases come through that peer's socket)."""

    def __init__(self, capacity: int, align: int = _ALIGN) -> None:
        if capacity <= 0:
            raise ValueError(f"capacity must be > 0, got {capacity}")
        self.capacity = capacity
        self.align = align
        self.held: dict[int, tuple[int, int]] = {}  # msg_id -> (offset, bytes reserved)
        self._next = 0  # where the last span ended: the next message goes there when it fits

    def _size(self, nbytes: int) -> int:
        return -(-max(nbytes, 1) // self.align) * self.align

    def fits(self, nbytes: int) -> bool:
        """Can a message of ``nbytes`` ever get a span here (the ring empty)?"""
        return self._size(nbytes) <= self.capacity

    def alloc(self, msg_id: int, nbytes: int) -> int | None:
        """A span of ``nbytes`` overlapping no held span, reserved for ``msg_id``; None: no room until a release."""
        need = self._size(nbytes)
        if need > self.capacity or msg_id in self.held:
            return None
        spans = sorted(self.held.values())
        for start in (self._next, 0):  # after the last message, else from the start (the ring wraps)
            at = start
            for off, n in spans:
                if off + n <= at:
                    continue
                if off >= at + need:
                    break
                at = off + n  # overlaps: try after this span
            if at + need <= self.capacity:
                self.held[msg_id] = (at, need)
                self._next = at + need
                return at
        return None

    def free(self, msg_ids: list[int]) -> None:
        """The receiver's copies out of these messages' spans are complete: the bytes may be written again."""
        for m in msg_ids:
            self.held.pop(m, None)
        if not self.held:
            self._next = 0

    @property
    def bytes_held(self) -> int:
        return sum(n for _, n in self.held.values())


def ring_capacity(need: int, current: int, maximum: int, minimum: int = 16 * 2**20) -> int:
    """The size of a new staging ring for a message of ``need`` bytes (the old one, ``current``, is too small):
    room for two such messages in flight (one being copied out while the next is copied in), at least double
    the old one, at most ``maximum`` (but never less than ``need``)."""
    return max(need, min(maximum, max(minimum, 2 * current, 2 * need)))


class CopyReleaser:
    """Waits, on its own thread, for the receiver's enqueued copies (in the order they were enqueued, which is
    the copy stream's order) and calls ``on_done(ident, msg_id)`` for each one complete. ``close`` stops it
    (copies not yet complete are not reported: their sender is gone or will retire the ring)."""

    def __init__(self, on_done: Callable[[bytes, int], None]) -> None:
        self.on_done = on_done
        self._jobs: queue.Queue[tuple[Any, bytes, int] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="shm-copy-release", daemon=True)
        self._thread.start()

    def add(self, done: Any, ident: bytes, msg_id: int) -> None:
        """``done.synchronize()`` returns once the copy out of ``msg_id``'s span is complete."""
        self._jobs.put((done, ident, msg_id))

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            done, ident, msg_id = job
            with contextlib.suppress(Exception):  # a failed wait reports nothing: the span stays held (safe)
                done.synchronize()
                self.on_done(ident, msg_id)

    def close(self) -> None:
        self._jobs.put(None)
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=0.5)  # a copy that never completes leaves its (daemon) thread waiting


class Released:
    """What ``CopyReleaser`` reported, by sender, until the transport's thread sends it (``drain``)."""

    def __init__(self) -> None:
        self.items: collections.deque[tuple[bytes, int]] = collections.deque()

    def add(self, ident: bytes, msg_id: int) -> None:
        self.items.append((ident, msg_id))

    def drain(self) -> dict[bytes, list[int]]:
        out: dict[bytes, list[int]] = {}
        while self.items:
            ident, m = self.items.popleft()
            out.setdefault(ident, []).append(m)
        return out
