"""KV transfer on this machine: achieved bandwidth against a paced link, and conversion overhead.

    python benchmarks/kv_transfer.py [--out benchmarks/results/kv_transfer_cpu.json] [--max-mib 256]

1. Bandwidth: one request's KV (1 MiB .. 256 MiB, bf16, same format both sides) through ``KVTransferEngine``
   over each transport (local, shm, tcp on 127.0.0.1), unpaced and paced to declared links. ``achieved`` is
   ``bytes / (link_s - latency)``, where ``link_s`` runs from the first byte handed to the transport to the
   end of the transfer (paced wait and commit included); the goal is >= 90% of the declared bandwidth.
2. Conversion overhead: the PD case of issue 7 (prefill TP 2, bf16, NHD, block 16 -> decode TP 1, fp32, HND,
   block 32). Sender side: extract + convert to the wire format (bf16, block 32, HND); receiver side: join the
   two shards, widen to fp32, insert. ``overhead`` = (slowest sender's conversion + receiver's) / the
   declared link's time for the wire bytes (goal <= 10%).

Sender and receiver are threads of one process (the receiver polls in a thread), so on a small machine they
compete for cores; the JSON records the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import torch

from hetserve.core.devices import LinkSpec
from hetserve.runtime.kv_convert import TORCH_DTYPES
from hetserve.runtime.kv_layout import KVDescriptor
from hetserve.runtime.kv_transfer import KVTransferEngine, TransferResult
from hetserve.runtime.transport import make_transport

MiB = 2**20
# a Llama-3-8B-like KV shape at 16 layers: 64 KiB per token in bf16
SHAPE = {"num_layers": 16, "num_kv_heads": 8, "head_dim": 128}
LINKS = [
    None,
    LinkSpec("emulated-200MBps", "ethernet", bandwidth_bytes_per_s=200e6, latency_s=1e-4),
    LinkSpec("emulated-1GBps", "ethernet", bandwidth_bytes_per_s=1e9, latency_s=2e-5),
]


def cache(desc: KVDescriptor, num_blocks: int, fill: bool) -> list[torch.Tensor]:
    shape = (2, num_blocks, *desc.block_shape())
    dt = TORCH_DTYPES[desc.dtype]
    if fill:
        return [torch.randn(shape).to(dt) for _ in range(desc.num_layers)]
    # zero_() touches every page now (a warm serving cache), not during the first transfer into it
    return [torch.empty(shape, dtype=dt).zero_() for _ in range(desc.num_layers)]


class Receiver:
    """A receiving engine polled by a thread; ``wait(tid)`` returns its result."""

    def __init__(self, engine: KVTransferEngine) -> None:
        self.engine = engine
        self.results: dict[str, TransferResult] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for r in self.engine.poll(0.005):
                with self._lock:
                    self.results[r.transfer_id] = r

    def expect(self, *args: Any) -> None:
        with self._lock:
            self.engine.expect(*args)

    def wait(self, tid: str, timeout_s: float = 120.0) -> TransferResult:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            with self._lock:
                if tid in self.results:
                    return self.results.pop(tid)
            time.sleep(0.001)
        raise TimeoutError(tid)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.engine.transport.close()


def bandwidth(sizes_mib: list[int]) -> list[dict[str, Any]]:
    desc = KVDescriptor(**SHAPE, block_size=16, dtype="bfloat16")  # type: ignore[arg-type]
    per_token = desc.payload_bytes(desc.block_size) // desc.block_size
    max_blocks = max(sizes_mib) * MiB // per_token // desc.block_size
    src_cache, dst_cache = cache(desc, max_blocks, True), cache(desc, max_blocks, False)
    rows = []
    for kind in ("local", "shm", "tcp"):
        for link in LINKS:
            sender = KVTransferEngine(make_transport(kind), desc, src_cache, link=link)
            recv = Receiver(KVTransferEngine(make_transport(kind), desc, dst_cache))
            try:
                for mib in sizes_mib:
                    n = mib * MiB // per_token
                    table = list(range(desc.num_blocks_for(n)))
                    reps = 3 if mib <= 16 else 1
                    samples = []
                    for rep in range(reps + 1):  # the first run warms up
                        tid = f"{kind}-{mib}-{rep}"
                        recv.expect(tid, "bench", table, n, desc, time.monotonic() + 120)
                        res = sender.send(recv.engine.transport.address, desc, tid, "bench", table, n,
                                          time.monotonic() + 120)
                        got = recv.wait(tid)
                        assert res.success and got.success, (res.error, got.error)
                        if rep:
                            samples.append((res, got))
                    link_s = statistics.median(r.link_s for r, _ in samples)
                    res, got = samples[0]
                    lat = link.latency_s if link else 0.0
                    achieved = res.num_bytes / max(link_s - lat, 1e-9)
                    rows.append({
                        "transport": kind, "link": link.name if link else "unpaced",
                        "declared_bytes_per_s": link.bandwidth_bytes_per_s if link else None,
                        "size_bytes": res.num_bytes, "repeats": reps, "link_s": link_s,
                        "declared_s": link.transfer_time_s(res.num_bytes) if link else None,
                        "achieved_bytes_per_s": achieved,
                        "fraction_of_declared": achieved / link.bandwidth_bytes_per_s if link else None,
                        "sender_extract_s": statistics.median(r.convert_s for r, _ in samples),
                        "receiver_insert_s": statistics.median(g.convert_s for _, g in samples),
                    })
                    print(f"{kind:5s} {rows[-1]['link']:17s} {mib:4d} MiB  link {link_s * 1e3:8.1f} ms  "
                          f"{achieved / 1e9:6.2f} GB/s" + (f"  {rows[-1]['fraction_of_declared']:.1%}" if link else ""),
                          flush=True)
            finally:
                sender.transport.close()
                recv.close()
    return rows


def conversion(sizes_mib: list[int]) -> list[dict[str, Any]]:
    src = KVDescriptor(**SHAPE, block_size=16, dtype="bfloat16", layout="NHD", tp_size=2)  # type: ignore[arg-type]
    dst = KVDescriptor(**SHAPE, block_size=32, dtype="float32", layout="HND")  # type: ignore[arg-type]
    per_token = src.payload_bytes(16, num_heads=src.num_kv_heads) // 16  # all heads, bf16 (= the wire)
    max_blocks = max(sizes_mib) * MiB // per_token // 16
    rows = []
    senders = [KVTransferEngine(make_transport("local"), src.for_rank(r), cache(src.for_rank(r), max_blocks, True))
               for r in range(2)]
    recv = Receiver(KVTransferEngine(make_transport("local"), dst, cache(dst, max_blocks // 2 + 1, False)))
    try:
        for mib in sizes_mib:
            n = mib * MiB // per_token
            src_table = list(range(-(-n // 16)))
            dst_table = list(range(-(-n // 32)))
            samples = []
            for rep in range(2):  # the last one counts: the first warms the allocator up
                tid = f"conv-{mib}-{rep}"
                recv.expect(tid, "bench", dst_table, n, src, time.monotonic() + 120)
                sent = [s.send(recv.engine.transport.address, dst, tid, "bench", src_table, n, time.monotonic() + 120)
                        for s in senders]
                got = recv.wait(tid)
                assert all(x.success for x in sent) and got.success
                samples.append((sent, got))
            sent, got = samples[-1]
            wire_bytes = sum(x.num_bytes for x in sent)
            send_conv = max(x.convert_s for x in sent)
            row: dict[str, Any] = {
                "case": "TP2 bf16 NHD b16 -> TP1 fp32 HND b32", "size_bytes_wire": wire_bytes,
                "num_tokens": n, "sender_convert_s": send_conv, "receiver_convert_s": got.convert_s,
            }
            for link in LINKS[1:]:
                assert link is not None
                t = link.transfer_time_s(wire_bytes)
                row[f"overhead_vs_{link.name}"] = (send_conv + got.convert_s) / t
            rows.append(row)
            print(f"convert {mib:4d} MiB wire: sender {send_conv * 1e3:7.1f} ms, receiver {got.convert_s * 1e3:7.1f} ms, "
                  + ", ".join(f"{k.removeprefix('overhead_vs_')} {v:.1%}" for k, v in row.items()
                              if k.startswith("overhead")), flush=True)
    finally:
        for s in senders:
            s.transport.close()
        recv.close()
    return rows


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "device": "cpu",
        "loadavg_at_start": os.getloadavg(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    try:
        with open("/proc/meminfo") as f:
            info["mem_total"] = f.readline().split(":", 1)[1].strip()
    except OSError:
        pass
    return info


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results/kv_transfer_cpu.json")
    ap.add_argument("--max-mib", type=int, default=256)
    args = ap.parse_args()
    sizes = [m for m in (1, 4, 16, 64, 256) if m <= args.max_mib]
    t0 = time.time()
    out = {
        "benchmark": "kv_transfer", "machine": machine(), "kv_shape": SHAPE,
        "links": [{"name": link.name, "bandwidth_bytes_per_s": link.bandwidth_bytes_per_s,
                   "latency_s": link.latency_s} for link in LINKS if link],
        "notes": "sender and receiver are threads of one process; achieved = bytes / (link_s - latency); "
                 "the machine is shared (see loadavg): numbers above ~1 GB/s and large-size conversion times "
                 "are limited by CPU contention and first-touch page faults, not by the code paths alone",
        "bandwidth": bandwidth(sizes),
        "conversion": conversion(sizes),
    }
    out["wall_s"] = time.time() - t0
    out["machine"]["loadavg_at_end"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out} in {out['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
