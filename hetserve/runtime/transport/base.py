"""The transport contract: move one message (a small header plus raw buffers) to a peer, before a deadline."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, TypeVar, Union

import msgspec

from hetserve.core.errors import HetserveError

# a message Struct from hetserve.runtime.messages, or a dict of builtins
Header = Union[msgspec.Struct, dict[str, Any]]  # noqa: UP007
# bytes-like for host memory; a transport with ``accepts_device_tensors`` also takes torch CUDA tensors
Buffer = Any


_T = TypeVar("_T", bound="Transport")


class TransportError(HetserveError):
    """A message was not delivered. The sender may retry; nothing of the message stays queued."""


class TransferTimeout(TransportError):
    """The deadline passed before the peer had the whole message (or, in ``recv``, before one arrived)."""


class PeerUnavailable(TransportError):
    """The peer is unknown, closed, unreachable, or went away while the message was in flight."""


class TransportClosed(TransportError):
    """This endpoint was closed."""


class Transport(ABC):
    """One endpoint: it receives at ``address`` and sends to other endpoints' addresses.

    Contract:
    - ``send(peer, header, buffers, deadline_s)`` returns only once the whole message is in the peer
      endpoint's memory (its transport has acknowledged it); it never returns early with the message still
      queued. ``deadline_s`` is an absolute ``time.monotonic()`` time. On failure it raises
      ``TransferTimeout`` (deadline passed) or ``PeerUnavailable`` (no such peer / peer closed / connection
      lost), promptly (no later than shortly after the deadline), and leaves nothing behind: no queued copy
      of the message, no shared-memory segment, no half-open connection state for that peer.
    - After ``send`` returns or raises, the caller may reuse or free ``buffers``.
    - The header is serialised with ``hetserve.runtime.messages.encode`` (never pickle), even in-process,
      so every transport accepts exactly the same headers.
    - ``recv(timeout_s)`` returns the next ``(header, buffers)`` in arrival order; buffers are read-only
      bytes-like objects (or CUDA tensors, for a transport that moved them by CUDA IPC) that stay valid as long
      as the caller holds them. Raises ``TransferTimeout`` when nothing arrived in ``timeout_s``.
    - Messages from one sender arrive in the order they were sent. ``send`` may be called from several threads
      (sends are serialised); ``recv`` from one thread at a time.
    - A transport may let ``send`` return once the message is safely in memory the peer reads (the ``shm``
      transport with ``window`` > 1: written to shared memory, queued, acknowledgement pending); a failure
      found later is raised by the next ``send`` to that peer or by ``flush(peer, deadline_s)``, which waits
      for every outstanding acknowledgement. Call ``flush`` before reporting a transfer as delivered.
    - ``close()`` is idempotent; later calls raise ``TransportClosed``; peers sending to it get
      ``PeerUnavailable``.
    """

    name: str = ""
    # may ``buffers`` hold torch CUDA tensors (moved device to device on the same host)?
    accepts_device_tensors: bool = False

    def same_host(self, address: str) -> bool:
        """Whether the endpoint at ``address`` runs on this host (one monotonic clock): a paced hand-off's last
        piece may then carry its own ``not_before_s`` instead of a separate commit. Unknown: False."""
        return False

    @property
    @abstractmethod
    def address(self) -> str:
        """Where peers reach this endpoint."""

    @abstractmethod
    def send(self, peer: str, header: Header, buffers: Sequence[Buffer], deadline_s: float) -> None: ...

    @abstractmethod
    def recv(self, timeout_s: float) -> tuple[Header, list[Buffer]]: ...

    @abstractmethod
    def close(self) -> None: ...

    def flush(self, peer: str, deadline_s: float) -> None:  # noqa: B027 - most transports never return early
        """Wait until every message sent to ``peer`` was acknowledged (see the contract); raises TransportError."""

    def __enter__(self: _T) -> _T:  # noqa: PYI019 - typing.Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def remaining_s(deadline_s: float) -> float:
    return deadline_s - time.monotonic()


def buffer_nbytes(buf: Buffer) -> int:
    if isinstance(buf, (bytes, bytearray)):
        return len(buf)
    if isinstance(buf, memoryview):
        return buf.nbytes
    nbytes = getattr(buf, "nbytes", None)  # torch tensors, numpy arrays
    if nbytes is not None:
        return int(nbytes)
    return memoryview(buf).nbytes


def as_bytes_view(buf: Buffer) -> memoryview:
    """A flat unsigned-byte view of a bytes-like buffer or a CPU torch tensor, without copying
    (a CUDA or non-contiguous tensor is copied first)."""
    if hasattr(buf, "untyped_storage"):  # a torch tensor; imported lazily so transports need no torch
        import torch

        return memoryview(buf.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    mv = buf if isinstance(buf, memoryview) else memoryview(buf)
    if mv.ndim != 1 or mv.format != "B":
        mv = mv.cast("B")
    return mv
