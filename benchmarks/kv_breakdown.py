"""Where a KV hand-off's fixed cost goes, in one process: each stage of the sender's extract + convert and the
receiver's convert + insert timed alone (host time of the call, and with the device synchronised), for the
Llama-3.1-8B KV shape (32 layers, 8 kv heads x 128, bf16) and a few sizes.

    python benchmarks/kv_breakdown.py [--device cuda] [--out benchmarks/results/kv_breakdown_h100.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hetserve.runtime.kv_convert import convert
from hetserve.runtime.kv_layout import KVDescriptor, wire_descriptor
from hetserve.runtime.kv_transfer import extract_blocks, insert_blocks


def timed(fn, dev: torch.device, repeats: int) -> dict[str, float]:
    host, full = [], []
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t2 = time.perf_counter()
        host.append(t1 - t0)
        full.append(t2 - t0)
    return {"host_ms": statistics.median(host) * 1e3, "synced_ms": statistics.median(full) * 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", default="8,128,2048")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    dev = torch.device(args.device)
    L, H, D = 32, 8, 128
    desc = KVDescriptor(num_layers=L, num_kv_heads=H, head_dim=D, block_size=16, dtype="bfloat16")
    recv = dataclasses.replace(desc, block_size=32, layout="HND")
    nb = 2048 // 16 + 8
    src_cache = list(torch.randn(L, 2, nb, 16, H, D, device=dev).to(torch.bfloat16).unbind(0))
    dst_cache = list(torch.zeros(L, 2, nb, 16, H, D, device=dev, dtype=torch.bfloat16).unbind(0))
    rows = []
    for n in [int(x) for x in args.tokens.split(",")]:
        ids = list(range(1, -(-n // 16) + 1))
        for case, dst in (("same", desc), ("convert", recv)):
            wire = wire_descriptor(desc, dst)
            r: dict[str, object] = {"tokens": n, "case": case, "kib": n * L * 2 * H * D * 2 // 1024}
            r["ids_to_device"] = timed(lambda ids=ids: torch.tensor(ids, dtype=torch.int64, device=dev), dev,
                                       args.repeats)
            r["extract"] = timed(lambda ids=ids, n=n: extract_blocks(src_cache, ids, n, desc), dev, args.repeats)
            src = extract_blocks(src_cache, ids, n, desc)
            r["convert_send"] = timed(lambda src=src, wire=wire, n=n: convert(src, desc, wire, n, heads=desc.head_range),
                                      dev, args.repeats)
            p = convert(src, desc, wire, n, heads=desc.head_range)
            r["event_record"] = timed(lambda: torch.cuda.Event().record() if dev.type == "cuda" else None, dev,
                                      args.repeats)
            r["convert_recv"] = timed(lambda p=p, wire=wire, n=n: convert(p, wire, desc, n), dev, args.repeats)
            back = convert(p, wire, desc, n)
            r["insert"] = timed(lambda ids=ids, back=back: insert_blocks(dst_cache, ids, back, desc), dev,
                                args.repeats)
            r["sync_only"] = timed(lambda: None, dev, args.repeats)
            rows.append(r)
            print(n, case, {k: round(v["synced_ms"], 3) if isinstance(v, dict) else v for k, v in r.items()},
                  flush=True)
    from hetserve.cli.profile import git_commit

    commit = git_commit(ROOT)  # benchmarks/.commit in an archived tree, else git HEAD
    out = {"command": " ".join([sys.executable, *sys.argv]), "git_commit": commit,
           "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu", "emulation": None,
           "config": {"layers": L, "kv_heads": H, "head_dim": D, "dtype": "bfloat16", "repeats": args.repeats},
           "rows": rows}
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
