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

With ``device_span_s`` (CUDA events around each launch), each step's span on the device, idle gaps inside it
included, is set beside the model too (``device span <class>``).

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
from hetserve.profiling.sustained import row_shape

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
    shapes = [row_shape(f, r) for r in rows]
    prev_ready = None
    for i, (r, shape) in enumerate(zip(rows, shapes, strict=True)):
        ready, start = r[f["ready_s"]], r[f["launch_start_s"]]
        if prev_ready is None:
            prev_ready = ready
            continue
        after_gap = start - prev_ready > IDLE_GAP_S
        real = ready - (start if after_gap else prev_ready)
        pred = cm.step_time_s(shape, serial=after_gap)
        if "device_span_s" in f and r[f["device_span_s"]] is not None:
            dkey = "device span " + classify(shape, piecewise_max)
            dd = by.setdefault(dkey, {"real": [], "pred": []})
            dd["real"].append(r[f["device_span_s"]])
            dd["pred"].append(pred)
        key = classify(shape, piecewise_max)
        if key == "decode" and i + 1 < len(shapes) and shapes[i + 1].prefill_chunks:
            # its result is read after the next step's launch: a long launch lands in this step's cadence
            key += f" (before {classify(shapes[i + 1], piecewise_max)})"
        key += " after gap" if after_gap else ""
        d = by.setdefault(key, {"real": [], "pred": []})
        d["real"].append(real)
        d["pred"].append(pred)
        prev_ready = ready
    cadence = {k: d for k, d in by.items() if not k.startswith("device span")}
    total_real = sum(sum(d["real"]) for d in cadence.values()) or 1.0
    total_pred = sum(sum(d["pred"]) for d in cadence.values())
    out: dict[str, Any] = {"all steps": {"steps": sum(len(d["real"]) for d in cadence.values()), "real_s": total_real,
                                         "pred_s": total_pred, "error": (total_pred - total_real) / total_real}}
    for key, d in sorted(by.items()):
        real, pred = sum(d["real"]), sum(d["pred"])
        out[key] = {"steps": len(d["real"]), "real_ms_mean": 1e3 * real / len(d["real"]),
                    "pred_ms_mean": 1e3 * pred / len(d["pred"]), "error": (pred - real) / real,
                    "median_ratio": statistics.median(p / x for p, x in zip(d["pred"], d["real"], strict=True) if x > 0),
                    "share_of_time": real / total_real}
    return out


def real_summary(steps: dict[str, Any], piecewise_max: int) -> dict[str, Any]:
    """The real step sequence in a few numbers per class: steps, mean decode batch, mean tokens."""
    f = {name: i for i, name in enumerate(steps["fields"])}
    shapes = [row_shape(f, r) for r in steps["rows"]]
    return _summary(shapes, None, piecewise_max)


def _summary(shapes: list[BatchShape], times: list[float] | None, piecewise_max: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, sh in enumerate(shapes):
        d = out.setdefault(classify(sh, piecewise_max), {"steps": 0, "decodes": 0, "tokens": 0, "time_s": 0.0})
        d["steps"] += 1
        d["decodes"] += sh.num_decode_seqs
        d["tokens"] += sh.num_tokens
        if times is not None:
            d["time_s"] += times[i]
    for d in out.values():
        d["mean_decode_batch"] = d["decodes"] / d["steps"]
        d["mean_tokens"] = d["tokens"] / d["steps"]
    return out


def sim_summary(res: dict[str, Any], row: dict[str, Any], cm: CostModel, piecewise_max: int,
                max_input: int, max_output: int) -> dict[str, Any]:
    """The simulator's own step sequence for the same requests (as ``gpu_online_fidelity.py --resim`` builds
    them), summarised like the real one, with the simulator's step times."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_online_fidelity import find_trace, rate_workload, sim_deployment

    from hetserve.sim.simulator import Simulator

    c = res["config"]
    wl = rate_workload(find_trace(c.get("trace", "conv")), row["num_requests"], row["rate"], max_input, max_output,
                       seed=int(c.get("seed", 0)))
    dep = sim_deployment(cm, c)
    shapes: list[BatchShape] = []
    times: list[float] = []
    inner = dep.stage_times_s

    def recording(name: str, so: Any, serial: bool = False) -> list[float]:
        t = inner(name, so, serial)
        shapes.append(BatchShape.from_scheduler_output(so))
        times.append(t[0])
        return t

    dep.stage_times_s = recording  # type: ignore[method-assign]
    Simulator(dep).run(wl)
    return _summary(shapes, times, piecewise_max)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("result")
    ap.add_argument("--profile", default=str(ROOT / "profiles/h100-sxm-llama-3.1-8b.json"))
    ap.add_argument("--device", default="H100-SXM")
    ap.add_argument("--piecewise-max", type=int, default=1024)
    ap.add_argument("--sim", action="store_true", help="also run the simulator on the same requests and compare "
                                                      "its step sequence (steps, batch sizes) with the real one")
    ap.add_argument("--max-input", type=int, default=2048)
    ap.add_argument("--max-output", type=int, default=384)
    args = ap.parse_args()
    res = json.loads(Path(args.result).read_text())
    mc = ModelConfig.from_path(ROOT / "examples/models/llama-3.1-8b")
    cm = CostModel(mc, get_device(args.device), "bfloat16", profile=load_profile(args.profile))
    cm.async_scheduling = bool(res.get("config", {}).get("sim_async_overlap", True))
    cm.schedules_ahead = bool(res.get("config", {}).get("async_scheduling", True))
    report: dict[str, Any] = {"source": args.result, "profile": args.profile,
                              "command": " ".join([sys.executable, *sys.argv]),
                              "device": res.get("device"), "emulation": res.get("emulation"),
                              "git_commit": res.get("git_commit"), "rates": {}}
    for row in res["results"]:
        if "steps" not in row:
            continue
        table = analyse(row["steps"], cm, args.piecewise_max)
        report["rates"][str(row["rate"])] = table
        print(f"rate {row['rate']}:")
        if args.sim:
            real_seq = real_summary(row["steps"], args.piecewise_max)
            sim_seq = sim_summary(res, row, cm, args.piecewise_max, args.max_input, args.max_output)
            report["rates"][str(row["rate"])] = {"cadence": table, "real_sequence": real_seq, "sim_sequence": sim_seq}
            for key in sorted(set(real_seq) | set(sim_seq)):
                r, m = real_seq.get(key, {}), sim_seq.get(key, {})
                print(f"  sequence {key:14s} steps real {r.get('steps', 0):5d} sim {m.get('steps', 0):5d}  "
                      f"decode batch {r.get('mean_decode_batch', 0):5.1f} / {m.get('mean_decode_batch', 0):5.1f}  "
                      f"tokens {r.get('mean_tokens', 0):6.1f} / {m.get('mean_tokens', 0):6.1f}  "
                      f"sim time {m.get('time_s', 0):6.2f} s")
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
