"""GPU paths of KV transfer: CUDA caches through the engine, and CUDA IPC between two processes (shm)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from hetserve.runtime.kv_layout import KVDescriptor
from hetserve.runtime.kv_transfer import KVTransferEngine
from hetserve.runtime.transport import make_transport

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("kind", ["local", "shm", "tcp"])
def test_cuda_caches_pd_case(kind: str) -> None:
    src = KVDescriptor(num_layers=2, num_kv_heads=4, head_dim=64, block_size=16, dtype="bfloat16", tp_size=2)
    dst = KVDescriptor(num_layers=2, num_kv_heads=4, head_dim=64, block_size=32, dtype="float32", layout="HND")
    g = torch.Generator(device="cuda").manual_seed(0)
    src_caches = [[torch.randn(2, 8, 16, 2, 64, device="cuda", generator=g).to(torch.bfloat16) for _ in range(2)]
                  for _ in range(2)]
    dst_cache = [torch.zeros(2, 8, 4, 32, 64, device="cuda") for _ in range(2)]
    senders = [KVTransferEngine(make_transport(kind), src.for_rank(r), src_caches[r]) for r in range(2)]
    recv = KVTransferEngine(make_transport(kind), dst, dst_cache)
    try:
        n, src_table, dst_table = 70, [3, 1, 7, 0, 5], [6, 2, 4]
        recv.expect("t", "r", dst_table, n, src, time.monotonic() + 10)
        for s in senders:
            assert s.send(recv.transport.address, dst, "t", "r", src_table, n, time.monotonic() + 10).success
        (res,) = recv.poll(5)
        assert res.success
        for p in range(n):
            for r in range(2):
                for h in range(2):
                    want = src_caches[r][1][:, src_table[p // 16], p % 16, h].float()
                    got = dst_cache[1][:, dst_table[p // 32], 2 * r + h, p % 32]
                    assert torch.equal(got, want)
    finally:
        for e in (*senders, recv):
            e.transport.close()


_CHILD = textwrap.dedent("""
    import sys, time, torch
    from hetserve.runtime.transport import make_transport
    t = make_transport("shm")
    print(t.address, flush=True)
    header, bufs = t.recv(60)
    x = bufs[0]
    t.send(header["reply_to"], {"is_cuda": bool(x.is_cuda), "sum": float(x.double().sum()),
                                "dtype": str(x.dtype), "shape": list(x.shape)}, [], time.monotonic() + 30)
    t.close()
""")


def test_cuda_ipc_between_processes() -> None:
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        peer = proc.stdout.readline().strip()
        x = torch.arange(3 * 1024 * 1024, device="cuda", dtype=torch.float32).view(3, -1)[:, 5:]  # a view
        with make_transport("shm") as a:
            assert a.accepts_device_tensors
            a.send(peer, {"reply_to": a.address}, [x], time.monotonic() + 60)
            x.fill_(-1)  # the peer copied before it acknowledged
            header, _ = a.recv(60)
        want = torch.arange(3 * 1024 * 1024, dtype=torch.float64).view(3, -1)[:, 5:].sum()
        assert header["is_cuda"] and header["shape"] == [3, 1024 * 1024 - 5]
        assert header["sum"] == float(want)
        assert proc.wait(60) == 0
    finally:
        proc.kill()


_CHILD_MANY = textwrap.dedent("""
    import sys, time, torch
    from hetserve.runtime.transport import make_transport
    t = make_transport("shm")
    print(t.address, flush=True)
    sums = []
    while True:
        header, bufs = t.recv(60)
        if header.get("stop"):
            break
        sums.append([[float(b.double().sum()), list(b.shape), str(b.dtype), bool(b.is_cuda)] for b in bufs])
    t.send(header["reply_to"], {"sums": sums, "opened": len(t._imported.opened)}, [], time.monotonic() + 30)
    t.close()
""")


def test_cuda_ipc_staging_is_exported_once_and_opened_once() -> None:
    """Many messages of several CUDA tensors each go through one staging buffer (grown once): the receiver opens
    one IPC handle per staging buffer, not one per tensor per message; a message over the staging cap still
    goes (one export per tensor); every value arrives."""
    from hetserve.runtime.transport.shm import buffers_ready

    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HETSERVE_SHM_STAGING_MAX_MB": "64"}
    os.environ["HETSERVE_SHM_STAGING_MAX_MB"] = "64"
    proc = subprocess.Popen([sys.executable, "-c", _CHILD_MANY], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        peer = proc.stdout.readline().strip()
        want = []
        with make_transport("shm") as a:
            for i, numel in enumerate([1000, 3 << 20, 2 << 20, 1000, 20 << 20]):  # the last: over 64 MiB in all
                xs = [torch.full((numel,), float(i + j), device="cuda", dtype=torch.bfloat16 if j else torch.float32)
                      for j in range(4)]
                if i % 2:
                    torch.cuda.synchronize()
                    with buffers_ready():
                        a.send(peer, {"i": i}, xs, time.monotonic() + 60)
                else:
                    a.send(peer, {"i": i}, xs, time.monotonic() + 60)
                for x in xs:
                    x.fill_(-7)  # the peer copied before it acknowledged
                want.append([[float(i + j) * numel, [numel], "torch.bfloat16" if j else "torch.float32", True]
                             for j in range(4)])
            a.send(peer, {"stop": True, "reply_to": a.address}, [], time.monotonic() + 60)
            header, _ = a.recv(60)
        assert header["sums"] == want
        assert header["opened"] == 2  # 16 MiB first, then grown once (30 MiB); the 200 MiB one exported apart
        assert proc.wait(60) == 0
    finally:
        os.environ.pop("HETSERVE_SHM_STAGING_MAX_MB", None)
        proc.kill()


_CHILD_SINK = textwrap.dedent("""
    import time, torch
    from hetserve.runtime.transport import make_transport
    t = make_transport("shm")
    seen = []
    def sink(header, bufs, arrived_s):
        if not header.get("sink"):
            return False
        time.sleep(0.05)  # the sender waits meanwhile: its staging stays as it was until the ack
        seen.append([[float(b.double().sum()), list(b.shape), str(b.dtype), bool(b.is_cuda)] for b in bufs])
        torch.cuda.synchronize()
        return True
    t.sink = sink
    print(t.address, flush=True)
    queued = []
    while True:
        header, bufs = t.recv(60)
        if header.get("stop"):
            break
        queued.append(sorted(header))
    t.send(header["reply_to"], {"seen": seen, "queued": queued}, [], time.monotonic() + 30)
    t.close()
""")


def test_cuda_ipc_sink_reads_the_staging_before_the_ack() -> None:
    """A receiver's ``sink`` gets the sender's CUDA buffers as views of its staging (no copy) and the sender's
    ``send`` returns only after the sink is done; a consumed message is not queued (a wake-up is), one the sink
    declines is."""
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD_SINK], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        peer = proc.stdout.readline().strip()
        with make_transport("shm") as a:
            xs = [torch.full((3 << 20,), 2.0, device="cuda"), torch.full((1000,), 3.0, device="cuda",
                                                                      dtype=torch.bfloat16)]
            t0 = time.monotonic()
            a.send(peer, {"sink": True}, xs, time.monotonic() + 60)
            assert time.monotonic() - t0 >= 0.05  # acknowledged once the sink returned, not on arrival
            for x in xs:
                x.fill_(-7)
            a.send(peer, {"sink": False}, [xs[0]], time.monotonic() + 60)
            a.send(peer, {"stop": True, "reply_to": a.address}, [], time.monotonic() + 60)
            header, _ = a.recv(60)
        assert header["seen"] == [[[2.0 * (3 << 20), [3 << 20], "torch.float32", True],
                                   [3000.0, [1000], "torch.bfloat16", True]]]  # one message, two buffers
        assert header["queued"] == [["sunk"], ["sink"]]  # the wake-up, then the declined message
        assert proc.wait(60) == 0
    finally:
        proc.kill()


_CHILD_SLOW_SINK = textwrap.dedent("""
    import time, torch
    from hetserve.runtime.transport import make_transport
    t = make_transport("shm")
    seen = []
    def sink(header, bufs, arrived_s):
        if "i" not in header:
            return False
        time.sleep(0.03)  # a slow receiver: the sender's window fills with unacknowledged messages
        seen.append([header["i"], [float(b.double().sum()) for b in bufs]])
        torch.cuda.synchronize()
        return True
    t.sink = sink
    print(t.address, flush=True)
    while True:
        header, bufs = t.recv(60)
        if header.get("stop"):
            break
        if "i" in header:  # exported one by one (the ring was full): not lent to the sink, queued instead
            seen.append([header["i"], [float(b.double().sum()) for b in bufs]])
    t.send(header["reply_to"], {"seen": seen, "opened": len(t._imported.opened)}, [], time.monotonic() + 30)
    t.close()
""")


@pytest.mark.parametrize("max_mb", ["64", "16"], ids=["ring", "ring-full"])
def test_cuda_ipc_window_stages_each_message_in_its_own_range(max_mb: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``window`` > 1, CUDA messages to a slow receiver return before their acknowledgement: each is staged
    in a range of the ring held until it is acknowledged, so the caller may overwrite its tensors at once and no
    later message overwrites an earlier one's bytes. A ring that may not grow (16 MiB, 6 MiB messages) sends the
    rest exported one by one, acknowledged before ``send`` returns; every value arrives either way."""
    monkeypatch.setenv("HETSERVE_SHM_STAGING_MAX_MB", max_mb)
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD_SLOW_SINK], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        peer = proc.stdout.readline().strip()
        numel = (1 << 19) if max_mb == "64" else (3 << 19)  # 2 MiB (six fit in the first 16 MiB) or 6 MiB
        with make_transport("shm", window=8) as a:
            x = torch.empty(numel, device="cuda")
            t0 = time.monotonic()
            for i in range(6):
                x.fill_(float(i + 1))
                a.send(peer, {"i": i}, [x], time.monotonic() + 60)
            sent_s = time.monotonic() - t0
            a.flush(peer, time.monotonic() + 60)
            a.send(peer, {"stop": True, "reply_to": a.address}, [], time.monotonic() + 60)
            header, _ = a.recv(60)
        assert sorted(header["seen"]) == [[i, [float(i + 1) * numel]] for i in range(6)]
        if max_mb == "64":
            assert sent_s < 6 * 0.03  # the sends did not wait for the slow receiver one by one
            assert header["opened"] == 1  # one staging buffer, its ranges reused
        assert proc.wait(60) == 0
    finally:
        proc.kill()
