"""``hetserve demo --cluster cpu-pair``: DP and PD over two CPU worker processes on a short trace.

The trace is the Azure conversation excerpt (tests/data/azure_conv_excerpt.csv), scaled down to the tiny
model (prompt and output lengths divided, arrivals compressed). One worker is paced to half speed: the
computation is real, the wait after each step is emulation (``paced_cpu`` in the cluster file).
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from datetime import datetime
from pathlib import Path
from typing import Any

_TRACE = Path(__file__).resolve().parents[2] / "tests" / "data" / "azure_conv_excerpt.csv"


def load_trace(path: Path, num_requests: int, time_scale: float) -> list[tuple[float, int, int]]:
    """(arrival_s, prompt_len, output_len) of the first requests, scaled to a tiny model."""
    rows = []
    with open(path) as f:
        for r in csv.DictReader(f):
            rows.append(r)
            if len(rows) >= num_requests:
                break
    t0 = datetime.fromisoformat(rows[0]["TIMESTAMP"][:26])
    out = []
    for r in rows:
        t = (datetime.fromisoformat(r["TIMESTAMP"][:26]) - t0).total_seconds() * time_scale
        out.append((t, max(4, min(96, int(r["ContextTokens"]) // 8)), max(2, min(24, int(r["GeneratedTokens"]) // 4))))
    return out


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def replay(engine: Any, trace: list[tuple[float, int, int]]) -> dict[str, float]:
    from hetserve.core.sampling_params import SamplingParams

    start = time.monotonic()
    arrivals: dict[str, float] = {}
    first: dict[str, float] = {}
    ttft: list[float] = []
    tpot: list[float] = []
    num_tokens = 0
    errors = 0
    i = 0
    while i < len(trace) or engine.has_unfinished_requests():
        now = time.monotonic() - start
        while i < len(trace) and trace[i][0] <= now:
            _, plen, olen = trace[i]
            rid = str(i)
            engine.add_request(rid, [1 + (i * 13 + j) % 500 for j in range(plen)],
                               SamplingParams(max_tokens=olen, temperature=0.0, ignore_eos=True))
            arrivals[rid] = time.monotonic()
            i += 1
        for o in engine.step():
            t = time.monotonic()
            c = o.outputs[0]
            if c.token_ids and o.request_id not in first:
                first[o.request_id] = t
                ttft.append(t - arrivals[o.request_id])
            if o.finished:
                if c.finish_reason == "error":
                    errors += 1
                    continue
                num_tokens += len(c.token_ids)
                if len(c.token_ids) > 1:
                    tpot.append((t - first[o.request_id]) / (len(c.token_ids) - 1))
    dur = time.monotonic() - start
    return {"ttft_p50_ms": 1e3 * _pct(ttft, 0.5), "ttft_p99_ms": 1e3 * _pct(ttft, 0.99),
            "tpot_p50_ms": 1e3 * _pct(tpot, 0.5), "tpot_p99_ms": 1e3 * _pct(tpot, 0.99),
            "tok_per_s": num_tokens / dur, "req_per_s": len(trace) / dur, "errors": errors,
            "mean_ttft_ms": 1e3 * statistics.fmean(ttft) if ttft else float("nan")}


def run_cluster_demo(args: argparse.Namespace) -> int:
    from hetserve.runtime.cluster_engine import from_cluster
    from hetserve.tiny.make_tiny import default_model_dir

    model = str(args.model or default_model_dir())
    trace = load_trace(_TRACE, getattr(args, "num_prompts", 24) or 24, 0.05)
    print(f"hetserve demo --cluster {args.cluster}: {len(trace)} requests of the Azure conversation excerpt, "
          "lengths / 8 (prompt) and / 4 (output), arrivals x 0.05")
    results = {}
    for strategy, kw in (("dp", {}), ("pd", {"block_sizes": {"decode0": 32}, "kv_layouts": {"decode0": "HND"}})):
        eng = from_cluster(model, args.cluster, strategy, max_model_len=256, num_kv_blocks=256, **kw)
        try:
            speeds = {n: i.worker.spec.speed for n, i in eng.instances.items()}
            print(f"  {strategy}: instances {speeds} (speed < 1: emulated, paced_cpu)", flush=True)
            results[strategy] = replay(eng, trace)
        finally:
            eng.shutdown()
    cols = ["ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "tpot_p99_ms", "tok_per_s", "req_per_s", "errors"]
    print("\n" + f"{'strategy':<9}" + "".join(f"{c:>13}" for c in cols))
    for s, r in results.items():
        print(f"{s:<9}" + "".join(f"{r[c]:>13.1f}" for c in cols))
    print("\nEmulation: both workers are CPU processes on this host; the half-speed one sleeps after each step "
          "until a device of half the speed would have finished. PD: prefill on the full-speed worker, decode on "
          "the half-speed one; KV block 16 NHD -> block 32 HND on the wire, NHD in the decode runner.")
    return 0 if all(r["errors"] == 0 for r in results.values()) else 1
