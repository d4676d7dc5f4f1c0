"""Hetis data path micro-benchmark: per-layer round trip main worker -> attention worker -> main, through the
socket frames (the old path: tensor bytes through host memory and the socket) and through the shared mailbox
(``hetserve/runtime/hetis_mailbox.py``: a small header on the socket, data in a shared buffer).

One main (this process) and one attention worker process (``python -m hetserve.runtime.attn_worker``) on the
same device. Llama-3.1-8B head shapes (32 query heads, 8 KV heads, head_dim 128), decode steps of ``batch``
sequences with ``--context`` tokens each, ``--offload`` KV heads on the worker. Per layer:

* ``rt_ms``: send_layer -> recv_layer with nothing in between (and the output read back to the main's device),
* ``compute_ms``: the worker's own time on the layer (as it reports it); ``overhead_ms`` = rt - compute,
* ``layer_ms``: send, the main's own heads' attention, receive, concatenate (the overlap the backend gets),
* ``own_ms``: the main's own heads alone.

Medians over ``--repeats`` steps x layers (after ``--warmup`` steps). JSON to
``benchmarks/results/hetis_path_<device>.json``.

    python benchmarks/hetis_path.py --device cpu
    python benchmarks/hetis_path.py --device cuda      # both processes on the GPU (CUDA IPC mailbox)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hetserve.engine.attention import AttentionMetadata, get_attention_backend
from hetserve.runtime.hetis_main import AttnWorkerClient
from hetserve.runtime.hetis_messages import AttnSpec, AttnWorkerConf


def git_commit() -> str:
    from hetserve.cli.profile import git_commit as gc

    return gc(ROOT) or "unknown"  # benchmarks/.commit in an archived tree, else git HEAD


def device_label(device: torch.device) -> tuple[str, str]:
    """(file slug, readable name)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-"), name
    return "cpu", f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical cores)"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_meta(batch: int, context: int, block_size: int, device: torch.device) -> AttentionMetadata:
    """``batch`` sequences of ``context`` tokens each decoding one token (sequence s owns its own blocks)."""
    per_seq = -(-(context + 1) // block_size)
    tables = [[1 + s * per_seq + j for j in range(per_seq)] for s in range(batch)]
    pos = [context] * batch
    slots = [tables[s][context // block_size] * block_size + context % block_size for s in range(batch)]
    qsl = list(range(batch + 1))
    seq = [context + 1] * batch
    i32 = {"dtype": torch.int32, "device": device}
    return AttentionMetadata(
        num_tokens=batch, num_seqs=batch, positions=torch.tensor(pos, device=device),
        slot_mapping=torch.tensor(slots, device=device), query_start_loc=torch.tensor(qsl, **i32),
        seq_lens=torch.tensor(seq, **i32), block_tables=torch.tensor(tables, **i32), max_query_len=1,
        max_seq_len=context + 1, query_start_loc_cpu=qsl, seq_lens_cpu=seq)


def make_client(args: argparse.Namespace, mode: str, device: torch.device, dtype: torch.dtype,
                num_blocks: int) -> AttnWorkerClient:
    K, off = args.kv_heads, args.offload
    spec = AttnSpec(name=f"bench/{mode}", num_layers=args.layers, num_heads=args.heads, num_kv_heads=K,
                    head_dim=args.head_dim, num_blocks=num_blocks, block_size=args.block_size,
                    dtype=str(dtype).removeprefix("torch."), head_start=K - off, num_heads_held=off,
                    device=str(device), backend="auto", torch_threads=args.worker_threads)
    client = AttnWorkerClient(AttnWorkerConf("bench:1", device=str(device), torch_threads=args.worker_threads), spec,
                              recv_timeout_s=120.0)
    try:
        client.wait_ready(300.0)
        client.setup_data_path(device, mode, tokens=max(args.batches))
    except BaseException:
        client.stop()
        raise
    return client


def run(args: argparse.Namespace, modes: list[str], device: torch.device, dtype: torch.dtype) -> list[dict]:
    """One attention worker per path, all started up front; the paths take turns step by step (the order
    alternating), so that a busy machine slows them alike."""
    H, K, D, bs = args.heads, args.kv_heads, args.head_dim, args.block_size
    g, off = H // K, args.offload
    kept = K - off
    num_blocks = 1 + max(args.batches) * -(-(args.context + 1) // bs)
    clients: dict[str, AttnWorkerClient] = {}
    rows = []
    med = statistics.median
    try:
        for mode in modes:
            clients[mode] = make_client(args, mode, device, dtype, num_blocks)
        own_backend = get_attention_backend("auto", device)
        own_caches = [torch.zeros(2, num_blocks, bs, kept, D, dtype=dtype, device=device) for _ in range(args.layers)]
        gen = torch.Generator(device=device).manual_seed(0)
        for batch in args.batches:
            meta = decode_meta(batch, args.context, bs, device)
            q = torch.randn(batch, H, D, generator=gen, device=device).to(dtype)
            k = torch.randn(batch, K, D, generator=gen, device=device).to(dtype)
            v = torch.randn(batch, K, D, generator=gen, device=device).to(dtype)
            qr, kr, vr = q[:, kept * g :], k[:, kept:], v[:, kept:]
            ql, kl, vl = q[:, : kept * g].contiguous(), k[:, :kept].contiguous(), v[:, :kept].contiguous()
            rec = {m: {"rt": [], "comp": [], "lay": []} for m in modes}
            own: list[float] = []
            for step in range(args.warmup + args.repeats):
                order = modes if step % 2 == 0 else modes[::-1]
                for mode in order:
                    client, r = clients[mode], rec[mode]
                    client.start_step(meta)  # once per step, as the backend does (not timed)
                    for layer in range(args.layers):
                        sync(device)
                        t0 = time.perf_counter()
                        client.send_layer(layer, qr, kr, vr, 0.088, None)
                        out = client.recv_layer().to(device=device, dtype=dtype)
                        sync(device)
                        t1 = time.perf_counter()
                        c = client.last_compute_s
                        # the layer as HeadSplitBackend runs it: send, own heads, receive, concatenate
                        client.send_layer(layer, qr, kr, vr, 0.088, None)
                        mine = own_backend.forward(ql, kl, vl, own_caches[layer], meta, 0.088, None) if kept else None
                        out = client.recv_layer().to(device=device, dtype=dtype)
                        res = out if mine is None else torch.cat([mine, out], dim=1)
                        sync(device)
                        t2 = time.perf_counter()
                        assert res.shape == (batch, H, D)
                        if step >= args.warmup:
                            r["rt"].append(t1 - t0)
                            r["comp"].append(c)
                            r["lay"].append(t2 - t1)
                if kept:
                    for layer in range(args.layers):
                        sync(device)
                        t0 = time.perf_counter()
                        own_backend.forward(ql, kl, vl, own_caches[layer], meta, 0.088, None)
                        sync(device)
                        if step >= args.warmup:
                            own.append(time.perf_counter() - t0)
            for mode in modes:
                r = rec[mode]
                row = {"path": mode, "data_path": clients[mode].data_path, "batch": batch, "samples": len(r["rt"]),
                       "rt_ms": 1e3 * med(r["rt"]), "compute_ms": 1e3 * med(r["comp"]),
                       "overhead_ms": 1e3 * med([a - b for a, b in zip(r["rt"], r["comp"])]),
                       "layer_ms": 1e3 * med(r["lay"]), "own_ms": 1e3 * med(own) if own else 0.0,
                       "rt_ms_p90": 1e3 * sorted(r["rt"])[int(0.9 * (len(r["rt"]) - 1))]}
                rows.append(row)
                print(json.dumps(row), flush=True)
        for mode in modes:
            rows.append({"path": mode, "data_path": clients[mode].data_path, "stats": dict(clients[mode].stats)})
    finally:
        for c in clients.values():
            c.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (main and attention worker both there)")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--offload", type=int, default=4, help="KV heads on the attention worker")
    ap.add_argument("--context", type=int, default=256, help="tokens already in each sequence's KV")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 on cuda")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--worker-threads", type=int, default=1)
    ap.add_argument("--paths", default="frames,mailbox")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    args.batches = [int(x) for x in args.batches.split(",")]
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    if not 0 < args.offload <= args.kv_heads or args.heads % args.kv_heads:
        raise SystemExit("need 0 < --offload <= --kv-heads and --heads a multiple of --kv-heads")
    slug, name = device_label(device)
    results = run(args, args.paths.split(","), device, dtype)
    by = {(r["path"], r["batch"]): r for r in results if "batch" in r}
    summary = []
    for b in args.batches:
        f, m = by.get(("frames", b)), by.get(("mailbox", b))
        if f and m:
            summary.append({"batch": b, "frames_rt_ms": f["rt_ms"], "mailbox_rt_ms": m["rt_ms"],
                            "rt_speedup": f["rt_ms"] / m["rt_ms"], "frames_overhead_ms": f["overhead_ms"],
                            "mailbox_overhead_ms": m["overhead_ms"], "frames_layer_ms": f["layer_ms"],
                            "mailbox_layer_ms": m["layer_ms"]})
    out = {
        "command": " ".join([sys.executable, *sys.argv]), "git_commit": git_commit(), "device": name,
        "device_kind": device.type, "torch": torch.__version__, "host_cpus": os.cpu_count(),
        "config": {"heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                   "offloaded_kv_heads": args.offload, "layers": args.layers, "context": args.context,
                   "block_size": args.block_size, "dtype": str(dtype).removeprefix("torch."),
                   "batches": args.batches, "repeats": args.repeats, "warmup": args.warmup,
                   "worker_threads": args.worker_threads, "main_threads": torch.get_num_threads()},
        "note": "medians over repeats x layers; rt = send->recv with nothing between; overhead = rt - worker "
                "compute; layer = send, main's own heads, recv, cat",
        "summary": summary, "results": results,
    }
    path = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"hetis_path_{slug}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    for s in summary:
        print(f"batch {s['batch']:3d}: frames {s['frames_rt_ms']:.3f} ms  mailbox {s['mailbox_rt_ms']:.3f} ms  "
              f"(x{s['rt_speedup']:.2f}); overhead {s['frames_overhead_ms']:.3f} -> {s['mailbox_overhead_ms']:.3f} ms")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
