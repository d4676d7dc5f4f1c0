"""Why a hand-off's insert costs more host time on a transport's receiving thread than on the worker's main
thread (session 7: 1.0-1.4 vs 0.4-0.65 ms in ``kv_runtime.py``'s convert case): the same ``insert_kv`` of one
packed piece, in one process, on the main thread or on a second thread, on the default stream or a side stream,
and with the main thread idle or polling a queue every 2 ms (as a worker's loop does while it expects KV).

    python benchmarks/kv_insert_thread.py [--device cuda] [--tokens 32] [--repeats 30] [--out FILE.json]

Host time of the call (before synchronising) and with the device synchronised, medians over the repeats.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import queue
import statistics
import sys
import threading
import time
import types
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hetserve.engine.kv_views import LayerViews
from hetserve.runtime.kv_convert import convert
from hetserve.runtime.kv_layout import KVDescriptor, wire_descriptor
from hetserve.runtime.kv_transfer import extract_blocks
from hetserve.runtime.shard import insert_kv
from hetserve.runtime.worker import InsertKV, KVShard


def _piece(desc: KVDescriptor, wire: KVDescriptor, n: int, dev: torch.device) -> tuple[list[Any], Any]:
    """A packed piece as the receiver gets it: all layers of ``wire`` in one flat uint8 buffer (a view)."""
    src = LayerViews(torch.randn(desc.num_layers, 2, n // desc.block_size + 2, desc.block_size, desc.num_kv_heads,
                                 desc.head_dim, device=dev).to(torch.bfloat16))
    ids = list(range(1, -(-n // desc.block_size) + 1))
    p = convert(extract_blocks(src, ids, n, desc), desc, wire, n, heads=desc.head_range)
    flat = torch.stack(list(p.tensors)).reshape(-1).view(torch.uint8).clone()
    per = flat.numel() // wire.num_layers
    return [list(t.shape) for t in p.tensors], LayerViews(flat.view(wire.num_layers, per))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    desc = KVDescriptor(num_layers=32, num_kv_heads=8, head_dim=128, block_size=16, dtype="bfloat16")
    rows = []
    for case, dst in (("same", desc), ("convert", dataclasses.replace(desc, block_size=32))):
        declared = dst if case == "same" else dataclasses.replace(dst, layout="HND")
        wire = wire_descriptor(desc, declared)
        n = args.tokens
        nb = n // dst.block_size + 8
        runner = types.SimpleNamespace(
            kv_caches=LayerViews(torch.zeros(32, 2, nb, dst.block_size, 8, 128, device=dev, dtype=torch.bfloat16)),
            parallel=types.SimpleNamespace(layer_start=0), device=dev)
        shapes, bufs = _piece(desc, wire, n, dev)
        blocks = list(range(1, -(-n // dst.block_size) + 1))

        def once(stream: Any, runner: Any = runner, shapes: list[Any] = shapes, bufs: Any = bufs,
                 blocks: list[int] = blocks, wire: KVDescriptor = wire, n: int = n, dst: KVDescriptor = dst
                 ) -> tuple[float, float]:
            sh = KVShard(layer_start=0, head_start=0, shapes=shapes, buffers=bufs)
            t0 = time.perf_counter()
            from contextlib import nullcontext

            ctx: Any = torch.cuda.stream(stream) if stream is not None else nullcontext()
            with ctx:
                insert_kv(runner, dst, InsertKV(seq=0, transfer_id="t", block_ids=blocks, num_tokens=n, wire=wire,
                                                shards=[sh]), borrowed=True)
                t1 = time.perf_counter()
                if cuda:
                    torch.cuda.current_stream().synchronize()
            return t1 - t0, time.perf_counter() - t0

        side = torch.cuda.Stream(device=dev) if cuda else None

        def run(where: str, stream: Any, poll: bool) -> dict[str, float]:
            out: list[tuple[float, float]] = []
            stop = threading.Event()

            def work() -> None:
                for _ in range(3):
                    once(stream)
                for _ in range(args.repeats):
                    time.sleep(0.003)  # a hand-off comes after a pause, as in a worker
                    out.append(once(stream))
                stop.set()

            if where == "main":
                work()
            else:
                th = threading.Thread(target=work)
                th.start()
                q: queue.Queue[int] = queue.Queue()
                while poll and not stop.is_set():
                    try:
                        q.get(timeout=0.002)  # the worker loop's poll while it expects KV
                    except queue.Empty:
                        pass
                th.join()
            return {"host_ms": statistics.median(h for h, _ in out) * 1e3,
                    "synced_ms": statistics.median(s for _, s in out) * 1e3}

        for where, stream_name, poll in (("main", "default", False), ("main", "side", False),
                                         ("thread", "default", False), ("thread", "side", False),
                                         ("thread", "side", True), ("main", "default", False)):
            r = run(where, side if stream_name == "side" else None, poll)
            row = {"case": case, "tokens": n, "thread": where, "stream": stream_name, "main_polls": poll, **r}
            rows.append(row)
            print(f"{case:8s} {where:6s} {stream_name:7s} polling={poll!s:5s} host {r['host_ms']:.3f} ms  "
                  f"synced {r['synced_ms']:.3f} ms", flush=True)
    if args.out:
        from hetserve.cli.profile import git_commit

        Path(args.out).write_text(json.dumps({
            "command": " ".join([sys.executable, *sys.argv]), "git_commit": git_commit(ROOT),
            "device": torch.cuda.get_device_name(dev) if cuda else "cpu", "emulation": None, "rows": rows},
            indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
