"""Direct KV hand-offs between two real worker processes: achieved bandwidth against a paced link, and the
conversion share.

    python benchmarks/kv_runtime.py [--links eth25,0.25] [--transport shm] [--out benchmarks/results/kv_runtime_cpu.json]
    python benchmarks/kv_runtime.py --device cuda --shape llama8b --links pcie4x16,eth25 \
        --out benchmarks/results/kv_runtime_h100.json     # two processes on one GPU: CUDA IPC

``--links``: declared links, each a name from ``core/devices.py`` LINKS or a bandwidth in GB/s (latency 30 us).

Two ``worker.py`` processes (each with its KV endpoint) hold a KV cache: ``--shape tiny`` (CPU default: a tiny
llama, 4 layers, 4 kv heads x 32, fp32: 4 KiB a token) or ``llama8b`` (Llama-3.1-8B's KV: 32 layers, 8 kv heads
x 128, bf16: 128 KiB a token; the other weights are shrunk, they play no part). For each size the coordinator
side sends the receiver ``ExpectKV`` and the sender ``SendKV`` exactly as a PD hand-off does, with the declared
link's bandwidth and latency; the workers answer ``KVSent`` / ``KVIn`` with their figures. Two cases: ``same``
(both caches block 16, NHD: no conversion beyond the copy out of the blocks) and ``convert`` (the receiver
declares block 32, HND: the sender converts to the wire format, the receiver back to its NHD cache).

- ``achieved_usable_fraction``: the same with ``usable_s``, the sender's first byte -> the KV written into the
  receiver's cache (its insert done and synchronised). Comparable across paths: the receiver inserts after the
  bytes are in (``delivered`` then ends before its insert) or on arrival, overlapping the paced link
  (``HETSERVE_KV_SINK``, the default: ``delivered`` then ends after its insert).
- ``achieved`` = bytes / (delivered - latency), delivered = the sender's first byte -> the receiver may use
  the KV (both ``time.monotonic()`` of this host; the paced wait included); goal (issue 7): >= 90% of the
  declared bandwidth for >= 1 MiB. ``sender_wall_s``: the sender's own first byte -> done.
- ``conversion_share`` = (sender extract + convert + receiver convert + insert) / the declared link's time for
  those bytes; goal <= 10%.
- ``handoff_s``: ExpectKV sent -> KVIn received at the coordinator (what a request waits).

``--stream K`` (K > 1) adds rows of ``K`` hand-offs of each size issued back to back, as a loaded prefill
instance sends them to one decode instance (every ``ExpectKV``, then every ``SendKV``, as after a prefill step
that finished K requests): they share the declared link first come, first served, each hand-off's fixed costs
overlap the earlier ones' link time, and sends the sender finds queued together travel in one message
(``kv_batch.py``; ``HETSERVE_KV_BATCH=0``: one message each). ``batches``: the sizes the sender made. ``stream_achieved_fraction`` = all bytes / (the last
hand-off usable - the first hand-off's first byte - latency) / declared bandwidth (``stream_usable_fraction``:
to the last insert synchronised).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from hetserve.core.devices import LINKS, LinkSpec
from hetserve.runtime.kv_layout import wire_descriptor
from hetserve.runtime.kv_messages import ExpectKV, KVSent, KVTarget, SendKV
from hetserve.runtime.worker import KVIn, WorkerHandle, WorkerSpec
from hetserve.tiny.make_tiny import make_tiny_model

SIZES_KIB = [64, 256, 1024, 4096, 16384]
SHAPES = {  # make_tiny_model arguments; KV bytes per token follow from layers x kv heads x head_dim x dtype
    "tiny": {"num_layers": 4, "hidden_size": 256, "num_heads": 8, "num_kv_heads": 4, "head_dim": 32,
             "dtype": "float32"},
    "llama8b": {"num_layers": 32, "hidden_size": 128, "num_heads": 32, "num_kv_heads": 8, "head_dim": 128,
                "intermediate_size": 128, "dtype": "bfloat16"},
}


def _spec(name: str, model: str, block: int, blocks: int, transport: str, device: str, dtype: str,
          env: dict[str, str] | None = None) -> WorkerSpec:
    return WorkerSpec(name=name, model=model, block_size=block, num_blocks=blocks, max_model_len=64,
                      kv_transports=(transport,), device=device, dtype=dtype, env=env or {})


# --mps: the sender is the emulated pair's low-end client (25% of the SMs), the receiver the high-end one (75%),
# as PD with prefill on the low-end device. Without MPS two processes time-slice the GPU: each side's first
# kernel after the other's waits for a context switch (~1 ms), which separate GPUs would not pay.
_MPS_ENV: dict[str, dict[str, str]] = {}


def timeline(runs: list[tuple[KVSent, KVIn, float]]) -> dict[str, float]:
    """Medians over the repeats of each mark of both workers (one host, one monotonic clock), in ms after the
    sender took its ``SendKV``: sender ``send.queued`` (extracted, converted, packed), ``send.ready`` (its GPU
    work done), ``send.sent`` (the transport's send returned: acknowledged); receiver ``recv.taken`` (the last
    piece off its endpoint), ``recv.ready`` (the paced link through: insert starts), ``recv.inserted``,
    ``recv.done`` (synchronised: KVIn goes out)."""
    out: dict[str, list[float]] = {}
    for sent, kin, _ in runs:
        t0 = sent.stages.get("at_cmd")
        if t0 is None:
            return {}
        for side, st in (("send", sent.stages), ("recv", kin.stages)):
            for k, v in st.items():
                if k.startswith("at_") and k != "at_cmd" and v > 0:
                    out.setdefault(f"{side}.{k[3:]}", []).append((v - t0) * 1e3)
    return {k: round(statistics.median(v), 4) for k, v in out.items()}


def usable(sent: KVSent, kin: KVIn) -> float:
    """Seconds from the sender's first byte to the KV in the receiver's cache (its insert synchronised)."""
    return kin.stages.get("at_done", kin.ready_mono) - sent.t0_mono


def parse_link(text: str) -> LinkSpec:
    if text in LINKS:
        return LINKS[text]
    try:
        return LinkSpec(f"{text}GBps", "ethernet", float(text) * 1e9, 30e-6)
    except ValueError:
        raise SystemExit(f"--links: {text!r} is neither a link name ({', '.join(LINKS)}) nor GB/s") from None


def _handoff(snd: WorkerHandle, rcv: WorkerHandle, tid: str, tokens: int, first_block: int, dst_block: int,
             wire: Any, transport: str, n_layers: int, link: LinkSpec, parts: str = "both") -> None:
    """Send the receiver its ``ExpectKV`` (its blocks from ``first_block``) and/or the sender its ``SendKV``."""
    nb = -(-tokens // dst_block)
    if parts in ("both", "expect"):
        rcv.send(ExpectKV(seq=rcv.next_seq(), transfer_id=tid, req_id=tid,
                          block_ids=list(range(first_block, first_block + nb)), num_tokens=tokens, wire=wire,
                          sources=[0], timeout_s=60.0))
    if parts in ("both", "send"):
        snd.send(SendKV(seq=snd.next_seq(), transfer_id=tid, block_ids=list(range(1, -(-tokens // 16) + 1)),
                        num_tokens=tokens, wire=wire, src_rank=0,
                        targets=[KVTarget(kind=transport, address=rcv.kv_addresses[transport],
                                          layer_start=0, layer_end=n_layers)],
                        timeout_s=60.0, link_bandwidth=link.bandwidth_bytes_per_s, link_latency_s=link.latency_s))


def _collect(snd: WorkerHandle, rcv: WorkerHandle, tids: list[str], timeout_s: float = 60.0
             ) -> tuple[dict[str, KVSent], dict[str, KVIn], dict[str, float]]:
    """Every ``KVIn`` (and when it reached us) and ``KVSent`` of ``tids``; all must be ok."""
    sent: dict[str, KVSent] = {}
    kin: dict[str, KVIn] = {}
    arrived: dict[str, float] = {}
    t0 = time.monotonic()
    for w, kind, books in ((rcv, KVIn, kin), (snd, KVSent, sent)):
        while len(books) < len(tids):
            if time.monotonic() - t0 > timeout_s:
                raise TimeoutError(f"{len(books)} of {len(tids)} {kind.__name__} after {timeout_s} s")
            r = w.recv(timeout_s)
            if isinstance(r, kind) and r.transfer_id in tids:
                assert r.ok, r.error
                books[r.transfer_id] = r
                arrived[r.transfer_id] = time.monotonic()
    return sent, kin, arrived


def run_stream(snd: WorkerHandle, rcv: WorkerHandle, case: str, link: LinkSpec, transport: str, repeats: int,
               per_token: int, kib: int, k: int, dst_block: int, wire: Any, n_layers: int, tag: str
               ) -> dict[str, Any]:
    """``k`` hand-offs of ``kib`` KiB issued back to back (distinct receiver blocks), ``repeats`` times."""
    tokens = kib * 1024 // per_token
    nb = -(-tokens // dst_block)
    runs = []
    for rep in range(-1, repeats):  # -1: a warm-up stream, not counted (a new pair's first transfers pay set-up)
        tids = [f"{tag}-{rep}-{i}" for i in range(k)]
        for parts in ("expect", "send"):  # as a prefill step's finished requests: the sender gets its sends at once
            for i, tid in enumerate(tids):
                _handoff(snd, rcv, tid, tokens, 1 + i * nb, dst_block, wire, transport, n_layers, link, parts)
        sent, kin, _ = _collect(snd, rcv, tids)
        if rep < 0:
            continue
        first = min(s.stages.get("at_first", s.t0_mono) for s in sent.values())
        total = sum(s.num_bytes for s in sent.values())
        last_ready = max(r.ready_mono for r in kin.values())
        last_done = max(r.stages.get("at_done", r.ready_mono) for r in kin.values())
        # each hand-off, ms after the first byte: its own first byte, its link start, usable, inserted
        batches = []  # the batch sizes the sender made, in order (a batch's parts share their "at_first")
        for t in tids:
            if not batches or sent[t].stages.get("batch", 1.0) == 1.0 or \
                    sent[t].stages.get("at_first") != sent[tids[tids.index(t) - 1]].stages.get("at_first"):
                batches.append(0)
            batches[-1] += 1
        marks = [[round((x - first) * 1e3, 3) for x in (sent[t].stages.get("at_first", 0.0), sent[t].t0_mono,
                                                         kin[t].ready_mono, kin[t].stages.get("at_done", 0.0))]
                 for t in tids]
        runs.append({"bytes": total, "delivered_s": last_ready - first, "usable_s": last_done - first,
                     "declared_s": link.transfer_time_s(total), "first_link_ready_done_ms": marks,
                     "batches": batches, "timeline_first_ms": timeline([(sent[tids[0]], kin[tids[0]], 0.0)])})
    med = sorted(runs, key=lambda r: r["delivered_s"])[len(runs) // 2]
    bw = link.bandwidth_bytes_per_s
    return {"case": case, "kib": kib, "tokens": tokens, "stream": k, "link": link.name, "transport": transport,
            "declared_bytes_per_s": bw, "num_bytes": med["bytes"], "delivered_s": med["delivered_s"],
            "usable_s": med["usable_s"], "declared_s": med["declared_s"], "repeats": repeats,
            "stream_achieved_fraction": med["bytes"] / max(med["delivered_s"] - link.latency_s, 1e-9) / bw,
            "stream_usable_fraction": med["bytes"] / max(med["usable_s"] - link.latency_s, 1e-9) / bw,
            "batch": os.environ.get("HETSERVE_KV_BATCH", "1") != "0", "runs": runs}


def run_case(model: str, case: str, link: LinkSpec, transport: str, repeats: int, shape: dict[str, Any],
             sizes_kib: list[int], device: str, stream: int = 1) -> list[dict[str, Any]]:
    link_name = link.name
    item = 4 if shape["dtype"] == "float32" else 2
    n_layers = shape["num_layers"]
    per_token = n_layers * 2 * shape["num_kv_heads"] * shape["head_dim"] * item
    max_tokens = sizes_kib[-1] * 1024 // per_token
    dst_block = 32 if case == "convert" else 16
    snd = WorkerHandle(_spec("prefill0", model, 16, max_tokens // 16 + 2, transport, device,
                             shape["dtype"], _MPS_ENV.get("sender"))).launch()
    rcv = WorkerHandle(_spec("decode0", model, dst_block, stream * (-(-max_tokens // dst_block)) + 2, transport,
                             device, shape["dtype"], _MPS_ENV.get("receiver"))).launch()
    rows = []
    try:
        snd.wait_ready()
        rcv.wait_ready()
        declared = rcv.desc if case == "same" else dataclasses.replace(rcv.desc, layout="HND")
        wire = wire_descriptor(snd.desc, declared)
        n = 0
        for kib in sizes_kib if stream > 1 else []:
            r = run_stream(snd, rcv, case, link, transport, repeats, per_token, kib, stream, dst_block, wire,
                           n_layers, f"{case}-{kib}")
            rows.append(r)
            print(f"{case:8s} {kib:6d} KiB x {stream} back to back: achieved {r['stream_achieved_fraction']:6.1%} "
                  f"(usable {r['stream_usable_fraction']:6.1%}) of {link_name}, batches "
                  f"{[x['batches'] for x in r['runs']]}")
        for kib in sizes_kib:
            tokens = kib * 1024 // per_token
            runs = []
            for _ in range(repeats):
                n += 1
                tid = f"b{n}"
                t0 = time.monotonic()
                _handoff(snd, rcv, tid, tokens, 1, dst_block, wire, transport, n_layers, link)
                sent_d, kin_d, arrived = _collect(snd, rcv, [tid])
                sent, kin, handoff_s = sent_d[tid], kin_d[tid], arrived[tid] - t0
                runs.append((sent, kin, handoff_s))
            def delivered(r: tuple[KVSent, KVIn, float]) -> float:
                return r[1].ready_mono - r[0].t0_mono

            sent, kin, handoff_s = sorted(runs, key=delivered)[len(runs) // 2]  # the median run
            dl = delivered((sent, kin, handoff_s))
            net = max(dl - link.latency_s, 1e-9)
            conv = statistics.median(r[0].convert_s + r[1].convert_s for r in runs)
            rows.append({
                "case": case, "kib": kib, "tokens": tokens, "num_bytes": sent.num_bytes, "link": link_name,
                "transport": transport, "declared_bytes_per_s": link.bandwidth_bytes_per_s, "delivered_s": dl,
                "sender_wall_s": sent.wall_s, "declared_s": sent.declared_s,
                # usable: the sender's first byte -> the KV written into the receiver's cache (KVIn's last mark):
                # the same end point whichever side converts, and whether or not the insert overlaps the link
                "usable_s": usable(sent, kin),
                "achieved_usable_fraction": sent.num_bytes / max(usable(sent, kin) - link.latency_s, 1e-9)
                / link.bandwidth_bytes_per_s,
                "achieved_bytes_per_s": sent.num_bytes / net,
                "achieved_fraction": sent.num_bytes / net / link.bandwidth_bytes_per_s,
                "send_convert_s": statistics.median(r[0].convert_s for r in runs),
                "recv_convert_s": statistics.median(r[1].convert_s for r in runs),
                "conversion_share": conv / sent.declared_s, "handoff_s": handoff_s,
                "handoff_median_s": statistics.median(r[2] for r in runs), "repeats": len(runs),
                # host seconds per stage, medians over the repeats: where a hand-off's fixed cost goes
                "send_stages_s": {k: statistics.median(r[0].stages.get(k, 0.0) for r in runs)
                                  for k in runs[0][0].stages if not k.startswith("at_")},
                "recv_stages_s": {k: statistics.median(r[1].stages.get(k, 0.0) for r in runs)
                                  for k in runs[0][1].stages if not k.startswith("at_")},
                "timeline_ms": timeline(runs),
            })
            r = rows[-1]
            print(f"{case:8s} {kib:6d} KiB  achieved {r['achieved_fraction']:6.1%} (usable "
                  f"{r['achieved_usable_fraction']:6.1%}) of {link_name}  "
                  f"conversion {r['conversion_share']:6.1%}  hand-off {handoff_s * 1e3:7.2f} ms  "
                  f"timeline {r['timeline_ms']}")
    finally:
        snd.stop()
        rcv.stop()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--links", default="eth25,0.25")
    ap.add_argument("--transport", default="shm", choices=["shm", "tcp", "nixl"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu", help="cpu, or cuda: both workers on this GPU (CUDA IPC)")
    ap.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    ap.add_argument("--sizes-kib", default=",".join(map(str, SIZES_KIB)),
                    help="KV sizes per hand-off (llama8b: 128 KiB a token; e.g. 1024,4096,16384,65536,262144)")
    ap.add_argument("--mps", action="store_true", help="cuda: run the workers as MPS clients (25%% sender, 75%% "
                    "receiver), as on the emulated pair")
    ap.add_argument("--stream", type=int, default=1, help="also K hand-offs of each size back to back (K > 1)")
    ap.add_argument("--out", default="benchmarks/results/kv_runtime_cpu.json")
    args = ap.parse_args()
    if args.mps:
        from hetserve.device.mps import MpsDaemon

        mps = MpsDaemon().start()
        _MPS_ENV["sender"] = mps.client_env(25)
        _MPS_ENV["receiver"] = mps.client_env(75)
    try:
        _run(args)
    finally:
        if args.mps:
            mps.stop()


def _run(args: argparse.Namespace) -> None:
    try:
        sizes = sorted(int(x) for x in args.sizes_kib.split(","))
    except ValueError:
        raise SystemExit(f"--sizes-kib: integers separated by commas, got {args.sizes_kib!r}") from None
    shape = SHAPES[args.shape]
    with tempfile.TemporaryDirectory() as tmp:
        model = str(make_tiny_model(Path(tmp) / "m", "llama", **shape))
        rows = [r for lk in args.links.split(",") for case in ("same", "convert")
                for r in run_case(model, case, parse_link(lk), args.transport, args.repeats, shape, sizes,
                                  args.device, args.stream)]
    from hetserve.cli.profile import git_commit

    commit = git_commit(Path(__file__).resolve().parents[1])  # benchmarks/.commit in an archived tree, else HEAD
    if args.device.startswith("cuda"):
        import torch

        dev = f"{torch.cuda.get_device_name()} (torch {torch.__version__}), both workers on it, " + (
            "MPS clients 25% (sender) / 75% (receiver): emulated" if args.mps else "no MPS (time-sliced)") + \
            ", CUDA IPC between the two processes"
    else:
        dev = f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()}), both workers on it"
    out = {"command": " ".join([sys.executable, *sys.argv]), "git_commit": commit,
           "device": dev,
           "emulation": "links paced to the declared bandwidth and latency (the bytes really move; the wait is "
                        "what the declared link would cost)",
           "config": {"links": args.links, "transport": args.transport, "repeats": args.repeats,
                      "shape": args.shape, "kv_shape": shape, "sizes_kib": sizes, "device": args.device,
                      "stream": args.stream,
                      "mps": args.mps},
           "loadavg": list(os.getloadavg()),
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
