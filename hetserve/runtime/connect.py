"""Workers that dial the coordinator over TCP, and where worker processes run (``Placement``).

The default worker is a local subprocess on a socket pair (``worker.py``). A worker elsewhere (a local process
started by hand, a Ray actor on another node) instead connects to the coordinator's ``Listener``::

    python -m hetserve.runtime.worker --connect HOST:PORT --token T     # or the token in $HETSERVE_WORKER_TOKEN

Handshake, every frame length-prefixed MessagePack like the rest of the worker protocol:
worker -> ``Hello{token, pid, host}``; coordinator -> ``Welcome{name}`` or ``Refused{reason}`` (then closes);
after a welcome the coordinator sends the ``WorkerSpec`` and from then on the connection is exactly the socket
pair's (``Channel``): ``WorkerHandle`` cannot tell them apart. Each expected worker has its own random token
(``secrets``), so the token also says which worker is calling; a client with no valid token, a malformed or
oversized hello, or silence past ``handshake_timeout_s`` is dropped without ever seeing a spec. The token
authenticates the worker to the coordinator only; nothing is encrypted (run it inside a trusted network).
"""

from __future__ import annotations

import argparse
import hmac
import os
import secrets
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, Union

import msgspec

from hetserve.core.errors import HetserveError, ValidationError
from hetserve.runtime.worker import Channel, WorkerDied, WorkerSpec, _Process, encode_msg

TOKEN_ENV = "HETSERVE_WORKER_TOKEN"
_MAX_HANDSHAKE_BYTES = 4096
_HEAD = struct.Struct("!Q")


class WorkerRefused(HetserveError):
    """The coordinator refused this worker's connection (wrong or already used token)."""


class _Handshake(msgspec.Struct, tag_field="type", forbid_unknown_fields=True):
    pass


class Hello(_Handshake, tag="hello"):
    token: str
    pid: int
    host: str = ""


class Welcome(_Handshake, tag="welcome"):
    name: str


class Refused(_Handshake, tag="refused"):
    reason: str


_handshake_dec = msgspec.msgpack.Decoder(Union[Hello, Welcome, Refused])  # noqa: UP007 - msgspec needs a Union


def parse_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6HOST]:PORT`` -> (host, port)."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValidationError("connect", f"expected HOST:PORT, got {address!r}")
    return host.strip("[]"), int(port)


def _recv_frame(sock: socket.socket, limit: int) -> Any:
    """One length-prefixed handshake frame (bounded: a stray client cannot make us read gigabytes)."""

    def exact(n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            c = sock.recv(n - len(buf))
            if not c:
                raise EOFError("closed during the handshake")
            buf += c
        return buf

    (n,) = _HEAD.unpack(exact(_HEAD.size))
    if n > limit:
        raise ValueError(f"handshake frame of {n} bytes (limit {limit})")
    return _handshake_dec.decode(exact(n))


def _send_frame(sock: socket.socket, msg: msgspec.Struct) -> None:
    data = encode_msg(msg)
    sock.sendall(_HEAD.pack(len(data)) + data)


def _nodelay(sock: socket.socket) -> None:
    # small control messages each way: without this, Nagle plus delayed ACKs add ~40 ms per step
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# ---- coordinator side ----------------------------------------------------------------------------------
class Listener:
    """The coordinator's TCP port. ``expect(name, first_message)`` issues a token; a worker that presents it is
    welcomed and sent ``first_message`` (its spec) at once, by a background thread, whatever the coordinator is
    waiting on (so workers load in parallel, and pipeline stages that wait for each other all start), and is
    handed out by ``accept(name, ...)``. Each handshake runs in its own short-lived thread, bounded by
    ``handshake_timeout_s``, so a silent client delays nobody."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, advertise_host: str | None = None,
                 handshake_timeout_s: float = 5.0) -> None:
        try:
            self.sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                             backlog=64)
        except OSError as e:
            raise ValidationError("listen_host", f"cannot listen on {host}:{port}: {e}") from None
        self.port = self.sock.getsockname()[1]
        if advertise_host is None:
            advertise_host = host if host not in ("0.0.0.0", "::", "") else socket.gethostname()
        self.address = f"[{advertise_host}]:{self.port}" if ":" in advertise_host else f"{advertise_host}:{self.port}"
        self.handshake_timeout_s = handshake_timeout_s
        self._expected: dict[str, tuple[str, bytes]] = {}  # token -> (worker name, first message)
        self._accepted: dict[str, tuple[Channel, Hello]] = {}
        self.refused: list[str] = []  # why each refused client was dropped (tests, logs)
        self._cv = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._serve, name=f"hetserve-listener:{self.port}", daemon=True)
        self._thread.start()

    def expect(self, name: str, first_message: bytes) -> str:
        token = secrets.token_urlsafe(24)
        with self._cv:
            self._expected[token] = (name, first_message)
        return token

    def accept(self, name: str, timeout_s: float, is_alive: Callable[[], bool] = lambda: True) -> tuple[Channel, Hello]:
        """The named worker's connection (spec already sent). WorkerDied when its process ends first or it does
        not connect within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while name not in self._accepted:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise WorkerDied(f"worker {name} did not connect to {self.address} within {timeout_s:.1f} s")
                if not is_alive():
                    raise WorkerDied(f"worker {name} exited before connecting to {self.address}")
                self._cv.wait(min(left, 0.1))
            return self._accepted.pop(name)

    def wait_refused(self, n: int, timeout_s: float) -> bool:
        """True once ``n`` clients were refused (tests)."""
        with self._cv:
            return self._cv.wait_for(lambda: len(self.refused) >= n, timeout_s)

    def _serve(self) -> None:
        while not self._closed:
            try:
                r, _, _ = select.select([self.sock], [], [], 0.2)
                if not r:
                    continue
                conn, peer = self.sock.accept()
            except (OSError, ValueError):  # closed under us
                if self._closed:
                    return
                continue
            threading.Thread(target=self._handshake, args=(conn, peer), daemon=True).start()

    def _handshake(self, conn: socket.socket, peer: Any) -> None:
        conn.settimeout(self.handshake_timeout_s)
        try:
            hello = _recv_frame(conn, _MAX_HANDSHAKE_BYTES)
            if not isinstance(hello, Hello):
                self._refuse(conn, f"{peer}: bad handshake (a {type(hello).__name__}, not a hello)")
                return
            with self._cv:
                match = next((t for t in self._expected if hmac.compare_digest(t.encode(), hello.token.encode())),
                             None)
                entry = self._expected.pop(match) if match is not None else None  # a token admits one connection
            if entry is None:
                self._refuse(conn, f"{peer}: wrong token")
                return
            name, first = entry
            _send_frame(conn, Welcome(name=name))
            conn.settimeout(None)
            _nodelay(conn)
            chan = Channel(conn)
            chan.send_bytes(first)
        except (OSError, EOFError, ValueError, msgspec.DecodeError) as e:
            self._refuse(conn, f"{peer}: bad handshake ({type(e).__name__}: {e})")
            return
        with self._cv:
            if self._closed:
                chan.close()
                return
            self._accepted[name] = (chan, hello)
            self._cv.notify_all()

    def _refuse(self, conn: socket.socket, reason: str) -> None:
        try:
            _send_frame(conn, Refused(reason=reason.split(": ", 1)[-1]))
        except OSError:
            pass
        conn.close()
        with self._cv:
            self.refused.append(reason)
            self._cv.notify_all()

    def close(self) -> None:
        with self._cv:
            self._closed = True
            for chan, _ in self._accepted.values():
                chan.close()
            self._accepted.clear()
        self.sock.close()
        self._thread.join(1.0)


class Placement(Protocol):
    """Where worker processes run. ``launch`` starts one (returns a process-like object: ``pid``,
    ``is_alive()``, ``exitcode``, ``join(timeout)``, ``terminate()``, ``kill()``) without waiting; ``connect``
    waits until that worker is connected and has been sent its spec; ``close`` releases the placement's
    resources after every worker stopped. ``WorkerHandle(spec, placement)`` uses it; ``None`` is the socket pair."""

    def launch(self, spec: WorkerSpec) -> Any: ...

    def connect(self, spec: WorkerSpec, process: Any, timeout_s: float) -> Channel: ...

    def close(self) -> None: ...


class TcpPlacement:
    """Local worker subprocesses that connect back over TCP (the Ray backend's protocol without Ray)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.listener = Listener(host, port)

    def launch(self, spec: WorkerSpec) -> _Process:
        token = self.listener.expect(spec.name, encode_msg(spec))
        env = {**os.environ, TOKEN_ENV: token}  # not on the command line, where `ps` shows it
        return _Process(subprocess.Popen(
            [sys.executable, "-m", "hetserve.runtime.worker", "--connect", self.listener.address], env=env,
        ))

    def connect(self, spec: WorkerSpec, process: Any, timeout_s: float) -> Channel:
        chan, _ = self.listener.accept(spec.name, timeout_s, process.is_alive)
        return chan

    def close(self) -> None:
        self.listener.close()


def make_placement(backend: str, nodes: dict[str, str], *, listen_host: str = "127.0.0.1", listen_port: int = 0,
                   ray_address: str | None = None, ray_options: dict[str, Any] | None = None) -> Placement | None:
    """``local`` (socket pairs: None), ``tcp`` (local processes over TCP) or ``ray`` (``nodes``: instance name ->
    cluster node name, placed by the Ray resource ``hetserve_node_<node>``)."""
    if backend == "local":
        return None
    if backend == "tcp":
        return TcpPlacement(listen_host, listen_port)
    if backend == "ray":
        from hetserve.runtime.ray_backend import RayPlacement

        return RayPlacement(nodes, address=ray_address, listen_host=listen_host, listen_port=listen_port,
                            **(ray_options or {}))
    raise ValidationError("backend", f"unknown backend {backend!r}; known: local, tcp, ray")


# ---- worker side ---------------------------------------------------------------------------------------
def connect_to_coordinator(address: str, token: str, timeout_s: float = 30.0) -> Channel:
    """Dial the coordinator (retrying while its port is not open yet), present the token; the returned
    channel's next message is this worker's spec. WorkerRefused when the coordinator says no."""
    host, port = parse_address(address)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            sock = socket.create_connection((host, port), timeout=max(0.1, deadline - time.monotonic()))
            break
        except (ConnectionRefusedError, TimeoutError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)
    try:
        _send_frame(sock, Hello(token=token, pid=os.getpid(), host=socket.gethostname()))
        reply = _recv_frame(sock, _MAX_HANDSHAKE_BYTES)
    except (OSError, EOFError) as e:
        sock.close()
        raise WorkerRefused(f"{address} closed the connection during the handshake: {e}") from None
    if not isinstance(reply, Welcome):
        sock.close()
        raise WorkerRefused(f"{address} refused this worker: {getattr(reply, 'reason', reply)}")
    sock.settimeout(None)
    _nodelay(sock)
    return Channel(sock)


def channel_from_argv(argv: list[str]) -> Channel:
    """``--connect HOST:PORT [--token T]`` (``worker.py``'s ``__main__``); exits 2 when refused."""
    p = argparse.ArgumentParser(prog="python -m hetserve.runtime.worker")
    p.add_argument("--connect", required=True, metavar="HOST:PORT", help="the coordinator's listener")
    p.add_argument("--token", default=os.environ.get(TOKEN_ENV), help=f"the worker's token (default ${TOKEN_ENV})")
    p.add_argument("--timeout-s", type=float, default=30.0, help="give up connecting after this long")
    args = p.parse_args(argv)
    if not args.token:
        p.error(f"--token or ${TOKEN_ENV} is required")
    try:
        return connect_to_coordinator(args.connect, args.token, args.timeout_s)
    except (WorkerRefused, OSError, ValidationError) as e:
        print(f"hetserve worker: {e}", file=sys.stderr)
        raise SystemExit(2) from None
