"""Decode attention with uneven contexts against the same keys spread evenly (issue 6).

The profile measures decode attention at equal contexts, and the cost model looks it up at a batch's mean
context. An online batch mixes short and long sequences: with one program per (sequence, KV head) the long
ones finish last while the GPU idles around them. This times the Triton decode kernel (Llama-3.1-8B heads,
bf16, block 16) for batches whose contexts are drawn from the Azure-conv prompt lengths (plus some decoded
tokens), beside a batch of the same size and total keys with every context equal.

    python benchmarks/gpu_attn_skew.py [--batches 4,8,16,32,64,128] [--draws 5]

Writes ``gpu-attn-skew.json`` under ``$OUT`` (or ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import csv
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def trace_lengths(cap: int) -> list[int]:
    from gpu_online_fidelity import find_trace

    path = find_trace("conv")
    if path is None:
        return [random.Random(0).randint(16, cap) for _ in range(1000)]
    with path.open() as f:
        return [min(cap, int(r["ContextTokens"])) for r in csv.DictReader(f)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="4,8,16,32,64,128")
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--cap", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=50)
    args = ap.parse_args()
    import torch
    from suite_common import git_commit, write_result

    from hetserve.kernels.attention_launch import PagedAttentionPlan

    dev = torch.device("cuda")
    heads, kv_heads, dim, page = 32, 8, 128, 16
    lengths = trace_lengths(args.cap)
    rng = random.Random(0)
    max_batch = max(int(b) for b in args.batches.split(","))
    num_blocks = max_batch * (args.cap + 512) // page + 16
    cache = torch.randn(2, num_blocks, page, kv_heads, dim, dtype=torch.bfloat16, device=dev)

    def time_batch(ctxs: list[int]) -> float:
        n = len(ctxs)
        width = max(-(-c // page) for c in ctxs)
        perm = torch.randperm(num_blocks - 1, device=dev)[: n * width].view(n, width).to(torch.int32) + 1
        q = torch.randn(n, heads, dim, dtype=torch.bfloat16, device=dev)
        qsl = torch.arange(n + 1, dtype=torch.int32, device=dev)
        lens = torch.tensor(ctxs, dtype=torch.int32, device=dev)
        plan = PagedAttentionPlan(q, cache, qsl, lens, perm, dim**-0.5, decode=True)
        out = torch.empty_like(q)
        for _ in range(3):
            plan.run(q, cache, out)
        torch.cuda.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        for _ in range(args.iters):
            plan.run(q, cache, out)
        e1.record()
        torch.cuda.synchronize()
        return e0.elapsed_time(e1) / 1e3 / args.iters

    rows = []
    for b in [int(x) for x in args.batches.split(",")]:
        for d in range(args.draws):
            ctxs = [min(args.cap + 256, rng.choice(lengths) + rng.randint(0, 256)) for _ in range(b)]
            mean = sum(ctxs) / b
            even = [round(mean)] * b
            t_skew, t_even = time_batch(ctxs), time_batch(even)
            rows.append({"num_seqs": b, "draw": d, "mean_ctx": mean, "max_ctx": max(ctxs),
                         "max_over_mean": max(ctxs) / mean, "skewed_s": t_skew, "even_s": t_even,
                         "ratio": t_skew / t_even})
            print(f"batch {b:4d} draw {d}: mean ctx {mean:7.1f} max {max(ctxs):5d} ({max(ctxs) / mean:4.2f}x)  "
                  f"skewed {t_skew * 1e6:7.1f} us  even {t_even * 1e6:7.1f} us  ratio {t_skew / t_even:.3f}",
                  flush=True)
    summary = {}
    for b in sorted({r["num_seqs"] for r in rows}):
        rs = [r for r in rows if r["num_seqs"] == b]
        summary[b] = {"median_ratio": statistics.median(r["ratio"] for r in rs),
                      "median_max_over_mean": statistics.median(r["max_over_mean"] for r in rs)}
        print(f"batch {b:4d}: median skewed / even {summary[b]['median_ratio']:.3f} "
              f"(max / mean ctx {summary[b]['median_max_over_mean']:.2f})")
    out = {"benchmark": "decode attention, uneven vs even contexts (same keys)", "command": " ".join(sys.argv),
           "git_commit": git_commit(), "device": torch.cuda.get_device_name(), "emulation": None,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "config": {"heads": heads, "kv_heads": kv_heads, "head_dim": dim, "block_size": page, "dtype": "bfloat16",
                      "contexts": "Azure-conv prompt lengths (capped) + U(0, 256) decoded"},
           "summary": summary, "rows": rows}
    write_result("gpu-attn-skew.json", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
