"""Simulator speed: requests of the Azure conversation trace through a deployment, on one core.

Goal (issue 6): 10k requests in <= 10 s on one core. Reports process CPU time (the machine may be shared),
wall time, the load average, events and engine steps, and where the time goes (a cProfile split into the
engine's scheduler and KV manager vs the simulator and strategies), as JSON in benchmarks/results/.

    python benchmarks/sim_speed.py [--num-requests 10000] [--request-rate 20] [--strategies dp,pd,cronus]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import platform
import pstats
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hetserve.core.cluster import load_cluster
from hetserve.core.model_config import ModelConfig
from hetserve.sim.simulator import Simulator
from hetserve.sim.workload import load_workload
from hetserve.strategies.build import build_deployment

TRACE = ROOT.parent / "shared/data/azure_llm_2023_conv.csv"
FALLBACK = ROOT / "tests/data/azure_conv_excerpt.csv"
H, A1, A2 = "n0:0", "n0:1", "n0:2"
CONFIGS: dict[str, dict[str, Any]] = {
    "dp": {
        "strategy": "dp",
        "instances": [{"devices": [H]}, {"devices": [A1], "max_num_seqs": 64}, {"devices": [A2], "max_num_seqs": 64}],
    },
    "pd": {
        "strategy": "pd",
        "instances": [
            {"role": "prefill", "devices": [A1]},
            {"role": "prefill", "devices": [A2]},
            {"role": "decode", "devices": [H]},
        ],
    },
    "cronus": {
        "strategy": "cronus",
        "instances": [
            {"role": "head", "devices": [A1]},
            {"role": "head", "devices": [A2]},
            {"role": "main", "devices": [H]},
        ],
    },
    "hetis": {
        "strategy": "hetis",
        "instances": [{"role": "main", "devices": [H], "workers": [{"device": A1}, {"device": A2}]}],
    },
}


def _where(prof: cProfile.Profile) -> dict[str, float]:
    """Own (tottime) seconds by area, from a profile."""
    st = pstats.Stats(prof)
    areas = {
        "engine scheduler + kv": 0.0,
        "core request/outputs": 0.0,
        "simulator": 0.0,
        "strategies + cost": 0.0,
        "other": 0.0,
    }
    for (file, _, _), (_, _, tt, _, _) in st.stats.items():  # type: ignore[attr-defined]
        if "/engine/" in file:
            areas["engine scheduler + kv"] += tt
        elif "/core/" in file:
            areas["core request/outputs"] += tt
        elif "/sim/" in file:
            areas["simulator"] += tt
        elif "/strategies/" in file or "/planner/" in file:
            areas["strategies + cost"] += tt
        else:
            areas["other"] += tt
    total = sum(areas.values()) or 1.0
    return {k: round(v / total, 3) for k, v in areas.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--num-requests", type=int, default=10_000)
    ap.add_argument("--request-rate", type=float, default=20.0)
    ap.add_argument("--strategies", default="dp,pd,cronus,hetis")
    ap.add_argument("--profile", action="store_true", help="also profile the first strategy (slower run)")
    ap.add_argument("--output", default=str(ROOT / "benchmarks/results/sim_speed.json"))
    args = ap.parse_args()
    trace = TRACE if TRACE.exists() else FALLBACK
    model = ModelConfig.from_path(ROOT / "examples/models/llama-3.1-8b")
    cluster = load_cluster(ROOT / "examples/clusters/h100-a10.yaml")
    wl = load_workload(str(trace), request_rate=args.request_rate, max_input_len=6000)
    while len(wl) < args.num_requests:  # the committed excerpt is short: repeat its lengths
        wl = wl + load_workload(str(trace), request_rate=args.request_rate, seed=len(wl), max_input_len=6000)
    wl = wl[: args.num_requests]
    runs = []
    for name in args.strategies.split(","):
        dep = build_deployment(cluster, model, CONFIGS[name])
        sim = Simulator(dep)
        load0 = os.getloadavg()[0]
        c0, w0 = time.process_time(), time.perf_counter()
        res = sim.run(wl)
        c1, w1 = time.process_time(), time.perf_counter()
        met = res.metrics()
        c2 = time.process_time()
        row = {
            "strategy": name,
            "num_requests": len(wl),
            "completed": met["completed"],
            "run_cpu_s": round(c1 - c0, 3),
            "run_wall_s": round(w1 - w0, 3),
            "metrics_cpu_s": round(c2 - c1, 3),
            "total_cpu_s": round(c2 - c0, 3),
            "num_events": res.num_events,
            "num_steps": sum(i["num_steps"] for i in res.instances.values()),
            "loadavg_1min_before": round(load0, 2),
            "loadavg_1min_after": round(os.getloadavg()[0], 2),
            "goal_met": (c2 - c0) <= 10.0 * len(wl) / 10_000,
        }
        runs.append(row)
        print(json.dumps(row))
    out = {
        "benchmark": "sim_speed",
        "device": f"CPU ({platform.machine()}, {os.cpu_count()} cores; simulated devices are the cluster's)",
        "trace": str(trace.relative_to(ROOT.parent)),
        "request_rate": args.request_rate,
        "cluster": "examples/clusters/h100-a10.yaml",
        "model": "llama-3.1-8b",
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "runs": runs,
        "note": "cpu seconds of this process on one core; the machine may be shared (see loadavg)",
    }
    if args.profile:
        name = args.strategies.split(",")[0]
        sim = Simulator(build_deployment(cluster, model, CONFIGS[name]))
        prof = cProfile.Profile()
        prof.enable()
        sim.run(wl)
        prof.disable()
        out["profile_share_by_area"] = {"strategy": name, **_where(prof)}
        top = pstats.Stats(prof).sort_stats("tottime")
        out["profile_top"] = [
            {"function": f"{Path(f).name}:{ln}({fn})", "tottime_s": round(tt, 3), "calls": nc}
            for (f, ln, fn), (_, nc, tt, _, _) in sorted(top.stats.items(), key=lambda kv: -kv[1][2])[:12]  # type: ignore[attr-defined]
        ]
        print(json.dumps(out["profile_share_by_area"]))
    Path(args.output).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
