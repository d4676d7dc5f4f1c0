"""Hidden states between the stages of a pipeline-parallel instance, worker to worker (not via the coordinator).

Stage ``s + 1`` (TP rank ``r``) listens on a TCP port it was given at launch; stage ``s`` (rank ``r``) connects
to it at its first send and presents the instance's token (a stray client is dropped). Per step the
sender writes one length-prefixed MessagePack header (``StageTensors``: the step id, each tensor's dtype and
shape) and then each tensor's raw bytes: no pickle. The receiver checks the step id against the step it is
executing: both run the coordinator's steps in the same order, so a mismatch is a bug, not a race.

Device tensors go through host memory (one copy each way); on one host a CUDA IPC path would save both.
"""

from __future__ import annotations

import hmac
import socket
import struct
import time

import msgspec
import torch

from hetserve.core.errors import HetserveError
from hetserve.runtime.messages import TensorMeta

_HEAD = struct.Struct("!Q")
_MAX_HEADER_BYTES = 1 << 16


class StageLinkError(HetserveError):
    """The neighbouring stage went away, or sent something that is not the expected step."""


class StageTensors(msgspec.Struct, tag="stage_tensors", forbid_unknown_fields=True):
    step_id: int
    tensors: list[TensorMeta]


class _Hello(msgspec.Struct, tag="stage_hello", forbid_unknown_fields=True):
    token: str


_enc = msgspec.msgpack.Encoder()
_header_dec = msgspec.msgpack.Decoder(StageTensors)
_hello_dec = msgspec.msgpack.Decoder(_Hello)


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (for a TP group's store or a stage's listening socket)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _nodelay(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise StageLinkError("the neighbouring pipeline stage closed its link")
        got += k
    return buf


def _send_frame(sock: socket.socket, data: bytes) -> None:
    sock.sendall(_HEAD.pack(len(data)) + data)


def _recv_frame(sock: socket.socket, limit: int) -> bytearray:
    (n,) = _HEAD.unpack(_recv_exact(sock, _HEAD.size))
    if n > limit:
        raise StageLinkError(f"a {n}-byte header from the previous stage (limit {limit})")
    return _recv_exact(sock, n)


class StageLink:
    """One worker's links: ``listen`` (``host:port``, stages after the first) takes the previous stage's
    connection; ``next_address`` (stages before the last) is where the next stage listens."""

    def __init__(self, listen: str, next_address: str, token: str, timeout_s: float = 120.0) -> None:
        self.token = token
        self.timeout_s = timeout_s
        self.next_address = next_address
        self._server: socket.socket | None = None
        self._prev: socket.socket | None = None
        self._next: socket.socket | None = None
        if listen:
            host, port = split_address(listen)
            self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._server.bind((host, port))
            self._server.listen(4)

    # ---- set-up ----------------------------------------------------------------------------------
    def connect_next(self) -> None:
        """Dial the next stage (retrying while it is still starting) and present the token."""
        if not self.next_address or self._next is not None:
            return
        host, port = split_address(self.next_address)
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                sock = socket.create_connection((host, port), timeout=5.0)
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise StageLinkError(f"cannot reach the next stage at {self.next_address}: {e}") from None
                time.sleep(0.05)
        sock.settimeout(None)
        _send_frame(_nodelay(sock), _enc.encode(_Hello(token=self.token)))
        self._next = sock

    def _accept_prev(self) -> socket.socket:
        assert self._server is not None
        self._server.settimeout(self.timeout_s)
        while True:
            try:
                conn, _ = self._server.accept()
            except TimeoutError:
                raise StageLinkError(f"the previous stage did not connect within {self.timeout_s:.0f} s") from None
            conn.settimeout(5.0)
            try:
                hello = _hello_dec.decode(_recv_frame(conn, 1024))
                ok = hmac.compare_digest(hello.token, self.token)
            except (OSError, StageLinkError, msgspec.DecodeError):
                ok = False
            if ok:
                conn.settimeout(None)
                return _nodelay(conn)
            conn.close()  # not our previous stage

    # ---- per step --------------------------------------------------------------------------------
    def send(self, step_id: int, tensors: list[torch.Tensor]) -> None:
        if self._next is None:
            self.connect_next()
        assert self._next is not None
        host = [t.detach().contiguous().cpu() for t in tensors]
        metas = [TensorMeta(dtype=str(t.dtype).removeprefix("torch."), shape=list(t.shape)) for t in host]
        try:
            _send_frame(self._next, _enc.encode(StageTensors(step_id=step_id, tensors=metas)))
            for t in host:
                self._next.sendall(memoryview(t.view(torch.uint8).numpy()))
        except OSError as e:
            raise StageLinkError(f"the next pipeline stage went away: {e}") from None

    def recv(self, step_id: int, device: torch.device) -> list[torch.Tensor]:
        if self._prev is None:
            self._prev = self._accept_prev()
        try:
            head = _header_dec.decode(_recv_frame(self._prev, _MAX_HEADER_BYTES))
        except msgspec.DecodeError as e:
            raise StageLinkError(f"bad header from the previous stage: {e}") from None
        except OSError as e:
            raise StageLinkError(f"the previous pipeline stage went away: {e}") from None
        if head.step_id != step_id:
            raise StageLinkError(f"the previous stage sent step {head.step_id} while this one runs step {step_id}")
        out = []
        for m in head.tensors:
            dtype = getattr(torch, m.dtype, None)
            if not isinstance(dtype, torch.dtype):
                raise StageLinkError(f"unknown dtype {m.dtype!r} from the previous stage")
            n = dtype.itemsize
            for d in m.shape:
                n *= d
            try:
                buf = _recv_exact(self._prev, n)
            except OSError as e:
                raise StageLinkError(f"the previous pipeline stage went away: {e}") from None
            t = (
                torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(m.shape)
                if n
                else torch.empty(m.shape, dtype=dtype)
            )
            out.append(t.to(device))
        return out

    def close(self) -> None:
        for s in (self._next, self._prev, self._server):
            if s is not None:
                try:
                    s.close()
                except OSError:
                    pass
