"""Re-simulate the runs of ``gpu_cluster.py`` result files with the current simulator (no GPU).

    python benchmarks/cluster_resim.py benchmarks/results/gpu-cluster-h100-mps-sustained-*.json

Each run's workload is rebuilt exactly as the run made it (trace, seed, ``max(num_requests, rate x span_s)``
requests, prompt <= 2048, output <= 256), simulated on the file's cluster file with its profiles (``--profiles``;
default: the file's own ``profiles``, else the MPS clients'), and the run's ``simulated`` / ``relative_error``
are replaced in place; the figures the run itself recorded move to ``simulated_at_run``, and the file gains
``resimulated`` (commit, when, why). A table of the mean-TTFT, mean-TPOT and throughput errors before and after
goes to stdout.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

import gpu_cluster as g
from gpu_cluster_sim import DEFAULT_PROFILES, run_sim, truncated_8b

from hetserve.bench.metrics import parse_slo
from hetserve.core.cluster import load_cluster
from hetserve.core.model_config import ModelConfig
from hetserve.planner.profile_set import load_profile_set


def _err(real: dict[str, Any], sim: dict[str, Any], k: str) -> float | None:
    return (sim[k] - real[k]) / real[k] if real.get(k) and sim.get(k) is not None else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--why", default="the simulator models the shared HBM / L2 of the MPS pair "
                                      "(emulation.partitions[].shared_slowdown)")
    ap.add_argument("--dry-run", action="store_true", help="print the table, write nothing")
    ap.add_argument("--profiles", default=None,
                    help="DEVICE=PATH,... (default: the file's own `profiles`, else the MPS clients' profiles)")
    args = ap.parse_args()
    commit = g.git_commit()
    for f in args.files:
        path = Path(f)
        d = json.loads(path.read_text())
        if not d.get("span_s"):
            print(f"{path.name}: not a sustained-load file (no span_s), skipped")
            continue
        slo = parse_slo(d["slo"])
        items = (args.profiles or d.get("profiles") or DEFAULT_PROFILES).split(",")
        profiles = {n: p for n, (p, _) in load_profile_set(items, "--profiles", ROOT).items()}
        cluster = load_cluster(str(ROOT / d["cluster"]))
        trace = g.find_trace(d["trace"])
        layers = int(str(d["model"]).split(",")[1].split()[0]) if "layers" in str(d["model"]) else 32
        mc = ModelConfig.from_path(truncated_8b(Path(tempfile.mkdtemp()), layers))
        for row in d["results"]:
            for run in row.get("runs", []):
                if "real" not in run:
                    continue
                rate = run["rate"]
                n = max(d["num_requests"], int(rate * d["span_s"] + 0.5))
                wl = g.workload(trace, n, rate, 2048, 256, seed=run["seed"], scale=1, fallback=g.FALLBACK[d["trace"]])
                m = run_sim(cluster, mc, row["config"], profiles, None, wl, slo)
                real = run["real"]
                old = run.get("simulated_at_run", run["simulated"])
                new = {k: m.get(k) for k in (*g.KEYS, "duration")}
                line = [f"{path.stem[-26:]:26s} {row['strategy']:10s} {rate:5.1f}"]
                for k, label in (("mean_ttft_ms", "TTFT"), ("mean_tpot_ms", "TPOT"), ("output_throughput", "tput")):
                    a, b = _err(real, old, k), _err(real, new, k)
                    line.append(f"{label} {'-' if a is None else f'{a:+.0%}'} -> {'-' if b is None else f'{b:+.0%}'}")
                line.append(f"good real {real['good_fraction']:.2f} sim {old['good_fraction']:.2f} -> "
                            f"{new['good_fraction']:.2f}")
                print("  ".join(line), flush=True)
                run["simulated_at_run"] = old
                run["simulated"] = new
                run["relative_error"] = {k: _err(real, new, k) for k in g.KEYS if k != "completed"}
        d["resimulated"] = {"git_commit": commit, "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"), "why": args.why, "command": " ".join([sys.executable, *sys.argv])}
        if not args.dry_run:
            path.write_text(json.dumps(d, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
