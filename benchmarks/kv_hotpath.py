"""Host cost of one hand-off's KV work in one process, step by step: where a small hand-off's fixed cost goes.

    python benchmarks/kv_hotpath.py [--device cuda] [--tokens 8,32,128,512] [--out benchmarks/results/kv_hotpath.json]

A Llama-3.1-8B-shaped KV cache (32 layers, 8 kv heads x 128, bf16, block 16; 128 KiB a token: 8 tokens are
1 MiB), laid out as the model runner lays it out (one allocation, per-layer views). For each size, the median
host seconds of each step a direct hand-off takes (``kv_direct`` / ``kv_receive``), GPU work not waited for:

- ``index``: the block ids to the device (``index_tensor``);
- ``extract``: ``extract_blocks`` (gather of the request's blocks, padding zeroed);
- ``convert_same`` / ``convert_hnd32``: ``convert`` to the wire format (none; HND block 32);
- ``insert``: ``shard.insert_kv`` of a packed piece (the receiver's sink), same format;
- ``all_then_sync``: extract, convert (same format) and insert, then ``torch.cuda.synchronize``.

Then ``--profile``: the top functions by own time (cProfile) over the sender's and the receiver's steps.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import statistics
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch

from hetserve.engine.kv_views import LayerViews
from hetserve.runtime.kv_blocks import index_tensor
from hetserve.runtime.kv_convert import convert
from hetserve.runtime.kv_layout import KVDescriptor
from hetserve.runtime.kv_transfer import extract_blocks
from hetserve.runtime.shard import insert_kv
from hetserve.runtime.worker import InsertKV, KVShard

L, H, D, BS = 32, 8, 128, 16


def _cache(dev: torch.device, blocks: int) -> LayerViews:
    return LayerViews(torch.randn(L, 2, blocks, BS, H, D, device=dev).to(torch.bfloat16))


def _median(fn: Any, n: int) -> float:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def run(dev: torch.device, tokens: int, n: int, prof: cProfile.Profile | None) -> dict[str, float]:
    desc = KVDescriptor(num_layers=L, num_kv_heads=H, head_dim=D, block_size=BS, dtype="bfloat16")
    hnd = KVDescriptor(num_layers=L, num_kv_heads=H, head_dim=D, block_size=32, dtype="bfloat16", layout="HND")
    nb = -(-tokens // BS)
    src, dst = _cache(dev, nb + 2), _cache(dev, nb + 2)
    ids = list(range(1, nb + 1))
    runner = types.SimpleNamespace(kv_caches=dst, parallel=types.SimpleNamespace(layer_start=0), device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def packed() -> KVShard:
        p = convert(extract_blocks(src, ids, tokens, desc), desc, desc, tokens, consume=True)
        flat = torch.stack(list(p.tensors)).reshape(L, -1).view(torch.uint8)
        return KVShard(layer_start=0, head_start=0, shapes=[list(t.shape) for t in p.tensors],
                       buffers=LayerViews(flat))  # type: ignore[arg-type]

    sh = packed()
    cmd = InsertKV(seq=0, transfer_id="t", block_ids=ids, num_tokens=tokens, wire=desc, shards=[sh])
    steps = {
        "index": lambda: index_tensor(ids, dev),
        "extract": lambda: extract_blocks(src, ids, tokens, desc),
        "convert_same": lambda: convert(extract_blocks(src, ids, tokens, desc), desc, desc, tokens, consume=True),
        "convert_hnd32": lambda: convert(extract_blocks(src, ids, tokens, desc), desc, hnd, tokens, consume=True),
        "insert": lambda: insert_kv(runner, desc, cmd, borrowed=True),
    }
    out: dict[str, float] = {}
    for name, fn in steps.items():
        for _ in range(5):
            fn()
        sync()
        out[name] = _median(fn, n)
        sync()
    out["convert_same"] -= out["extract"]
    out["convert_hnd32"] -= out["extract"]

    def one() -> None:
        convert(extract_blocks(src, ids, tokens, desc), desc, desc, tokens, consume=True)
        insert_kv(runner, desc, cmd, borrowed=True)

    out["all_then_sync"] = _median(lambda: (one(), sync()), n)
    if prof is not None:
        prof.enable()
        for _ in range(n):
            one()
        prof.disable()
        sync()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", default="8,32,128,512")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/kv_hotpath.json")
    args = ap.parse_args()
    dev = torch.device(args.device)
    prof = cProfile.Profile() if args.profile else None
    rows = []
    for tok in (int(x) for x in args.tokens.split(",")):
        r = run(dev, tok, args.n, prof if tok == 8 else None)
        rows.append({"tokens": tok, "kib": tok * 128, **{f"{k}_us": round(v * 1e6, 1) for k, v in r.items()}})
        print(rows[-1], flush=True)
    top = ""
    if prof is not None:
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(25)
        top = s.getvalue()
        print(top)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else f"CPU ({platform.machine()}, {os.cpu_count()})"
    commit_file = Path(__file__).parent / ".commit"
    out = {"command": " ".join([sys.executable, *sys.argv]), "device": f"{name}, torch {torch.__version__}",
           "git_commit": commit_file.read_text().strip() if commit_file.exists() else "",
           "emulation": "none: one process, the whole device", "config": vars(args), "rows": rows,
           "profile_8_tokens": top}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
