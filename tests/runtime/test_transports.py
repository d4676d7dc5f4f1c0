"""Transports move multi-MiB payloads intact, fail promptly and cleanly on deadlines and dead peers."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest
import zmq

from hetserve.runtime.messages import KVCommit
from hetserve.runtime.transport import (
    TRANSPORTS,
    PeerUnavailable,
    TransferTimeout,
    Transport,
    TransportClosed,
    TransportError,
    make_transport,
    transport_availability,
)
from hetserve.runtime.transport.shm import live_segments

KINDS = ["local", "shm", "tcp"]


@pytest.fixture
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[Transport, Transport]]:
    a, b = make_transport(request.param), make_transport(request.param)
    yield a, b
    a.close()
    b.close()


def payload(num_bytes: int, seed: int) -> bytes:
    return hashlib.shake_256(seed.to_bytes(4, "little")).digest(num_bytes)


@pytest.mark.parametrize("pair", KINDS, indirect=True)
def test_multi_mib_payload_arrives_intact_and_in_order(pair: tuple[Transport, Transport]) -> None:
    a, b = pair
    bufs = [payload(6 * 2**20 + 3, 1), b"", memoryview(payload(2**20, 2))[5:], bytearray(payload(777, 3))]
    a.send(b.address, KVCommit(transfer_id="t", req_id="r", src_rank=1), bufs, time.monotonic() + 10)
    a.send(b.address, {"n": 2, "blob": b"\x00\x01"}, [b"tiny"], time.monotonic() + 10)
    header, got = b.recv(5)
    assert header == KVCommit(transfer_id="t", req_id="r", src_rank=1)
    assert [bytes(g) for g in got] == [bytes(x) for x in bufs]
    header, got = b.recv(5)
    assert header == {"n": 2, "blob": b"\x00\x01"} and [bytes(g) for g in got] == [b"tiny"]
    with pytest.raises(TransferTimeout):
        b.recv(0.01)
    assert live_segments() == []


@pytest.mark.parametrize("pair", KINDS, indirect=True)
def test_sender_may_reuse_its_buffer_after_send(pair: tuple[Transport, Transport]) -> None:
    a, b = pair
    buf = bytearray(payload(2**20, 4))
    original = bytes(buf)
    a.send(b.address, {}, [buf], time.monotonic() + 10)
    buf[:] = b"\xff" * len(buf)
    _, got = b.recv(5)
    assert bytes(got[0]) == original


@pytest.mark.parametrize("pair", KINDS, indirect=True)
def test_dead_peer_is_an_explicit_error(pair: tuple[Transport, Transport]) -> None:
    a, b = pair
    a.send(b.address, {}, [b"x"], time.monotonic() + 5)
    b.recv(5)
    b.close()
    t0 = time.monotonic()
    with pytest.raises(PeerUnavailable):
        a.send(b.address, {}, [payload(2**20, 5)], time.monotonic() + 5)
    assert time.monotonic() - t0 < 2.0
    assert getattr(a, "num_peer_connections", 0) == 0 and live_segments() == []
    with pytest.raises(TransportClosed):
        b.recv(0.01)


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_peer_is_an_explicit_error(kind: str) -> None:
    with make_transport(kind) as a:
        peer = "local://nobody" if kind == "local" else "tcp://127.0.0.1:1"
        t0 = time.monotonic()
        with pytest.raises(PeerUnavailable):
            a.send(peer, {}, [b"x"], time.monotonic() + 10)
        assert time.monotonic() - t0 < 3.0


@pytest.mark.parametrize("kind", ["shm", "tcp"])
def test_stalled_peer_times_out_promptly_and_cleanly(kind: str) -> None:
    """A peer that takes the connection but never acknowledges: TransferTimeout at the deadline."""
    ctx = zmq.Context()
    silent = ctx.socket(zmq.ROUTER)
    silent.setsockopt(zmq.LINGER, 0)
    silent.bind("tcp://127.0.0.1:*")
    try:
        with make_transport(kind) as a:
            t0 = time.monotonic()
            with pytest.raises(TransferTimeout):
                a.send(silent.getsockopt(zmq.LAST_ENDPOINT).decode(), {}, [payload(3 * 2**20, 6)], t0 + 0.3)
            took = time.monotonic() - t0
            assert 0.29 <= took < 1.0
            assert a.num_peer_connections == 0  # type: ignore[attr-defined]
            assert live_segments() == []
    finally:
        silent.close()
        ctx.term()


def test_local_full_inbox_times_out_and_leaves_nothing_queued() -> None:
    with make_transport("local", max_queued=1) as a, make_transport("local", max_queued=1) as b:
        a.send(b.address, {"i": 0}, [], time.monotonic() + 1)
        with pytest.raises(TransferTimeout):
            a.send(b.address, {"i": 1}, [], time.monotonic() + 0.1)
        assert b.recv(1)[0] == {"i": 0}
        with pytest.raises(TransferTimeout):
            b.recv(0.05)


def test_a_pickle_is_refused_on_the_socket() -> None:
    import pickle  # only to build the hostile bytes; the runtime never imports it

    with make_transport("tcp") as b:
        ctx = zmq.Context()
        d = ctx.socket(zmq.DEALER)
        d.setsockopt(zmq.LINGER, 0)
        d.connect(b.address)
        d.send_multipart([pickle.dumps({"msg_id": 1}), pickle.dumps(object)])
        assert d.poll(5000)
        reply = d.recv()
        assert b"not a MessagePack message" in reply
        with pytest.raises(TransferTimeout):
            b.recv(0.05)
        d.close()
        ctx.term()


_ECHO = textwrap.dedent("""
    import hashlib, sys, time
    from hetserve.runtime.transport import make_transport
    t = make_transport(sys.argv[1])
    print(t.address, flush=True)
    header, bufs = t.recv(30)
    digests = [hashlib.sha256(b).hexdigest() for b in bufs]
    t.send(header["reply_to"], {"digests": digests}, [], time.monotonic() + 30)
    t.close()
""")


@pytest.mark.parametrize("kind", ["shm", "tcp"])
def test_across_processes(kind: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", _ECHO, kind], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        peer = proc.stdout.readline().strip()
        bufs = [payload(5 * 2**20, 7), payload(1000, 8)]
        with make_transport(kind) as a:
            a.send(peer, {"reply_to": a.address}, bufs, time.monotonic() + 30)
            header, _ = a.recv(30)
        assert header["digests"] == [hashlib.sha256(b).hexdigest() for b in bufs]
        assert proc.wait(30) == 0
    finally:
        proc.kill()
    assert live_segments() == []


def test_registry_and_availability() -> None:
    assert TRANSPORTS.names() == ["local", "nixl", "shm", "tcp"]
    avail = transport_availability()
    assert avail["local"] is None and avail["tcp"] is None and avail["shm"] is None
    try:
        import nixl  # noqa: F401
    except ImportError:
        assert avail["nixl"] is not None and "NIXL" in avail["nixl"]
        with pytest.raises(TransportError, match="nixl.*unavailable.*NIXL"):
            make_transport("nixl")
    with pytest.raises(KeyError, match="registered: local, nixl, shm, tcp"):
        make_transport("carrier-pigeon")


def test_tcp_bound_to_all_interfaces_advertises_a_reachable_address() -> None:
    with make_transport("tcp", bind="tcp://0.0.0.0:*", advertise="tcp://127.0.0.1:{port}") as b, \
            make_transport("tcp") as a:
        assert b.address.startswith("tcp://127.0.0.1:") and not b.address.endswith("{port}")
        a.send(b.address, {"x": 1}, [b"y"], time.monotonic() + 5)
        header, bufs = b.recv(5)
        assert header == {"x": 1} and bytes(bufs[0]) == b"y"


def test_shm_close_removes_its_socket_file() -> None:
    t = make_transport("shm")
    path = t.address.removeprefix("ipc://")
    assert os.path.exists(path)
    t.close()
    t.close()  # idempotent
    assert not os.path.exists(path)


def test_a_stalled_peer_does_not_hold_up_others_or_close() -> None:
    import threading

    ctx = zmq.Context()
    silent = ctx.socket(zmq.ROUTER)
    silent.setsockopt(zmq.LINGER, 0)
    silent.bind("tcp://127.0.0.1:*")
    errors: list[Exception] = []
    a, b = make_transport("tcp"), make_transport("tcp")

    def stalled() -> None:
        try:
            a.send(silent.getsockopt(zmq.LAST_ENDPOINT).decode(), {}, [b"x"], time.monotonic() + 5)
        except Exception as e:  # noqa: BLE001 - recorded for the assertion below
            errors.append(e)

    th = threading.Thread(target=stalled)
    th.start()
    try:
        time.sleep(0.1)
        t0 = time.monotonic()
        a.send(b.address, {"ok": True}, [b"y"], time.monotonic() + 5)
        assert time.monotonic() - t0 < 1.0
        assert b.recv(1)[0] == {"ok": True}
        t0 = time.monotonic()
        a.close()  # aborts the stalled send instead of waiting for its deadline
        th.join(2)
        assert not th.is_alive() and time.monotonic() - t0 < 1.5
        assert len(errors) == 1 and isinstance(errors[0], TransportClosed)
    finally:
        a.close()
        b.close()
        silent.close()
        ctx.term()
