"""The device's own time for steps the online engine ran, with the host far ahead (issue 6).

``gpu_online_fidelity.py --steps`` records each real step's shape and its span on the device (CUDA events,
idle gaps included). This re-runs a sample of those shapes on a runner while the device is held busy by a sleep
kernel, so the whole step is queued before the device reaches it: the span measured then is the device's time
alone, with no host pacing. Per shape it sets side by side: the online span, this host-ahead span, and the
cost model's device time (profile tables). Where online > host-ahead, the online engine left the device idle;
where host-ahead > model, the tables miss device work.

    python benchmarks/gpu_step_span.py --steps-from results/engine-s6/gpu-online-fidelity-conv.json \\
        --rate 12 --profile results/engine-s5/profile-h100-sxm-s5.json

Writes ``gpu-step-span.json`` under ``$OUT`` (or ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def classify(shape: Any, piecewise_max: int) -> str:
    if not shape.prefill_chunks:
        return "decode"
    return f"mixed<={piecewise_max}" if shape.num_tokens <= piecewise_max else f"mixed>{piecewise_max}"


def pick(rows: list[list[Any]], fields: list[str], per_class: int, piecewise_max: int) -> list[tuple[Any, float]]:
    """Up to ``per_class`` recorded steps of each class, spread evenly over the run: (shape, online span)."""
    from hetserve.planner.batch_shape import BatchShape

    f = {k: i for i, k in enumerate(fields)}
    by: dict[str, list[tuple[Any, float]]] = {}
    for r in rows:
        if r[f["device_span_s"]] is None:
            continue
        shape = BatchShape(tuple(tuple(c) for c in r[f["prefill_chunks"]]), r[f["num_decode_seqs"]],
                           r[f["decode_context_tokens"]], r[f["num_sampled"]])
        by.setdefault(classify(shape, piecewise_max), []).append((shape, r[f["device_span_s"]]))
    out = []
    for items in by.values():
        step = max(1, len(items) // per_class)
        out += items[::step][:per_class]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps-from", required=True, help="gpu_online_fidelity.py --steps result(s), comma-separated")
    ap.add_argument("--rate", type=float, default=12.0)
    ap.add_argument("--per-class", type=int, default=30)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--profile", default=str(ROOT / "profiles/h100-sxm-llama-3.1-8b.json"))
    args = ap.parse_args()

    import torch
    from suite_common import build_big_model, git_commit, make_runner, sync, write_result

    from hetserve.core.devices import get_device
    from hetserve.core.outputs import SchedulerOutput
    from hetserve.planner.costmodel import CostModel
    from hetserve.planner.profile import load_profile
    from hetserve.profiling import synthetic_step

    dev = torch.device("cuda")
    big = build_big_model(ROOT / "examples/models/llama-3.1-8b/config.json", None, dev, "bfloat16",
                          Path(tempfile.mkdtemp()))
    runner, _ = make_runner(big, None, {"piecewise_graph_max_tokens": 1024, "cuda_graph_max_batch": 512},
                            max_num_seqs=256, max_num_batched_tokens=8192, max_model_len=4096,
                            enable_prefix_caching=False)
    prof = load_profile(Path(args.profile))
    cm = CostModel(big.cfg, get_device("H100-SXM"), "bfloat16", profile=prof)
    pw = cm.piecewise_max_tokens
    results: dict[str, Any] = {}
    for src in args.steps_from.split(","):
        doc = json.loads(Path(src).read_text())
        run = next(r for r in doc["results"] if abs(r["rate"] - args.rate) < 1e-9)
        chosen = pick(run["steps"]["rows"], run["steps"]["fields"], args.per_class, pw)
        rows = []
        for k, (shape, online) in enumerate(chosen):
            nd = shape.num_decode_seqs
            ctx = shape.decode_context_tokens // nd if nd else 0
            seqs = [(f"s{k}-d{i}", 1, ctx) for i in range(nd)]
            seqs += [(f"s{k}-p{i}", n, c) for i, (n, c) in enumerate(shape.prefill_chunks)]
            first = synthetic_step(seqs, runner.block_size, new=True, vocab_size=big.cfg.vocab_size,
                                   num_pool_blocks=runner.num_kv_blocks)
            again = synthetic_step(seqs, runner.block_size, new=False, vocab_size=big.cfg.vocab_size,
                                   num_pool_blocks=runner.num_kv_blocks)
            step = again if not shape.prefill_chunks else first
            runner.execute(first)
            sync(dev)
            spans, launches = [], []
            for _ in range(args.repeat):
                torch.cuda._sleep(200_000_000)  # ~0.1 s: the device stays busy while the host queues the step
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0 = time.perf_counter()
                e0.record()
                res = runner.execute_async(step)
                e1.record()
                launches.append(time.perf_counter() - t0)
                res.result()
                sync(dev)
                spans.append(e0.elapsed_time(e1) / 1e3)
            runner.execute(SchedulerOutput([], 0, finished_req_ids={r for r, _, _ in seqs}))
            b = cm.breakdown(shape)
            model = sum(v for key, v in b.items() if key not in ("overhead", "async_overlap"))
            rows.append({"class": classify(shape, pw), "num_decode_seqs": nd, "decode_context_tokens":
                         shape.decode_context_tokens, "prefill_chunks": [list(c) for c in shape.prefill_chunks],
                         "online_span_s": online, "host_ahead_span_s": statistics.median(spans),
                         "launch_s": statistics.median(launches), "model_device_s": model})
        summary = {}
        for cls in sorted({r["class"] for r in rows}):
            rs = [r for r in rows if r["class"] == cls]
            on, ahead, mod = (sum(r[k] for r in rs) for k in ("online_span_s", "host_ahead_span_s", "model_device_s"))
            summary[cls] = {"steps": len(rs), "online_ms": 1e3 * on / len(rs), "host_ahead_ms": 1e3 * ahead / len(rs),
                            "model_ms": 1e3 * mod / len(rs), "online_over_ahead": on / ahead,
                            "model_over_ahead": mod / ahead,
                            "launch_ms": 1e3 * statistics.median(r["launch_s"] for r in rs)}
            s = summary[cls]
            print(f"{Path(src).name} @ {args.rate:g}: {cls:12s} {len(rs):3d} steps  online {s['online_ms']:7.2f}  "
                  f"host-ahead {s['host_ahead_ms']:7.2f}  model {s['model_ms']:7.2f} ms  online/ahead "
                  f"{s['online_over_ahead']:.3f}  model/ahead {s['model_over_ahead']:.3f}  launch "
                  f"{s['launch_ms']:.2f} ms", flush=True)
        results[Path(src).name] = {"summary": summary, "rows": rows}
    out = {"benchmark": "device time of recorded online steps, host ahead of the device", "command": " ".join(sys.argv),
           "git_commit": git_commit(), "device": torch.cuda.get_device_name(), "emulation": None,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "profile": args.profile, "rate": args.rate,
           "results": results}
    write_result("gpu-step-span.json", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
