"""Offline throughput of the 8B-shaped model on one GPU for several length mixes, with where the time goes.

The Azure-conv trace has ~1,000-token prompts, so its prefill FLOPs bound output tok/s far below figures
published for ShareGPT-shaped requests (~230 in / ~200 out). This script runs both side by side in one
process: the trace's first N rows and synthetic ShareGPT-shaped lengths (uniform, stated), and splits each
step's wall time into the runner (GPU work + its host preparation) and the rest (scheduler, engine books).

    python benchmarks/gpu_offline_lengths.py --trace .data/azure_llm_2023_conv.csv [--num 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
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
from suite_common import Workload, azure_workload, build_big_model, git_commit, make_engine, run_offline


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--only", choices=["azure", "sharegpt"], default=None)
    ap.add_argument("--modes", default="async",
                    help="comma-separated engine modes run side by side on each workload: async, sync "
                         "(async_scheduling off); suffix :G sets cuda_graph_max_batch and :G:P also "
                         "piecewise_graph_max_tokens (0 = none), and @S max_num_seqs, e.g. "
                         "sync:256:0,async:512:0,async:512:1024@1024")
    ap.add_argument("--repeats", type=int, default=1, help="runs per mode, interleaved; medians reported")
    args = ap.parse_args()
    dev = torch.device("cuda")
    big = build_big_model(ROOT / "examples/models/llama-3.1-8b/config.json", None, dev, "bfloat16",
                          Path(tempfile.mkdtemp()))
    vocab = big.cfg.vocab_size
    rng = random.Random(0)
    synth_lens = [(rng.randint(32, 448), rng.randint(32, 384)) for _ in range(args.num)]
    works = {
        "azure-conv (first rows, prompts <= 4096)": azure_workload(Path(args.trace), args.num, vocab, 4096, None),
        "sharegpt-shaped synthetic (in U[32,448], out U[32,384])": Workload(
            [[rng.randrange(10, 120000) for _ in range(p)] for p, _ in synth_lens], [o for _, o in synth_lens],
            "synthetic uniform lengths, mean 240 in / 208 out"),
    }
    if args.only:
        works = {k: v for k, v in works.items() if k.startswith(args.only)}
    flops_per_token = 2 * big.cfg.num_params()
    peak = 781e12
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    results: dict[str, Any] = {}
    for name, work in works.items():
        runs: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
        for rep in range(args.repeats):
            for mode in modes:
                r = _run_mode(big, work, mode, args)
                r["prompt_tokens"] = work.prompt_tokens
                r["prefill_flop_bound_s"] = work.prompt_tokens * flops_per_token / peak
                r["output_tok_s_bound_from_prefill_alone"] = r["output_tokens"] / r["prefill_flop_bound_s"]
                runs[mode].append(r)
                print(f"{name} [{mode}, run {rep + 1}]: {r['output_tok_s']:.0f} out tok/s, "
                      f"{r['total_tok_s']:.0f} total tok/s, wall {r['wall_s']:.1f} s, host launch "
                      f"{r['launch_s']:.1f} s, waiting for the device {r['wait_s']:.1f} s, outside the runner "
                      f"{r['outside_runner_s']:.1f} s, steps {r['steps']}", flush=True)
        results[name] = {m: {"median_output_tok_s": statistics.median(x["output_tok_s"] for x in rs),
                             "median_wall_s": statistics.median(x["wall_s"] for x in rs), "runs": rs}
                         for m, rs in runs.items()}
        if len(modes) > 1:
            base = results[name][modes[0]]["median_output_tok_s"]
            for m in modes[1:]:
                results[name][m]["ratio_to_" + modes[0]] = results[name][m]["median_output_tok_s"] / base
    out = {"benchmark": "offline throughput by length mix", "command": " ".join(sys.argv), "git_commit": git_commit(),
           "device": torch.cuda.get_device_name(), "emulation": None, "emulated": False,
           "config": {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
                      "modes": modes, "repeats": args.repeats,
                      "model": "llama-3.1-8b shape, random bf16", "sampling": "greedy, ignore_eos, detokenize off"},
           "results": results}
    dst = Path(os.environ.get("OUT", ROOT / "benchmarks/results")) / "gpu-offline-lengths.json"
    dst.write_text(json.dumps(out, indent=2))
    print(f"wrote {dst}")
    return 0


def _run_mode(big: Any, work: Workload, mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """One offline run in ``mode`` (``async`` / ``sync``, optional ``:G`` graph max batch), with the wall time
    split into the runner's host launch, the host waiting for the device, and everything outside the runner."""
    mode, _, seqs = mode.partition("@")
    kind, _, rest = mode.partition(":")
    graph, _, piecewise = rest.partition(":")
    if kind not in ("async", "sync"):
        raise SystemExit(f"--modes: unknown mode {mode!r} (async or sync, optionally :GRAPH_MAX_BATCH[:PIECEWISE])")
    extra: dict[str, Any] = {"async_scheduling": kind == "async"}
    if graph:
        extra["cuda_graph_max_batch"] = int(graph)
    if piecewise:
        extra["piecewise_graph_max_tokens"] = int(piecewise)
    engine = make_engine(big, num_blocks=None, max_num_seqs=int(seqs) if seqs else args.max_num_seqs,
                         max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=8192, extra=extra)
    runner = engine.executor
    spent = {"launch_s": 0.0, "wait_s": 0.0}
    inner = runner.execute_async

    class Timed:
        def __init__(self, res: Any) -> None:
            self.res = res

        def result(self) -> Any:
            t = time.perf_counter()
            out = self.res.result()
            spent["wait_s"] += time.perf_counter() - t
            return out

    def timed(so: Any) -> Any:
        t = time.perf_counter()
        res = inner(so)
        spent["launch_s"] += time.perf_counter() - t
        return Timed(res)

    runner.execute_async = timed  # type: ignore[method-assign]
    run_offline(engine, work.head(8, 8), 60.0, torch.device("cuda"))  # warm-up (graphs, kernels)
    spent.update(launch_s=0.0, wait_s=0.0)
    r = run_offline(engine, work, 400.0, torch.device("cuda"))
    r.update(spent)
    r["runner_s"] = spent["launch_s"] + spent["wait_s"]
    r["outside_runner_s"] = r["wall_s"] - r["runner_s"]
    r["mode"] = mode + (f"@{seqs}" if seqs else "")
    r["max_num_seqs"] = engine.config.scheduler.max_num_seqs
    r["num_kv_blocks"] = runner.num_kv_blocks
    r["preemptions"] = engine.scheduler.num_preemptions
    r["async_scheduling"] = engine.core.async_scheduling
    r["graph_batch_sizes"] = sorted(runner.graphs.graphs) if runner.graphs is not None else []
    r["piecewise_token_sizes"] = sorted(runner.piecewise.graphs) if runner.piecewise is not None else []
    r["capture_s"] = (runner.graphs.capture_s if runner.graphs is not None else 0.0) + (
        runner.piecewise.capture_s if runner.piecewise is not None else 0.0)
    # drop the timing wrapper (it closes over the runner: a cycle that would keep its KV pool and graphs alive)
    del runner.execute_async
    engine.executor = None
    engine.core.executor = None
    runner.graphs = None
    runner.piecewise = None
    del engine, runner
    import gc

    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    r["free_gib_after"] = free / 2**30
    return r


if __name__ == "__main__":
    sys.exit(main())
