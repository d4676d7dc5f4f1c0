#!/usr/bin/env python
"""GPU check and timing of the single-device fast path (Triton kernels, fused model, CUDA graphs, runner).

    python benchmarks/gpu_kernels.py            # everything, < 4 min on an H100
    python benchmarks/gpu_kernels.py --sections kernels,attention --budget-s 120

Sections (each fails soft: an exception is printed and recorded, the rest still runs):
  calibrate   copy bandwidth (2 GiB device copy, read+write) and bf16 8192^3 matmul rate
  kernels     every Triton kernel against its torch reference on Llama-8B shapes (bf16; max and relative error)
  attention   decode attention (batch 1..256, ctx 1k/4k; KV bandwidth) and prefill attention (512..8k; TFLOP/s,
              next to torch SDPA), CUDA-event medians of 20 after warmup, inputs rotated past L2
  model       8B-shaped random bf16 model on the GPU: fused path vs the reference path, graph replay vs eager
  decode      full decode step (forward + logits + argmax) at batch 1/8/32/64/128/256 x ctx 1k/4k, with and
              without CUDA graphs; bandwidth utilisation = (weights read + KV read) / time / copy bandwidth
  prefill     one sequence of 512/2k/4k/8k tokens; TFLOP/s and utilisation against the measured matmul rate
  profile     kernel-level time split (torch.profiler) of a decode step (batch 1 and 64, ctx 1k) and a 4k prefill
  engine      scheduler + runner (CUDA graphs, greedy fast path) over the 300 Azure-conv requests in
              tests/data (random prompt ids, forced output lengths): output tok/s and host-time split
  tune        a few alternative attention tile configs (decode and prefill), to pick defaults

Writes JSON to $OUT/gpu_kernels.json when $OUT is set, else benchmarks/results/gpu_kernels-<time>.json, and
prints a short table last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the gpu_kernels_* modules beside this file

import gpu_kernels_common as gk
from gpu_kernels_common import ROOT, Ctx, empty_cache, git_commit, log, sync, use_cpu_smoke
from gpu_kernels_model import section_decode, section_engine, section_model, section_prefill, section_profile
from gpu_kernels_ops import section_attention, section_calibrate, section_kernels, section_tune

ALL_SECTIONS = ["calibrate", "kernels", "attention", "model", "decode", "prefill", "profile", "engine", "tune"]

SECTIONS: dict[str, Callable[[Ctx], dict[str, Any]]] = {
    "calibrate": section_calibrate, "kernels": section_kernels, "attention": section_attention,
    "model": section_model, "decode": section_decode, "prefill": section_prefill, "profile": section_profile,
    "engine": section_engine, "tune": section_tune,
}
# a section starts only if this many seconds of the budget are left
MIN_LEFT_S = {"calibrate": 5, "kernels": 10, "attention": 20, "model": 30, "decode": 30, "prefill": 15,
              "profile": 15, "engine": 40, "tune": 20}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default=",".join(ALL_SECTIONS))
    ap.add_argument("--budget-s", type=float, default=225.0, help="wall-clock budget; later sections are skipped")
    ap.add_argument("--num-requests", type=int, default=300)
    ap.add_argument("--engine-cap-s", type=float, default=60.0)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: checks the script only")
    ap.add_argument("--no-skinny", action="store_true", help="keep every linear on cuBLAS (no skinny GEMM tuning)")
    args = ap.parse_args()
    if args.cpu_smoke:
        use_cpu_smoke()
        args.num_requests = min(args.num_requests, 6)
        args.budget_s = max(args.budget_s, 1200.0)
    elif not torch.cuda.is_available():
        print("needs a CUDA GPU (or --cpu-smoke)")
        return 2
    c = Ctx(args)
    if gk.DEV.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        dev_info: dict[str, Any] = {"device": props.name, "sms": props.multi_processor_count,
                                    "memory_gib": props.total_memory / 2**30}
    else:
        dev_info = {"device": "cpu (smoke)", "sms": 0, "memory_gib": 0}
    info = {**dev_info, "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "git_commit": git_commit(), "command": " ".join(sys.argv)}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    log(f"device {info}")
    c.results["info"] = info
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    for name in ALL_SECTIONS:
        if name not in wanted:
            continue
        if c.left() < MIN_LEFT_S[name]:
            log(f"== {name}: skipped ({c.left():.0f} s of budget left)")
            c.results[name] = {"skipped": "budget"}
            c.summary.append(f"{name}: skipped (budget)")
            continue
        log(f"== {name} (t={c.elapsed():.0f} s)")
        t = time.perf_counter()
        try:
            c.results[name] = SECTIONS[name](c)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            c.results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            c.summary.append(f"{name}: ERROR {type(e).__name__}: {str(e)[:150]}")
            try:
                sync()
                empty_cache()
            except Exception as e2:  # noqa: BLE001 - a sticky CUDA error; later sections will report it too
                log(f"    (cleanup after the error failed too: {e2!r})")
        c.results.setdefault("section_s", {})[name] = time.perf_counter() - t
    c.results["summary"] = c.summary
    c.results["total_s"] = c.elapsed()
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "gpu_kernels.json" if os.environ.get("OUT") else f"gpu_kernels-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path = out_dir / name
    path.write_text(json.dumps(c.results, indent=1, default=str))
    print(f"\n==== summary ({info['device']}, {c.elapsed():.0f} s; JSON: {path}) ====")
    for line in c.summary:
        print("  " + line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
