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
