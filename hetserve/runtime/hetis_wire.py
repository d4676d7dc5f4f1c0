"""Frames between a Hetis main worker and its attention workers: a 4-byte length, a MessagePack header (a
``hetis_messages`` Struct), then the raw bytes of the tensors the header's ``tensors`` field lists.

Tensors are received straight into fresh CPU tensors (``recv_into``, no intermediate copy). Every receive and
send has the socket's timeout; a peer that closed, died or stayed silent raises :class:`AttnLinkError`.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Sequence
from typing import Any

import msgspec
import torch

from hetserve.core.errors import HetserveError
from hetserve.runtime.hetis_messages import AttnMessage
from hetserve.runtime.messages import TensorMeta

_LEN = struct.Struct("!I")
_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(AttnMessage)
# the dtypes a frame may carry (names as torch spells them without "torch.")
WIRE_DTYPES = {
    name: getattr(torch, name)
    for name in ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int16", "int8", "uint8", "bool")
}
WIRE_DTYPES.update({n: getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)})


class AttnLinkError(HetserveError):
    """An attention worker closed its socket, died, answered with an error or stayed silent too long."""


def tensor_meta(t: torch.Tensor) -> TensorMeta:
    return TensorMeta(dtype=str(t.dtype).removeprefix("torch."), shape=list(t.shape))


def metas(tensors: Sequence[torch.Tensor]) -> list[TensorMeta]:
    return [tensor_meta(t) for t in tensors]


def _host_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().contiguous()
    if t.device.type != "cpu":
        t = t.cpu()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class FrameSocket:
    """One end of a stream socket carrying frames. ``timeout_s`` None: block until the peer speaks or closes."""

    def __init__(self, sock: socket.socket, timeout_s: float | None, peer: str = "peer") -> None:
        self.sock = sock
        self.peer = peer
        sock.settimeout(timeout_s)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, header: msgspec.Struct, tensors: Sequence[torch.Tensor] = ()) -> None:
        """``header.tensors`` (when it has that field) must describe ``tensors`` (see :func:`metas`)."""
        data = _enc.encode(header)
        try:
            self.sock.sendall(_LEN.pack(len(data)) + data)
            for t in tensors:
                if t.numel():
                    self.sock.sendall(_host_bytes(t))
        except TimeoutError:
            raise AttnLinkError(f"{self.peer} did not take a message in time") from None
        except OSError as e:
            raise AttnLinkError(f"{self.peer} went away: {e}") from None

    def _recv_exact(self, buf: memoryview) -> None:
        got = 0
        try:
            while got < len(buf):
                n = self.sock.recv_into(buf[got:], min(len(buf) - got, 1 << 22))
                if n == 0:
                    raise AttnLinkError(f"{self.peer} closed the connection")
                got += n
        except TimeoutError:
            raise AttnLinkError(f"{self.peer} did not answer within {self.sock.gettimeout()} s") from None
        except OSError as e:
            raise AttnLinkError(f"{self.peer} went away: {e}") from None

    def recv(self, type: Any = None) -> tuple[Any, list[torch.Tensor]]:
        """The next frame as (header, tensors); ``type`` decodes a header outside the message union."""
        head = bytearray(_LEN.size)
        self._recv_exact(memoryview(head))
        (n,) = _LEN.unpack(head)
        raw = bytearray(n)
        self._recv_exact(memoryview(raw))
        try:
            header = _dec.decode(raw) if type is None else msgspec.msgpack.decode(raw, type=type)
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            raise AttnLinkError(f"bad frame from {self.peer}: {e}") from None
        tensors = []
        for m in getattr(header, "tensors", None) or []:
            dtype = WIRE_DTYPES.get(m.dtype)
            if dtype is None or any(d < 0 for d in m.shape):
                raise AttnLinkError(f"bad tensor {m.dtype}{m.shape} from {self.peer}")
            t = torch.empty(m.shape, dtype=dtype)
            if t.numel():
                self._recv_exact(memoryview(t.view(-1).view(torch.uint8).numpy()))
            tensors.append(t)
        return header, tensors

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

