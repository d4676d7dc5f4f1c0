"""Where the simulator's step times miss the real engine's, step by step (issue 6).

Reads a ``gpu_online_fidelity.py --steps`` result: for every step the real engine ran, its batch shape and when
its result was ready. With async scheduling the host reads step N's result after launching step N+1, so the
gap between two results is the cadence the engine ran at: the device's step when the device is the bottleneck,
the host's when it is not. The cost model's step time (async: max(device, host); after an idle gap: both in
series, as the simulator charges it) is set beside it, per class of step:

* ``decode`` (only decodes: a CUDA graph), ``mixed<=P`` (a prefill chunk, at most the piecewise-graph limit P
  tokens), ``mixed>P`` (eager), each split into steps that followed a busy engine and steps after an idle gap.

    python benchmarks/fidelity_steps.py RESULT.json [--profile profiles/h100-sxm-llama-3.1-8b.json]

Prints a table and writes ``RESULT-steps.json`` beside the input.

Caveat: an eager step's launch keeps the host busy for most of its device time, so the result of the step
before it is read late: that step's cadence grows and the eager step's shrinks. Compare the classes on either
side of eager steps together, or the totals.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hetserve.core.devices import get_device
from hetserve.core.model_config import ModelConfig
from hetserve.planner.batch_shape import BatchShape
from hetserve.planner.costmodel import CostModel
from hetserve.planner.profile import load_profile

#: a step whose launch started this long after the previous result counts as after an idle gap
IDLE_GAP_S = 0.5e-3


def classify(shape: BatchShape, piecewise_max: int) -> str:
    if not shape.prefill_chunks:
        return "decode"
    return f"mixed<={piecewise_max}" if shape.num_tokens <= piecewise_max else f"mixed>{piecewise_max}"


def analyse(steps: dict[str, Any], cm: CostModel, piecewise_max: int) -> dict[str, Any]:
    f = {name: i for i, name in enumerate(steps["fields"])}
    rows = sorted(steps["rows"], key=lambda r: r[f["ready_s"]])
    by: dict[str, dict[str, list[float]]] = {}
    prev_ready = None
    for r in rows:
        shape = BatchShape(tuple(tuple(c) for c in r[f["prefill_chunks"]]), r[f["num_decode_seqs"]],
                           r[f["decode_context_tokens"]], r[f["num_sampled"]], r[f["num_new_seqs"]],
                           r[f["new_seq_tokens"]])
        ready, start = r[f["ready_s"]], r[f["launch_start_s"]]
        if prev_ready is None:
            prev_ready = ready
            continue
        after_gap = start - prev_ready > IDLE_GAP_S
        real = ready - (start if after_gap else prev_ready)
        pred = cm.step_time_s(shape, serial=after_gap)
        key = classify(shape, piecewise_max) + (" after gap" if after_gap else "")
        d = by.setdefault(key, {"real": [], "pred": []})
        d["real"].append(real)
        d["pred"].append(pred)
        prev_ready = ready
    total_real = sum(sum(d["real"]) for d in by.values()) or 1.0
    total_pred = sum(sum(d["pred"]) for d in by.values())
    out: dict[str, Any] = {"all steps": {"steps": sum(len(d["real"]) for d in by.values()), "real_s": total_real,
                                         "pred_s": total_pred, "error": (total_pred - total_real) / total_real}}
    for key, d in sorted(by.items()):
        real, pred = sum(d["real"]), sum(d["pred"])
        out[key] = {"steps": len(d["real"]), "real_ms_mean": 1e3 * real / len(d["real"]),
                    "pred_ms_mean": 1e3 * pred / len(d["pred"]), "error": (pred - real) / real,
                    "median_ratio": statistics.median(p / x for p, x in zip(d["pred"], d["real"], strict=True) if x > 0),
                    "share_of_time": real / total_real}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("result")
    ap.add_argument("--profile", default=str(ROOT / "profiles/h100-sxm-llama-3.1-8b.json"))
    ap.add_argument("--device", default="H100-SXM")
    ap.add_argument("--piecewise-max", type=int, default=1024)
    args = ap.parse_args()
    res = json.loads(Path(args.result).read_text())
    mc = ModelConfig.from_path(ROOT / "examples/models/llama-3.1-8b")
    cm = CostModel(mc, get_device(args.device), "bfloat16", profile=load_profile(args.profile))
    cm.async_scheduling = bool(res.get("config", {}).get("sim_async_overlap", True))
    report: dict[str, Any] = {"source": args.result, "profile": args.profile, "rates": {}}
    for row in res["results"]:
        if "steps" not in row:
            continue
        table = analyse(row["steps"], cm, args.piecewise_max)
        report["rates"][str(row["rate"])] = table
        print(f"rate {row['rate']}:")
        tot = table["all steps"]
        print(f"  all {tot['steps']} steps: real {tot['real_s']:.2f} s, model {tot['pred_s']:.2f} s "
              f"({100 * tot['error']:+.1f}%)")
        for key, t in table.items():
            if key == "all steps":
                continue
            print(f"  {key:24s} {t['steps']:5d} steps  real {t['real_ms_mean']:7.2f} ms  model {t['pred_ms_mean']:7.2f} ms"
                  f"  error {100 * t['error']:+5.1f}%  median ratio {t['median_ratio']:.2f}  time {100 * t['share_of_time']:4.1f}%")
    dst = Path(args.result).with_name(Path(args.result).stem + "-steps.json")
    dst.write_text(json.dumps(report, indent=1))
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
