"""The CUDA staging ring between two processes (``gpu``): sends return once the receiver has enqueued its copy,
spans come back after the copy, a full ring makes the sender wait, and no message is overwritten in flight."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from hetserve.runtime.transport import make_transport

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

_CHILD = textwrap.dedent("""
    import sys, time, torch
    from hetserve.runtime.transport import make_transport
    t = make_transport("shm")
    print(t.address, flush=True)
    got, held = [], []
    slow = float(sys.argv[1])
    while True:
        header, bufs = t.recv(60)
        if header.get("stop"):
            break
        if header.get("ping"):
            continue
        time.sleep(slow)  # a busy receiver: the sender's ring fills up
        held.append(bufs)  # kept: views of the copies, never of the sender's ring
        got.append([float(b.double().sum()) for b in bufs])
    torch.cuda.synchronize()
    again = [[float(b.double().sum()) for b in bufs] for bufs in held]
    t.send(header["reply_to"], {"got": got, "again": again}, [], time.monotonic() + 30)
    t.close()
""")


@pytest.mark.parametrize("slow_s", [0.0, 0.005])
def test_ring_streams_without_overwriting_a_span_in_flight(slow_s: float) -> None:
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(slow_s)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        peer = proc.stdout.readline().strip()
        n, numel = 40, 2 << 20  # 8 MiB fp32 + 4 MiB bf16 a message; the first ring is 24 MiB (two of them)
        x = torch.empty(numel, device="cuda", dtype=torch.float32)
        y = torch.empty(numel, device="cuda", dtype=torch.bfloat16)
        want = []
        with make_transport("shm", window=8) as a:
            t0 = time.perf_counter()
            for i in range(n):
                x.fill_(float(i))
                y.fill_(float(i % 7))
                a.send(peer, {"i": i}, [x, y], time.monotonic() + 60)  # x, y rewritten right after: staged
                want.append([float(i) * numel, float(i % 7) * numel])
            a.flush(peer, time.monotonic() + 60)
            took = time.perf_counter() - t0
            rings = [st.ring for st in a._staging.values()]  # type: ignore[attr-defined]
            deadline = time.monotonic() + 5
            while any(r.held for r in rings) and time.monotonic() < deadline:
                time.sleep(0.05)
                a.send(peer, {"ping": True}, [], time.monotonic() + 5)  # takes the span releases that came
            assert not any(r.held for r in rings)  # every copy completed and was reported
            a.send(peer, {"stop": True, "reply_to": a.address}, [], time.monotonic() + 60)
            header, _ = a.recv(60)
        assert header["got"] == want and header["again"] == want
        assert len(rings) == 1 and rings[0].capacity == 24 << 20
        print(f"{n} x 12 MiB in {took * 1e3:.1f} ms ({n * 12 / 1024 / took:.2f} GiB/s)")
        assert proc.wait(60) == 0
    finally:
        proc.kill()


def test_dead_receiver_fails_a_send_waiting_for_room_and_retires_the_ring() -> None:
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, "30"], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        peer = proc.stdout.readline().strip()
        x = torch.ones(4 << 20, device="cuda")  # 16 MiB: the ring (32 MiB) holds two
        with make_transport("shm", window=8) as a:
            for _ in range(2):
                a.send(peer, {}, [x], time.monotonic() + 60)
            proc.kill()  # its copies were enqueued; it will never report them
            t0 = time.monotonic()
            with pytest.raises(Exception) as err:
                for _ in range(4):
                    a.send(peer, {}, [x], time.monotonic() + 10)
                a.flush(peer, time.monotonic() + 10)
            assert type(err.value).__name__ in ("PeerUnavailable", "TransferTimeout", "TransportError")
            assert time.monotonic() - t0 < 5
            assert a._staging == {}  # type: ignore[attr-defined]  # retired with the peer, never rewritten
    finally:
        proc.kill()
