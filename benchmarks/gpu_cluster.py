"""Issues 7 and 8 on a GPU: every strategy on an emulated high-end + low-end pair, the simulator beside it.

The pair is one H100 split by MPS (``examples/clusters/emulated-h100-mps-pair.yaml``: 75% / 25% of the SMs,
40 / 24 GB pinned-memory caps; HBM bandwidth is shared, which real separate GPUs would not do). Each device runs
its own worker process (an MPS client); the coordinator (this process) runs the same schedulers and strategy
objects as the simulator. The model is Llama-3.1-8B's shape with random bf16 weights made on the GPU, truncated
to ``--layers`` layers so that a run fits the device budget (the profiles are per layer, so the simulator
predicts the truncated model from the same tables). Workload: Azure-conv lengths (prompts capped) with Poisson
arrivals at each rate. Per strategy and rate: TTFT / TBT (ITL) P50 and P99, throughput and goodput at the SLO,
and the simulator's prediction of each with its error.

    python benchmarks/gpu_cluster.py --strategies dp,pp,pd-lp,pd-hp --rates 4,8,16
    python benchmarks/gpu_cluster.py --smoke-cpu          # the same code on the cpu-pair with the tiny model

Results: ``benchmarks/results/gpu-cluster-<tag>.json`` with the command, commit, device, emulation and config.
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
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

HI, LO = "gpu0:0", "gpu0:1"
KEYS = ("mean_ttft_ms", "p50_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p50_itl_ms", "p99_itl_ms",
        "output_throughput", "request_throughput", "request_goodput", "good_fraction", "completed")


def strategies(hi: str, lo: str, cronus_tbt_ms: float) -> dict[str, dict[str, Any]]:
    """name -> (strategy, instances, deployment params). 'lp' = prefill on the low-end device."""
    return {
        "high-alone": {"strategy": "dp", "instances": [{"name": "hi", "devices": [hi]}]},
        "low-alone": {"strategy": "dp", "instances": [{"name": "lo", "devices": [lo]}]},
        "dp": {"strategy": "dp", "instances": [{"name": "hi", "devices": [hi]}, {"name": "lo", "devices": [lo]}]},
        "pp": {"strategy": "pp", "instances": [{"name": "pp0", "devices": [hi, lo], "layers": "auto"}]},
        "pd-lp": {"strategy": "pd", "instances": [{"name": "prefill0", "role": "prefill", "devices": [lo]},
                                                  {"name": "decode0", "role": "decode", "devices": [hi]}]},
        "pd-hp": {"strategy": "pd", "instances": [{"name": "prefill0", "role": "prefill", "devices": [hi]},
                                                  {"name": "decode0", "role": "decode", "devices": [lo]}]},
        "cronus": {"strategy": "cronus",
                   "instances": [{"name": "head0", "role": "head", "devices": [lo]},
                                 {"name": "main0", "role": "main", "devices": [hi]}],
                   "params": {"split_policy": {"kind": "adaptive", "tbt_slo_ms": cronus_tbt_ms}}},
        "hetis": {"strategy": "hetis",
                  "instances": [{"name": "main0", "role": "main", "devices": [hi], "workers": [{"device": lo}]}]},
    }


def git_commit() -> str:
    f = ROOT / "benchmarks/.commit"
    if f.exists():
        return f.read_text().strip()
    r = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=ROOT, capture_output=True, text=True)
    return r.stdout.strip() or "unknown"


def workload(trace: Path | None, n: int, rate: float, max_in: int, max_out: int, seed: int,
             scale: int = 1) -> list[Any]:
    from hetserve.sim.workload import SimRequest, load_workload

    if trace is not None and trace.exists():
        wl = load_workload(str(trace), num_requests=n, request_rate=rate, seed=seed)
    else:  # a user's clone without the data: Azure-conv-like lengths
        wl = load_workload("uniform:input=64-2048,output=16-400", num_requests=n, request_rate=rate, seed=seed)
    return [SimRequest(r.arrival_s, max(1, min(r.prompt_len // scale, max_in)), max(1, min(r.output_len, max_out)))
            for r in wl]


def run_real(engine: Any, wl: list[Any], slo: Any, vocab_hi: int) -> dict[str, Any]:
    from replay import replay

    from hetserve.bench.metrics import compute_metrics

    records, dur = replay(engine, wl, vocab_range=(10, vocab_hi))
    m = compute_metrics(records, dur, slo)
    m["errors"] = sum(1 for r in records if not r.success)
    m["good_fraction"] = (m["request_goodput"] or 0) * m["duration"] / max(1, len(records))
    return m


def run_sim(cluster: Any, mc: Any, cfg: dict[str, Any], profiles: dict[str, Any], engine: Any, wl: list[Any],
            slo: Any) -> dict[str, Any]:
    import dataclasses

    from hetserve.sim.simulator import Simulator
    from hetserve.strategies.build import build_deployment

    dep = build_deployment(cluster, mc, cfg, profiles)
    for name, plan in list(dep.plans.items()):  # the sizes the real workers ended up with
        real = engine.deployment.plans.get(name)
        if real is not None:
            dep.plans[name] = dataclasses.replace(plan, num_kv_blocks=real.num_kv_blocks,
                                                  max_model_len=real.max_model_len)
    m = Simulator(dep).run(wl).metrics(slo)
    m["good_fraction"] = (m["request_goodput"] or 0) * m["duration"] / max(1, len(wl))
    return m


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategies", default="high-alone,low-alone,dp,pp,pd-lp,pd-hp,cronus,hetis")
    ap.add_argument("--rates", default="8,16,24", help="request rates (req/s), comma-separated")
    ap.add_argument("--num-requests", type=int, default=160)
    ap.add_argument("--layers", type=int, default=32, help="truncate the 8B shape to this many layers")
    ap.add_argument("--max-input", type=int, default=2048)
    ap.add_argument("--max-output", type=int, default=256)
    ap.add_argument("--slo", default="ttft_ms=2000,tpot_ms=100")
    ap.add_argument("--cronus-tbt-ms", type=float, default=50.0)
    ap.add_argument("--tag", default="h100-mps")
    ap.add_argument("--cluster", default="examples/clusters/emulated-h100-mps-pair.yaml")
    ap.add_argument("--profiles", default="H100-MPS75=profiles/h100-100sm-llama-3.1-8b.json,"
                                          "H100-MPS25=profiles/h100-32sm-llama-3.1-8b.json",
                    help="DEVICE=PATH stand-ins or profiles measured on the MPS clients themselves")
    ap.add_argument("--smoke-cpu", action="store_true", help="cpu-pair + tiny model: check the script, no GPU")
    ap.add_argument("--deadline-s", type=float, default=540.0, help="stop starting new runs after this")
    args = ap.parse_args()
    t_start = time.monotonic()

    from hetserve.bench.metrics import parse_slo
    from hetserve.core.cluster import load_cluster
    from hetserve.core.model_config import ModelConfig
    from hetserve.runtime.deploy import from_cluster

    slo = parse_slo(args.slo)
    rates = [float(r) for r in args.rates.split(",")]
    trace = None
    for cand in (ROOT / ".data/azure_llm_2023_conv.csv", ROOT.parent / "shared/data/azure_llm_2023_conv.csv"):
        if cand.exists():
            trace = cand
            break
    mps = None
    if args.smoke_cpu:
        from hetserve.tiny.make_tiny import default_model_dir

        model_dir = default_model_dir()
        cluster = load_cluster(str(ROOT / "examples/clusters/cpu-pair.yaml"))
        hi, lo = "host:0", "host:1"
        device, dtype, vocab_hi, scale = "cpu", "float32", 400, 8
        profiles: dict[str, Any] = {}
        worker_env: dict[str, dict[str, str]] = {}
        engine_kw: dict[str, Any] = {"max_model_len": 512, "num_kv_blocks": 256}
        max_in, max_out = min(args.max_input, 256), min(args.max_output, 32)
        device_desc = "CPU (cpu-pair: the second worker paced to 0.5x, emulated)"
    else:
        import torch

        from hetserve.device.mps import MpsDaemon
        from hetserve.tiny.make_tiny import make_tiny_model

        work = Path("/tmp/hetserve-gpu-cluster")
        model_dir = work / f"llama-3.1-8b-{args.layers}l"
        model_dir.mkdir(parents=True, exist_ok=True)
        raw = json.loads((ROOT / "examples/models/llama-3.1-8b/config.json").read_text())
        raw["num_hidden_layers"] = args.layers
        (model_dir / "config.json").write_text(json.dumps(raw, indent=1))
        if not (model_dir / "tokenizer.json").exists():  # a stand-in tokenizer: prompts are token ids
            tok = work / "tok"
            make_tiny_model(tok, "llama")
            for f in ("tokenizer.json", "tokenizer_config.json"):
                if (tok / f).exists():
                    (model_dir / f).write_bytes((tok / f).read_bytes())
        cluster = load_cluster(str(ROOT / args.cluster))
        hi, lo = HI, LO
        device, dtype, vocab_hi, scale = "cuda", "bfloat16", 120000, 1
        # MPS 75% ~ the 100-SM green-context profile (76% of the SMs), MPS 25% ~ the 32-SM one (24%): said so
        from hetserve.planner.profile_set import load_profile_set

        profiles = {n: p for n, (p, _) in load_profile_set(args.profiles.split(","), "--profiles", ROOT).items()}
        mps = MpsDaemon().start()
        worker_env = {}
        for part in cluster.emulation.partitions:  # type: ignore[union-attr]
            # the cap: the declared memory plus 3 GiB for the CUDA context and workspaces the plan does not count
            cap = None if part.memory_bytes is None else part.memory_bytes + 3 * 2**30
            worker_env[part.name] = mps.client_env(part.amount, cap)
        engine_kw = {"max_model_len": args.max_input + args.max_output + 16, "num_kv_blocks": 1 << 20,
                     "load_format": "dummy"}
        max_in, max_out = args.max_input, args.max_output
        props = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
        device_desc = f"{props.name if props else 'cuda'} (one GPU; pair emulated by MPS 75/25, see cluster file)"
    mc = ModelConfig.from_path(model_dir)
    table = strategies(hi, lo, args.cronus_tbt_ms)
    names = [s for s in args.strategies.split(",") if s]
    unknown = [s for s in names if s not in table]
    if unknown:
        print(f"--strategies: unknown {unknown}; choose from {sorted(table)}", file=sys.stderr)
        return 2
    results: list[dict[str, Any]] = []
    try:
        for name in names:
            if time.monotonic() - t_start > args.deadline_s:
                results.append({"strategy": name, "skipped": "device-time deadline reached"})
                continue
            spec = table[name]
            cfg = {"strategy": spec["strategy"], "dtype": dtype, "max_model_len": engine_kw["max_model_len"],
                   "instances": spec["instances"], **spec.get("params", {})}
            row: dict[str, Any] = {"strategy": name, "config": cfg, "runs": []}
            t0 = time.monotonic()
            try:
                engine = from_cluster(str(model_dir), cluster, spec["strategy"], instances=spec["instances"],
                                      deployment_params=spec.get("params"), device=device, dtype=dtype,
                                      worker_env=worker_env, profiles=profiles, **engine_kw)
            except Exception as e:  # noqa: BLE001 - recorded, the next strategy runs
                row["error"] = f"{type(e).__name__}: {e}"
                print(f"{name}: could not start: {row['error']}")
                results.append(row)
                continue
            row["startup_s"] = time.monotonic() - t0
            row["instances"] = {n: {"num_kv_blocks": p.num_kv_blocks, "devices": list(p.device_ids),
                                    "role": p.role} for n, p in engine.deployment.plans.items()}
            try:
                run_real(engine, workload(trace, 8, 100.0, 128, 8, seed=99, scale=scale), None, vocab_hi)  # warm-up
                for rate in rates:
                    if time.monotonic() - t_start > args.deadline_s:
                        row["runs"].append({"rate": rate, "skipped": "device-time deadline reached"})
                        continue
                    wl = workload(trace, args.num_requests, rate, max_in, max_out, seed=int(rate * 10), scale=scale)
                    real = run_real(engine, wl, slo, vocab_hi)
                    sim = run_sim(cluster, mc, cfg, profiles, engine, wl, slo)
                    err = {k: ((sim[k] - real[k]) / real[k] if real.get(k) and sim.get(k) is not None else None)
                           for k in KEYS if k != "completed"}
                    run = {"rate": rate, "real": {k: real.get(k) for k in (*KEYS, "errors")},
                           "simulated": {k: sim.get(k) for k in KEYS}, "relative_error": err,
                           "transfers_ok": engine.num_transfers_ok, "transfers_failed": engine.num_transfers_failed}
                    stats = engine.kv_stats() if hasattr(engine, "kv_stats") else []
                    done = [x for x in stats if x.get("ok")]
                    if done:  # direct KV hand-offs so far (cumulative over this strategy's runs)
                        tot = {k: sum(float(x.get(k) or 0) for x in done)
                               for k in ("num_bytes", "wall_s", "declared_s", "send_convert_s", "recv_convert_s",
                                         "handoff_s")}
                        tot["count"] = len(done)
                        tot["achieved_over_declared_bandwidth"] = (tot["declared_s"] / tot["wall_s"]
                                                                   if tot["wall_s"] else None)
                        run["kv_transfers"] = tot
                    dep = engine.deployment.describe()
                    if "mean_k_fraction" in dep:
                        run["cronus_mean_k_fraction"] = dep["mean_k_fraction"]
                    row["runs"].append(run)
                    r = run["real"]
                    print(f"{name:10s} {rate:5.1f} req/s  TTFT p50/p99 {r['p50_ttft_ms']:8.1f}/{r['p99_ttft_ms']:8.1f} ms"
                          f"  ITL p50/p99 {r['p50_itl_ms']:6.1f}/{r['p99_itl_ms']:6.1f} ms  "
                          f"{r['output_throughput']:8.1f} tok/s  goodput {r['request_goodput']:.2f} req/s  "
                          f"sim TTFT {sim['mean_ttft_ms']:.1f} ({100 * (err['mean_ttft_ms'] or 0):+.0f}%) "
                          f"tput ({100 * (err['output_throughput'] or 0):+.0f}%)", flush=True)
                row["free_blocks_after"] = engine.free_blocks()
            except Exception as e:  # noqa: BLE001
                row["error"] = f"{type(e).__name__}: {e}"
                print(f"{name}: failed: {row['error']}")
            finally:
                engine.shutdown()
            results.append(row)
    finally:
        if mps is not None:
            mps.stop()
    out = {
        "benchmark": "heterogeneous strategies on an emulated pair (issues 7, 8)",
        "command": " ".join([sys.executable, *sys.argv]),
        "git_commit": git_commit(),
        "device": device_desc,
        "emulation": None if args.smoke_cpu else {
            "cluster": args.cluster,
            "partitions": {d.spec.name: d.spec.emulated_by for d in cluster.devices},
            "note": "both devices share one H100's HBM bandwidth and L2; profiles for the simulator are the "
                    "green-context 100-SM / 32-SM ones standing in for MPS 75% / 25%"},
        "model": f"Llama-3.1-8B shape, {mc.num_hidden_layers} layers, random {dtype} weights",
        "workload": f"{trace.name if trace else 'uniform 64-2048 / 16-400'} lengths (prompt <= {max_in}, "
                    f"output <= {max_out}), Poisson arrivals, {args.num_requests} requests per rate",
        "slo": args.slo,
        "platform": platform.platform(),
        "wall_s": time.monotonic() - t_start,
        "results": results,
    }
    dest = ROOT / "benchmarks/results" / (f"gpu-cluster-{args.tag}.json" if not args.smoke_cpu
                                          else "cpu-cluster-smoke.json")
    if os.environ.get("OUT"):
        dest = Path(os.environ["OUT"]) / dest.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=1, default=str))
    print(f"wrote {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
