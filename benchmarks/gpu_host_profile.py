"""Where the host's time goes when the runner launches a step (cProfile around ``execute_async``).

A piecewise mixed step of little device work (8 decodes + a 24-token chunk) is paced by its launch on the host;
this lists the functions that launch spends its time in, for that step and a few others, so that host work can
be cut where it is, not where it is guessed to be.

    python benchmarks/gpu_host_profile.py [--layers 32] [--repeat 20] [--top 30]

Writes ``gpu-host-profile.json`` under ``$OUT`` (or ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
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
from suite_common import build_big_model, git_commit, make_runner, sync, write_result

SHAPES = {
    "mixed 8 decodes + 24-token chunk": [(1, 512)] * 8 + [(24, 0)],
    "mixed 64 decodes + 64-token chunk": [(1, 512)] * 64 + [(64, 0)],
    "decode 640 (beyond the decode graphs)": [(1, 512)] * 640,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--piecewise-max", type=int, default=1024,
                    help="the runner's piecewise_graph_max_tokens (0: mixed steps run eagerly, as on a TP rank)")
    args = ap.parse_args()
    from hetserve.profiling import synthetic_step

    dev = torch.device("cuda")
    big = build_big_model(ROOT / "examples/models/llama-3.1-8b/config.json", args.layers, dev, "bfloat16",
                          Path(tempfile.mkdtemp()))
    runner, _ = make_runner(big, 8192, {"piecewise_graph_max_tokens": args.piecewise_max, "cuda_graph_max_batch": 512},
                            max_num_seqs=1024, max_num_batched_tokens=4096, max_model_len=4096,
                            enable_prefix_caching=False)
    results: dict[str, Any] = {}
    for label, seqs in SHAPES.items():
        named = [(f"h{len(results)}-{i}", n, c) for i, (n, c) in enumerate(seqs)]
        first = synthetic_step(named, runner.block_size, new=True, vocab_size=big.cfg.vocab_size,
                               num_pool_blocks=runner.num_kv_blocks)
        again = synthetic_step(named, runner.block_size, new=False, vocab_size=big.cfg.vocab_size,
                               num_pool_blocks=runner.num_kv_blocks)
        step = again if all(n == 1 for n, _ in seqs) else first
        runner.execute(first)
        sync(dev)
        for _ in range(3):
            runner.execute(step)
        sync(dev)
        launch = []
        for _ in range(args.repeat):  # plain launch times, no profiler
            t0 = time.perf_counter()
            res = runner.execute_async(step)
            launch.append(time.perf_counter() - t0)
            res.result()
            sync(dev)
        prof = cProfile.Profile()
        for _ in range(args.repeat):
            prof.enable()
            res = runner.execute_async(step)
            prof.disable()
            res.result()
            sync(dev)
        st = pstats.Stats(prof)
        rows = []
        for (file, line, fn), (cc, nc, tt, ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
            rows.append({"function": f"{Path(file).name}:{line}:{fn}", "calls_per_step": nc / args.repeat,
                         "tottime_us_per_step": tt / args.repeat * 1e6, "cumtime_us_per_step": ct / args.repeat * 1e6})
        by_tot = sorted(rows, key=lambda r: -r["tottime_us_per_step"])[: args.top]
        by_cum = sorted(rows, key=lambda r: -r["cumtime_us_per_step"])[: args.top]
        med = statistics.median(launch)
        print(f"== {label}: launch {med * 1e3:.2f} ms (no profiler)", flush=True)
        for r in by_tot[:20]:
            print(f"  tot {r['tottime_us_per_step']:8.0f} us  cum {r['cumtime_us_per_step']:8.0f} us  "
                  f"x{r['calls_per_step']:6.0f}  {r['function']}")
        print("  -- by cumulative")
        for r in by_cum[:20]:
            print(f"  cum {r['cumtime_us_per_step']:8.0f} us  x{r['calls_per_step']:6.0f}  {r['function']}")
        results[label] = {"launch_median_s": med, "launch_s": launch, "by_tottime": by_tot, "by_cumtime": by_cum}
        from hetserve.core.outputs import SchedulerOutput

        runner.execute(SchedulerOutput([], 0, finished_req_ids={r for r, _, _ in named}))
    out = {"benchmark": "host time of the runner's launches, cProfile", "command": " ".join(sys.argv),
           "git_commit": git_commit(), "device": torch.cuda.get_device_name(), "emulation": None,
           "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "config": {"layers": big.cfg.num_hidden_layers, "piecewise_max": args.piecewise_max},
           "results": results}
    write_result("gpu-host-profile.json" if args.piecewise_max else "gpu-host-profile-eager.json", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
