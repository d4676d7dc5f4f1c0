"""The same-host KV transport (``shm``) on the CPU: per-message send cost, stream bandwidth, paced hand-offs.

    python benchmarks/kv_stream.py [--repeats 5] [--out benchmarks/results/kv_stream_cpu.json]

Two processes: this one sends, a receiver subprocess (``--role receiver``) takes the messages. Per size
(64 KiB .. 64 MiB, one buffer per message, as a packed KV piece):

- ``send_s``: one ``ShmTransport.send`` call, idle link (the median over the repeats). What the sender thread
  of a hand-off pays per message before it can go on.
- ``rtt_s``: send -> the receiver's main thread has the message and answered (a small message back).
- ``stream``: ``n`` messages back to back (the way Cronus streams layer pieces), then one asking for an answer;
  ``stream_bytes_per_s`` = bytes / (first send -> answer), the receiver touching every message (first and last
  byte) and dropping it before the next.
- ``busy``: the same with the receiver's main thread busy the way a worker running model steps is: a pure
  Python loop holding the GIL for ``--step-ms``, then taking what arrived (``recv(0)``), again and again; the
  transport's own thread then needs the GIL to take each message.
- ``paced``: ``KVTransferEngine.send`` of a request's KV (4 layers x 4 heads x 64, fp32: 8 KiB a token) to a
  ``KVTransferEngine`` in the receiver, to a declared link (``--links``); ``achieved_fraction`` = bytes /
  ``link_s`` / declared bandwidth, ``link_s`` the sender's first byte -> commit done (goal: >= 0.9 for >= 1 MiB).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

SIZES_KIB = [64, 256, 1024, 4096, 16384, 65536]
PACED_SIZES_KIB = [64, 256, 1024, 4096, 16384]
TOKEN_BYTES = 4 * 2 * 4 * 64 * 4


def _desc(block: int = 16) -> Any:
    from hetserve.runtime.kv_layout import KVDescriptor

    return KVDescriptor(num_layers=4, num_kv_heads=4, head_dim=64, block_size=block, dtype="float32")


def _caches(num_blocks: int, seed: int) -> list[Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return list(torch.randn(4, 2, num_blocks, 16, 4, 64, generator=g).unbind(0))


def _busy(step_s: float, stop: threading.Event) -> None:
    """Hold the GIL with pure Python for ``step_s`` (a model step's host side, with no GIL release)."""
    t_end = time.perf_counter() + step_s
    x = 0
    while time.perf_counter() < t_end and not stop.is_set():
        for _ in range(200):
            x += 1


def receiver(step_ms: float, paced: str) -> None:
    """Take messages until told to stop; answer ``{"n": ...}`` to a header with ``reply_to``."""
    from hetserve.runtime.transport import TransferTimeout, make_transport

    t = make_transport("shm")
    if paced:
        from hetserve.runtime.kv_transfer import KVTransferEngine

        n_blocks = max(int(k) for k in paced.split(",")) * 1024 // TOKEN_BYTES // 16 + 2
        eng = KVTransferEngine(t, _desc(), _caches(n_blocks, 1))
        reply = make_transport("shm")
        print(t.address, flush=True)
        for line in sys.stdin:  # "tid tokens reply_to": expect it, answer when it is in
            tid, tokens, to = line.split()
            eng.expect(tid, tid, list(range(1, -(-int(tokens) // 16) + 1)), int(tokens), _desc(),
                       time.monotonic() + 30)
            while True:
                res = eng.poll(0.05)
                if res:
                    reply.send(to, {"ok": res[0].success, "error": res[0].error or ""}, [], time.monotonic() + 10)
                    break
        return
    print(t.address, flush=True)
    stop = threading.Event()
    n = 0
    while True:
        if step_ms > 0:
            _busy(step_ms / 1000, stop)
            wait = 0.0
        else:
            wait = 1.0
        while True:
            try:
                header, bufs = t.recv(wait)
            except TransferTimeout:
                break
            wait = 0.0
            n += 1
            for b in bufs:
                mv = memoryview(b)
                _ = mv[0] if mv.nbytes else 0
                _ = mv[-1] if mv.nbytes else 0
            del bufs
            if isinstance(header, dict) and header.get("stop"):
                t.close()
                return
            if isinstance(header, dict) and header.get("reply_to"):
                t.send(header["reply_to"], {"n": n}, [], time.monotonic() + 30)


def _spawn(args: list[str]) -> tuple[subprocess.Popen[str], str]:
    env = {**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, __file__, "--role", "receiver", *args], stdout=subprocess.PIPE,
                            stdin=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def transport_rows(sizes: list[int], repeats: int, step_ms: float, stream_mib: int, window: int) -> list[dict[str, Any]]:
    from hetserve.runtime.transport import make_transport

    proc, peer = _spawn(["--step-ms", str(step_ms)])
    rows = []
    try:
        with make_transport("shm", window=window) as me:
            def answered(deadline: float) -> None:
                me.send(peer, {"reply_to": me.address}, [], deadline)
                me.recv(30)

            answered(time.monotonic() + 30)  # connected both ways
            for kib in sizes:
                buf = bytearray(os.urandom(1024)) * kib
                sends, rtts, streams = [], [], []
                n_stream = max(8, stream_mib * 1024 // kib)
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    me.send(peer, {"i": 0}, [buf], time.monotonic() + 30)
                    t1 = time.perf_counter()
                    answered(time.monotonic() + 30)
                    sends.append(t1 - t0)
                    t0 = time.perf_counter()
                    me.send(peer, {"reply_to": me.address}, [buf], time.monotonic() + 30)
                    me.recv(30)
                    rtts.append(time.perf_counter() - t0)
                for _ in range(max(1, repeats // 2)):
                    t0 = time.perf_counter()
                    for i in range(n_stream - 1):
                        me.send(peer, {"i": i}, [buf], time.monotonic() + 30)
                    me.send(peer, {"reply_to": me.address}, [buf], time.monotonic() + 30)
                    me.recv(30)
                    streams.append(n_stream * len(buf) / (time.perf_counter() - t0))
                rows.append({"kib": kib, "send_s": statistics.median(sends), "rtt_s": statistics.median(rtts),
                             "stream_messages": n_stream, "stream_bytes_per_s": statistics.median(streams),
                             "send_s_all": sends})
                r = rows[-1]
                print(f"step {step_ms:4.1f} ms  {kib:6d} KiB  send {r['send_s'] * 1e3:8.3f} ms  rtt "
                      f"{r['rtt_s'] * 1e3:8.3f} ms  stream {r['stream_bytes_per_s'] / 1e9:6.2f} GB/s", flush=True)
            me.send(peer, {"stop": True}, [], time.monotonic() + 30)
    finally:
        proc.wait(30) if proc.poll() is None else None
        proc.kill()
    return rows


def paced_rows(sizes: list[int], repeats: int, link_names: list[str], window: int = 1) -> list[dict[str, Any]]:
    from hetserve.core.devices import LINKS
    from hetserve.runtime.kv_transfer import KVTransferEngine
    from hetserve.runtime.transport import make_transport

    proc, peer = _spawn(["--paced", ",".join(map(str, sizes))])
    assert proc.stdin is not None
    rows = []
    n_blocks = max(sizes) * 1024 // TOKEN_BYTES // 16 + 2
    caches = _caches(n_blocks, 2)
    try:
        with make_transport("shm", window=window) as me, make_transport("shm") as answers:
            n = 0
            for name in link_names:
                link = LINKS[name]
                eng = KVTransferEngine(me, _desc(), caches, link=link)
                for kib in sizes:
                    tokens = kib * 1024 // TOKEN_BYTES
                    res = []
                    for _ in range(repeats):
                        n += 1
                        tid = f"p{n}"
                        proc.stdin.write(f"{tid} {tokens} {answers.address}\n")
                        proc.stdin.flush()
                        time.sleep(0.02)  # the receiver expects it first
                        r = eng.send(peer, _desc(), tid, tid, list(range(1, -(-tokens // 16) + 1)), tokens,
                                     time.monotonic() + 30)
                        got, _ = answers.recv(30)
                        assert r.success and got["ok"], (r.error, got)
                        res.append(r)
                    link_s = statistics.median(r.link_s for r in res)
                    declared = link.transfer_time_s(res[0].num_bytes)
                    rows.append({"link": name, "kib": kib, "num_bytes": res[0].num_bytes, "declared_s": declared,
                                 "link_s": link_s, "convert_s": statistics.median(r.convert_s for r in res),
                                 "achieved_fraction": res[0].num_bytes / link_s / link.bandwidth_bytes_per_s,
                                 "over_declared_s": link_s - declared})
                    r0 = rows[-1]
                    print(f"paced {name:9s} {kib:6d} KiB  declared {declared * 1e3:8.3f} ms  link "
                          f"{link_s * 1e3:8.3f} ms  achieved {r0['achieved_fraction']:6.1%}", flush=True)
    finally:
        proc.stdin.close()
        proc.wait(30)
    return rows


def _git_commit() -> str:
    from hetserve.cli.profile import git_commit

    return git_commit(Path(__file__).resolve().parents[1])  # benchmarks/.commit in an archived tree, else HEAD


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", default="bench", choices=["bench", "receiver"])
    ap.add_argument("--step-ms", type=float, default=5.0, help="the busy receiver's step (GIL held)")
    ap.add_argument("--paced", default="", help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sizes-kib", default=",".join(map(str, SIZES_KIB)))
    ap.add_argument("--stream-mib", type=int, default=128, help="bytes per stream (at least 8 messages)")
    ap.add_argument("--links", default="eth25,pcie4x16")
    ap.add_argument("--window", type=int, default=1, help="the sender's ShmTransport window (1: send waits "
                    "for each acknowledgement; the KV endpoints use HETSERVE_SHM_WINDOW, 8)")
    ap.add_argument("--sections", default="idle,busy,paced", help="which rows to measure (comma-separated)")
    ap.add_argument("--label", default="", help="a note stored in the output (e.g. before / after)")
    ap.add_argument("--out", default="benchmarks/results/kv_stream_cpu.json")
    args = ap.parse_args()
    if args.role == "receiver":
        receiver(args.step_ms, args.paced)
        return
    sizes = [int(x) for x in args.sizes_kib.split(",")]
    out: dict[str, Any] = {
        "command": " ".join([sys.executable, *sys.argv]),
        "git_commit": _git_commit(),
        "label": args.label,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "processor": platform.processor() or platform.machine(), "python": platform.python_version()},
        "config": {"repeats": args.repeats, "sizes_kib": sizes, "stream_mib": args.stream_mib,
                   "busy_step_ms": args.step_ms, "window": args.window, "links": args.links, "paced_sizes_kib": PACED_SIZES_KIB,
                   "transport": "shm", "env": {k: v for k, v in os.environ.items() if k.startswith("HETSERVE_SHM")}},
        "loadavg_before": list(os.getloadavg()),
    }
    sections = args.sections.split(",")
    if "idle" in sections:
        out["idle"] = transport_rows(sizes, args.repeats, 0.0, args.stream_mib, args.window)
    if "busy" in sections:
        out["busy"] = transport_rows(sizes, args.repeats, args.step_ms, args.stream_mib, args.window)
    if "paced" in sections:
        out["paced"] = paced_rows(PACED_SIZES_KIB, args.repeats, args.links.split(","), args.window)
    out["loadavg_after"] = list(os.getloadavg())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
