"""Simulator fidelity against the real engine on this CPU: the tiny model, the committed CPU profile.

For each workload, the real engine is driven in-process with timed arrivals (benchmarks/replay.py) and the
simulator runs the same requests with a cost model built from ``profiles/cpu-tiny-llama.json``; mean TTFT,
mean TPOT and output throughput are compared. Writes benchmarks/results/fidelity_cpu.json.

    python benchmarks/fidelity_cpu.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--output", default=str(ROOT / "benchmarks/results/fidelity_cpu.json"))
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)  # the profile was measured with one thread
    from replay import replay

    from hetserve.bench.metrics import compute_metrics
    from hetserve.core.config import EngineConfig
    from hetserve.core.devices import cpu_host_spec
    from hetserve.core.model_config import ModelConfig
    from hetserve.engine.llm_engine import LLMEngine
    from hetserve.planner.costmodel import CostModel
    from hetserve.planner.profile import load_profile
    from hetserve.sim.simulator import Simulator
    from hetserve.sim.workload import SimRequest, load_workload
    from hetserve.strategies.base import InstancePlan
    from hetserve.strategies.dp import DPDeployment
    from hetserve.tiny.make_tiny import default_model_dir

    model_dir = default_model_dir()
    mc = ModelConfig.from_path(model_dir)
    profile = load_profile(ROOT / "profiles/cpu-tiny-llama.json")
    dev = cpu_host_spec(os.cpu_count() or 2, 8 * 2**30, name=profile.device_name)
    block, blocks, seqs, budget, max_len = 16, 400, 32, 512, 1024
    cfg = EngineConfig.from_kwargs(str(model_dir), device="cpu", dtype="float32", block_size=block,
                                   num_blocks=blocks, max_num_seqs=seqs, max_num_batched_tokens=budget,
                                   max_model_len=max_len, enable_prefix_caching=False)
    n = 40 if args.quick else 120
    code = ROOT / "tests/data/azure_code_excerpt.csv"
    conv = ROOT / "tests/data/azure_conv_excerpt.csv"
    workloads = {
        "uniform-short@8rps": load_workload("uniform:input=16-128,output=16-64", num_requests=n, request_rate=8, seed=1),
        "azure-conv-scaled@4rps": [SimRequest(r.arrival_s, max(1, r.prompt_len // 8), max(1, min(r.output_len, 96)))
                                    for r in load_workload(str(conv), num_requests=n, request_rate=4, seed=2)],
        "azure-code-scaled@3rps": [SimRequest(r.arrival_s, max(1, min(r.prompt_len // 8, 700)), max(1, min(r.output_len, 64)))
                                    for r in load_workload(str(code), num_requests=n, request_rate=3, seed=3)],
    }
    keys = ("mean_ttft_ms", "mean_tpot_ms", "output_throughput", "p99_ttft_ms", "p99_tpot_ms")
    rows = []
    for name, wl in workloads.items():
        real_runs = []
        for rep in range(args.repeats):
            engine = LLMEngine(cfg)
            records, dur = replay(engine, wl, seed=rep)
            real_runs.append(compute_metrics(records, dur))
        real = {k: sorted(r[k] for r in real_runs)[len(real_runs) // 2] for k in keys}
        cost = CostModel(mc, dev, dtype="float32", profile=profile)
        plan = InstancePlan(name="cpu", device_ids=("cpu",), role="mixed", stage_costs=(cost,), num_kv_blocks=blocks,
                            block_size=block, max_num_seqs=seqs, max_num_batched_tokens=budget, max_model_len=max_len)
        t0 = time.perf_counter()
        res = Simulator(DPDeployment([plan], lambda a, b: None)).run(wl)  # type: ignore[arg-type, return-value]
        sim_wall = time.perf_counter() - t0
        sim = {k: res.metrics()[k] for k in keys}
        err = {k: (sim[k] - real[k]) / real[k] if real[k] else None for k in keys}
        rows.append({"workload": name, "num_requests": len(wl), "real_median_of_runs": real, "simulated": sim,
                     "relative_error": err, "sim_wall_s": sim_wall,
                     "real_runs": [{k: r[k] for k in keys} for r in real_runs]})
        print(f"{name:28s} " + "  ".join(f"{k}: real {real[k]:8.2f} sim {sim[k]:8.2f} ({100 * err[k]:+5.1f}%)"
                                          for k in keys[:3]))
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    out = {"benchmark": "simulator fidelity vs real engine (CPU)", "command": " ".join(sys.argv), "git_commit": commit,
           "device": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads 1)",
           "emulation": None, "profile": "profiles/cpu-tiny-llama.json", "model": "embedded tiny llama",
           "config": {"block_size": block, "num_blocks": blocks, "max_num_seqs": seqs,
                      "max_num_batched_tokens": budget, "repeats": args.repeats},
           "results": rows}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
