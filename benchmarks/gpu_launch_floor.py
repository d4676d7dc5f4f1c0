"""Runner step times of mixed prefill + decode steps with and without piecewise CUDA graphs, side by side.

The cost model floors every step the runtime cannot replay as one graph at a host launch cost per layer
(``planner/costmodel.py``, ``EAGER_FLOOR_S_PER_LAYER``). This measures that floor for eager steps and for steps
replayed as piecewise graphs around eager attention: small mixed steps (the device's work is tiny, so the step
time is the host's launch time), and larger ones (where the launch hides behind the device's work).

    python benchmarks/gpu_launch_floor.py [--layers 32] [--repeat 20]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch
from suite_common import build_big_model, git_commit, make_runner, runner_step_times

from hetserve import kernels

# (label, [(new tokens, cached tokens) per request])
SHAPES = {
    # the cost model's EAGER_FLOOR_S_PER_LAYER: a batch-4 decode, run eager (--modes 0), over the layers
    "decode 4 (the eager floor)": [(1, 512)] * 4,
    "mixed 8 decodes + 24-token chunk": [(1, 512)] * 8 + [(24, 0)],
    "mixed 64 decodes + 64-token chunk": [(1, 512)] * 64 + [(64, 0)],
    "mixed 256 decodes + 256-token chunk": [(1, 512)] * 256 + [(256, 0)],
    "mixed 384 decodes + 512-token chunk": [(1, 512)] * 384 + [(512, 0)],
    "decode 640 (beyond the decode graphs)": [(1, 512)] * 640,
    "prefill 2048 (beyond the piecewise graphs)": [(2048, 0)],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=None, help="layers of the 8B shape (default: all 32)")
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--modes", default="0,1024", help="piecewise_graph_max_tokens values, side by side")
    ap.add_argument("--eager-decode", action="store_true",
                    help="decode steps eager too (enforce_eager), as on TP ranks and Hetis mains: with --modes 0, "
                         "'decode 4' is the cost model's eager floor")
    ap.add_argument("--ordinary-launch", action="store_true",
                    help="also time each shape with every Triton launch through Triton's ordinary path "
                         "(kernels.DIRECT_LAUNCH off), side by side")
    ap.add_argument("--profile", action="store_true",
                    help="also split each shape's device time by kernel kind (torch.profiler), last mode only")
    args = ap.parse_args()
    dev = torch.device("cuda")
    big = build_big_model(ROOT / "examples/models/llama-3.1-8b/config.json", args.layers, dev, "bfloat16",
                          Path(tempfile.mkdtemp()))
    layers = big.cfg.num_hidden_layers
    results: dict[str, Any] = {}
    for mode in [int(m) for m in args.modes.split(",")]:
        runner, _ = make_runner(big, 8192, {"piecewise_graph_max_tokens": mode, "cuda_graph_max_batch": 512,
                                                  "enforce_eager": args.eager_decode},
                                max_num_seqs=1024, max_num_batched_tokens=4096, max_model_len=4096,
                                enable_prefix_caching=False)
        capture = runner.piecewise.capture_s if runner.piecewise is not None else 0.0
        rows = {}
        for label, seqs in SHAPES.items():
            row: dict[str, Any] = {"tokens": sum(n for n, _ in seqs)}
            for fast in ([True, False] if args.ordinary_launch else [True]):
                kernels.DIRECT_LAUNCH = fast
                launch: list[float] = []
                times = runner_step_times(runner, seqs, big.cfg.vocab_size, dev, warmup=3, repeat=args.repeat,
                                          tag=f"m{mode}-", launch_times=launch)
                med = statistics.median(times)
                sub = {"median_s": med, "per_layer_s": med / layers, "launch_median_s": statistics.median(launch),
                       "times_s": times, "launch_s": launch}
                if fast:
                    row.update(sub)
                else:
                    row["ordinary_launch"] = sub
                print(f"piecewise {mode:5d}  {label:45s} {'' if fast else 'ordinary '}{med * 1e3:8.2f} ms  "
                      f"{med / layers * 1e3:6.3f} ms/layer  launch {sub['launch_median_s'] * 1e3:7.2f} ms",
                      flush=True)
            kernels.DIRECT_LAUNCH = True
            rows[label] = row
        results[f"piecewise_max_tokens={mode}"] = {"capture_s": capture, "rows": rows}
        if args.profile and mode == int(args.modes.split(",")[-1]):
            for label, seqs in {**SHAPES, "decode 384 (ctx 512)": [(1, 512)] * 384}.items():
                split = _kernel_split(runner, seqs, big.cfg.vocab_size, dev)
                rows.setdefault(label, {})["kernel_split_ms"] = split
                print(f"  kernels {label:45s} " + ", ".join(f"{k} {v:.2f}" for k, v in split.items()), flush=True)
        runner.graphs = None
        runner.piecewise = None
        del runner
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    modes = list(results)
    if len(modes) == 2:
        for label in SHAPES:
            a, b = (results[m]["rows"][label]["median_s"] for m in modes)
            print(f"{label:45s} {modes[1]} / {modes[0]}: {b / a:.3f}")
    out = {"benchmark": "runner step times, eager vs piecewise CUDA graphs", "command": " ".join(sys.argv),
           "git_commit": git_commit(), "device": torch.cuda.get_device_name(), "emulation": None,
           "emulated": False, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "config": {"model": "llama-3.1-8b shape, random bf16", "layers": layers, "repeat": args.repeat,
                      "enforce_eager": args.eager_decode},
           "results": results}
    dst = Path(os.environ.get("OUT", ROOT / "benchmarks/results")) / "gpu-launch-floor.json"
    dst.write_text(json.dumps(out, indent=2))
    print(f"wrote {dst}")
    return 0


_KINDS = (("attention", ("_paged_attention", "_reduce_kernel")), ("gemm", ("nvjet", "gemm", "cutlass", "sm90_", "_skinny")),
          ("norm", ("_rms_norm", "_fused_add")), ("rotary", ("_rotary",)), ("silu", ("_silu",)))


def _kernel_split(runner: Any, seqs: list[tuple[int, int]], vocab: int, dev: torch.device) -> dict[str, float]:
    """Device time of one step by kernel kind, ms (median of 3 profiled steps' totals / 3)."""
    from torch.profiler import ProfilerActivity, profile

    runner_step_times(runner, seqs, vocab, dev, warmup=1, repeat=1, tag="pw-")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        runner_step_times(runner, seqs, vocab, dev, warmup=0, repeat=3, tag="pf-")
    split: dict[str, float] = {}
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", 0.0) or 0.0
        if t <= 0:
            continue
        kind = next((k for k, pats in _KINDS if any(p in e.key for p in pats)), "other")
        split[kind] = split.get(kind, 0.0) + t / 1e3 / 4  # 4 executes: the first (new requests) and 3 repeats
    split["total"] = sum(split.values())
    return dict(sorted(split.items(), key=lambda kv: -kv[1]))


if __name__ == "__main__":
    sys.exit(main())
