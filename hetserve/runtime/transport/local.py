"""In-process transport: endpoints in one process (tests, threads of one host process) exchange messages
through bounded queues. Buffers are copied on send (the caller may reuse them after), headers go through
the runtime's encode / decode like every other transport."""

from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Sequence

from hetserve.runtime.messages import decode, encode
from hetserve.runtime.transport.base import (
    Buffer,
    Header,
    PeerUnavailable,
    TransferTimeout,
    Transport,
    TransportClosed,
    as_bytes_view,
    remaining_s,
)

_hub_lock = threading.Lock()
_hub: dict[str, LocalTransport] = {}
_ids = itertools.count()


class LocalTransport(Transport):
    """``address`` is ``local://<name>``. ``max_queued`` messages may wait in the inbox; a send to a full inbox
    blocks until there is room or the deadline passes (so a stalled receiver shows up as TransferTimeout)."""

    name = "local"

    def same_host(self, address: str) -> bool:  # one process
        return True

    def __init__(self, name: str | None = None, max_queued: int = 64) -> None:
        self._name = name or f"ep{next(_ids)}"
        self._inbox: queue.Queue[tuple[bytes, list[bytes]]] = queue.Queue(maxsize=max_queued)
        self._closed = False
        self._send_lock = threading.Lock()
        with _hub_lock:
            if self.address in _hub:
                raise ValueError(f"local transport {self.address} already exists")
            _hub[self.address] = self

    @property
    def address(self) -> str:
        return f"local://{self._name}"

    def send(self, peer: str, header: Header, buffers: Sequence[Buffer], deadline_s: float) -> None:
        if self._closed:
            raise TransportClosed(f"{self.address} is closed")
        head = encode(header)
        with _hub_lock:
            target = _hub.get(peer)
        if target is None or target._closed:
            raise PeerUnavailable(f"no open local endpoint {peer}")
        with self._send_lock:
            if remaining_s(deadline_s) <= 0:
                raise TransferTimeout(f"deadline passed before sending to {peer}")
            frames = [bytes(as_bytes_view(b)) for b in buffers]
            target._deliver(head, frames, deadline_s)

    def _deliver(self, head: bytes, frames: list[bytes], deadline_s: float) -> None:
        # a put that times out leaves nothing queued, so the sender's state stays clean
        while True:
            if self._closed:
                raise PeerUnavailable(f"{self.address} closed")
            wait = min(remaining_s(deadline_s), 0.05)
            if wait <= 0:
                raise TransferTimeout(f"{self.address} did not take the message before the deadline")
            try:
                self._inbox.put((head, frames), timeout=wait)
                return
            except queue.Full:
                continue

    def recv(self, timeout_s: float) -> tuple[Header, list[Buffer]]:
        if self._closed:
            raise TransportClosed(f"{self.address} is closed")
        end = time.monotonic() + max(timeout_s, 0.0)
        while True:
            try:
                head, frames = self._inbox.get(timeout=max(0.0, min(end - time.monotonic(), 0.05)))
                return decode(head), [memoryview(f) for f in frames]
            except queue.Empty:
                if self._closed:
                    raise TransportClosed(f"{self.address} is closed") from None
                if time.monotonic() >= end:
                    raise TransferTimeout(f"nothing arrived at {self.address} in {timeout_s} s") from None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with _hub_lock:
            if _hub.get(self.address) is self:
                del _hub[self.address]
        while True:  # drop what nobody will read
            try:
                self._inbox.get_nowait()
            except queue.Empty:
                break
