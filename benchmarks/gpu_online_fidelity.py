"""Simulator fidelity against the real engine ONLINE on one GPU (issue 6: <= 5% mean, <= 10% P99 error).

The single-device engine serves a Llama-3.1-8B-shaped model (random bf16 weights made on the GPU) while Azure-conv
requests (prompt lengths capped) arrive by Poisson at each rate; the same request list runs in the simulator with
the measured whole-H100 profile. Mean and P99 TTFT, TPOT, ITL and throughput, side by side, with errors.

    python benchmarks/gpu_online_fidelity.py --rates 6,12,18 --num-requests 300
    python benchmarks/gpu_online_fidelity.py --smoke-cpu     # tiny model on the CPU, CPU profile: checks the script

Writes ``benchmarks/results/gpu-online-fidelity.json`` (command, commit, device, emulation: none, config).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

KEYS = ("mean_ttft_ms", "p50_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p99_tpot_ms", "mean_itl_ms", "p99_itl_ms",
        "output_throughput")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rates", default="6,12,18")
    ap.add_argument("--num-requests", type=int, default=300)
    ap.add_argument("--max-input", type=int, default=2048)
    ap.add_argument("--max-output", type=int, default=384)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--smoke-cpu", action="store_true")
    ap.add_argument("--profile", default=str(ROOT / "profiles/h100-sxm-llama-3.1-8b.json"),
                    help="the device profile the simulator side uses")
    ap.add_argument("--seed", type=int, default=0,
                    help="workload draw (0: the default requests; others give other requests at the same rates)")
    ap.add_argument("--trace", default="conv", choices=["conv", "code"], help="Azure LLM 2023 trace for the lengths")
    ap.add_argument("--steps", action="store_true",
                    help="also record every real step (its batch shape, launch and result times) for "
                         "benchmarks/fidelity_steps.py")
    ap.add_argument("--calibrate", action="store_true",
                    help="first measure this machine's sustained speed against the profile on a request stream of "
                         "its own (hetserve/profiling/sustained.py); the simulator side then uses the scaled profile, "
                         "written beside the result as profile-calibrated.json")
    ap.add_argument("--resim", metavar="RESULT.json", default=None,
                    help="no GPU: re-simulate a measured result's requests with today's profile (same seeds)")
    ap.add_argument("--resim-out", default=None, help="with --resim: where to write (default: beside the source)")
    args = ap.parse_args()
    if args.resim:
        return resim(Path(args.resim), args)

    import torch
    from gpu_cluster import git_commit, workload
    from replay import replay

    from hetserve.bench.metrics import compute_metrics
    from hetserve.core.devices import cpu_host_spec, get_device
    from hetserve.planner.costmodel import CostModel
    from hetserve.planner.profile import load_profile
    from hetserve.sim.simulator import Simulator

    trace = find_trace(args.trace)
    t_start = time.monotonic()
    if args.smoke_cpu:
        from hetserve.core.config import EngineConfig
        from hetserve.engine.llm_engine import LLMEngine
        from hetserve.tiny.make_tiny import default_model_dir

        torch.set_num_threads(1)
        model_dir = default_model_dir()
        from hetserve.core.model_config import ModelConfig

        mc = ModelConfig.from_path(model_dir)
        prof_path = ROOT / "profiles/cpu-tiny-llama.json"
        prof = load_profile(prof_path)
        dev = cpu_host_spec(os.cpu_count() or 2, 8 * 2**30, name=prof.device_name)
        blocks, max_len = 400, 1024
        cfg = EngineConfig.from_kwargs(str(model_dir), device="cpu", dtype="float32", num_blocks=blocks,
                                       max_num_seqs=32, max_num_batched_tokens=512, max_model_len=max_len,
                                       enable_prefix_caching=False)
        engine = LLMEngine(cfg)
        seqs, mnbt, vocab_hi, scale, max_in, max_out = 32, 512, 400, 8, 256, 32
        device_desc, dtype = "CPU", "float32"
    else:
        from suite_common import build_big_model, make_engine

        device = torch.device("cuda")
        big = build_big_model(ROOT / "examples/models/llama-3.1-8b/config.json", None, device, "bfloat16",
                              Path("/tmp/hetserve-online-fid"))
        mc = big.cfg
        seqs, mnbt = args.max_num_seqs, args.max_num_batched_tokens
        max_len = args.max_input + args.max_output + 16
        engine = make_engine(big, num_blocks=None, max_num_seqs=seqs, max_num_batched_tokens=mnbt,
                             max_model_len=max_len)
        blocks = engine.executor.num_kv_blocks if hasattr(engine, "executor") else engine.core.executor.num_kv_blocks
        prof_path = Path(args.profile)
        prof = load_profile(prof_path)
        dev = get_device("H100-SXM")
        vocab_hi, scale, max_in, max_out = 120000, 1, args.max_input, args.max_output
        device_desc, dtype = torch.cuda.get_device_name(0), "bfloat16"
    cm = CostModel(mc, dev, dtype, profile=prof)
    # the engine schedules one step ahead on a GPU (async scheduling): host and device overlap; on a CPU the
    # "device" is the host itself, so nothing overlaps
    cm.async_scheduling = bool(engine.core.async_scheduling) and not args.smoke_cpu
    cm.schedules_ahead = bool(engine.core.async_scheduling)  # the look-ahead, on whatever device
    rows: list[dict[str, Any]] = []
    replay(engine, workload(trace, 16, 50.0, 256, 16, seed=7, scale=scale), vocab_range=(10, vocab_hi))  # warm-up
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks/results"
    calibration = None
    if args.calibrate:
        from hetserve.profiling.sustained import measure, write_scales

        calibration = measure(engine, cm, max_in, max_out, vocab_hi)
        path = write_scales(prof_path, calibration, out_dir / "profile-calibrated.json", git_commit())
        prof = load_profile(path)
        flags = cm.async_scheduling, cm.schedules_ahead
        cm = CostModel(mc, dev, dtype, profile=prof)
        cm.async_scheduling, cm.schedules_ahead = flags
        print(f"calibration: {calibration['meta']} (mixed {calibration['mixed']['steps']} steps, decode "
              f"{calibration['decode']['steps']}); wrote {path}", flush=True)
    for rate in [float(r) for r in args.rates.split(",")]:
        wl = rate_workload(trace, args.num_requests, rate, max_in, max_out, scale=scale, seed=args.seed)
        steps = _record_steps(engine) if args.steps else None
        records, dur = replay(engine, wl, vocab_range=(10, vocab_hi))
        real = compute_metrics(records, dur)
        limits = {"num_kv_blocks": blocks, "max_num_seqs": seqs, "max_num_batched_tokens": mnbt,
                  "max_model_len": max_len}
        sim = Simulator(sim_deployment(cm, limits)).run(wl).metrics()
        err = {k: (sim[k] - real[k]) / real[k] if real.get(k) else None for k in KEYS}
        rows.append({"rate": rate, "num_requests": len(wl), "real": {k: real[k] for k in KEYS},
                     "simulated": {k: sim[k] for k in KEYS}, "relative_error": err})
        if steps is not None:
            rows[-1]["steps"] = steps.finish()
        print(f"rate {rate:5.1f}: " + "  ".join(f"{k} {real[k]:.1f}/{sim[k]:.1f} ({100 * (err[k] or 0):+.0f}%)"
                                                for k in KEYS), flush=True)
    out = {"benchmark": "simulator fidelity, online replay on one device (issue 6)",
           "command": " ".join([sys.executable, *sys.argv]), "git_commit": git_commit(), "device": device_desc,
           "emulation": None, "profile": prof.meta.get("source", prof.device_name),
           "model": f"Llama-3.1-8B shape, random {dtype} weights" if not args.smoke_cpu else "embedded tiny llama",
           "workload": f"{trace.name if trace else 'uniform'} lengths (prompt <= {max_in}, output <= {max_out}), "
                       f"Poisson arrivals", "config": {"num_kv_blocks": blocks, "max_num_seqs": seqs,
                                                        "max_num_batched_tokens": mnbt, "max_model_len": max_len,
                                                        "async_scheduling": bool(engine.core.async_scheduling),
                                                        "trace": args.trace, "seed": args.seed,
                                                        "sim_async_overlap": cm.async_scheduling},
           "calibration": calibration, "wall_s": time.monotonic() - t_start, "results": rows}
    name = "gpu-online-fidelity.json" if not args.smoke_cpu else "cpu-online-fidelity-smoke.json"
    dest = out_dir / name
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {dest}")
    return 0


def rate_workload(trace: Path | None, num_requests: int, rate: float, max_input: int, max_output: int,
                  scale: int = 1, seed: int = 0) -> Any:
    """The requests of one rate, the same in the real run, ``--resim`` and ``fidelity_steps.py --sim``
    (``seed``: the result's ``config.seed``, 0 in files that have none)."""
    from gpu_cluster import workload

    return workload(trace, num_requests, rate, max_input, max_output, seed=int(rate * 10) + 1 + 1000 * seed,
                    scale=scale)


def sim_deployment(cm: Any, config: dict[str, Any]) -> Any:
    """One simulated instance with the real engine's limits (``config``: the result file's config keys)."""
    from hetserve.strategies.base import InstancePlan
    from hetserve.strategies.dp import DPDeployment

    plan = InstancePlan(name="dev", device_ids=("dev",), role="mixed", stage_costs=(cm,),
                        num_kv_blocks=config["num_kv_blocks"], block_size=16, max_num_seqs=config["max_num_seqs"],
                        max_num_batched_tokens=config["max_num_batched_tokens"],
                        max_model_len=config["max_model_len"])
    return DPDeployment([plan], lambda a, b: None)  # type: ignore[arg-type,return-value]


def find_trace(name: str) -> Path | None:
    """The Azure LLM 2023 trace ``name`` (conv or code) from ``.data/`` or ``../shared/data/``; None: uniform."""
    fname = f"azure_llm_2023_{name}.csv"
    return next((p for p in (ROOT / ".data" / fname, ROOT.parent / "shared/data" / fname) if p.exists()), None)


def _record_steps(engine: Any) -> Any:
    """Per step the runner launched: its batch shape, launch and result times, its span (profiling/sustained.py)."""
    from hetserve.profiling.sustained import StepLog

    return StepLog(engine.executor if hasattr(engine, "executor") else engine.core.executor)


def resim(path: Path, args: argparse.Namespace) -> int:
    """Re-run the simulator side of a measured GPU result (same lengths, arrivals and engine limits)."""
    from gpu_cluster import git_commit

    from hetserve.core.devices import get_device
    from hetserve.core.model_config import ModelConfig
    from hetserve.planner.costmodel import CostModel
    from hetserve.planner.profile import load_profile
    from hetserve.sim.simulator import Simulator

    old = json.loads(path.read_text())
    c = old["config"]
    trace = find_trace(c.get("trace", "conv"))
    mc = ModelConfig.from_path(ROOT / "examples/models/llama-3.1-8b")
    prof = load_profile(Path(args.profile))
    cm = CostModel(mc, get_device("H100-SXM"), "bfloat16", profile=prof)
    # files from before async scheduling (no such key) measured the engine's steps in series
    cm.async_scheduling = bool(c.get("async_scheduling", False))
    cm.schedules_ahead = cm.async_scheduling
    rows = []
    for row in old["results"]:
        rate = row["rate"]
        wl = rate_workload(trace, row["num_requests"], rate, args.max_input, args.max_output,
                           seed=int(old["config"].get("seed", 0)))
        sim = Simulator(sim_deployment(cm, c)).run(wl).metrics()
        real = row["real"]
        err = {k: (sim[k] - real[k]) / real[k] if real.get(k) else None for k in KEYS}
        rows.append({"rate": rate, "num_requests": row["num_requests"], "real": real,
                     "simulated": {k: sim[k] for k in KEYS}, "relative_error": err})
        print(f"rate {rate:5.1f}: " + "  ".join(f"{k} {real[k]:.1f}/{sim[k]:.1f} ({100 * (err[k] or 0):+.0f}%)"
                                                for k in KEYS), flush=True)
    out = dict(old, results=rows, resimulated={"from": path.name, "command": " ".join([sys.executable, *sys.argv]),
                                               "git_commit": git_commit(), "profile_created": prof.meta.get("created"),
                                               "note": "real columns as measured; simulated re-run with this profile"})
    dest = Path(args.resim_out) if args.resim_out else path.with_name(path.stem + "-resim.json")
    dest.write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
