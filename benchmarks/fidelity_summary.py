"""Online fidelity over many runs (issue 6: <= 5% mean, <= 10% P99 error): one table from several
``gpu_online_fidelity.py`` results (measured or ``--resim``), errors per run and their spread per trace and rate.

    python benchmarks/fidelity_summary.py benchmarks/results/engine-s7/resim/*.json \
        --out benchmarks/results/engine-s7/fidelity-summary.json

For each (trace, rate): every run's relative error (simulated / real - 1) of each metric, the median and the
largest error over the runs, and how many runs meet the goal (|error| <= 5% for means and throughput, <= 10% for
P99s). The real engine's own spread is shown too: the runs of one (trace, rate) that share their requests (same
seed) are the same workload measured twice, so their real P99s differ only by the engine's run-to-run noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

METRICS = ("mean_ttft_ms", "mean_tpot_ms", "output_throughput", "p99_ttft_ms", "p99_tpot_ms")
GOAL = {"mean_ttft_ms": 0.05, "mean_tpot_ms": 0.05, "output_throughput": 0.05, "p99_ttft_ms": 0.10,
        "p99_tpot_ms": 0.10}


def load(path: Path) -> list[dict[str, Any]]:
    d = json.loads(path.read_text())
    cfg = d.get("config", {})
    rows = []
    for r in d["results"]:
        rows.append({"file": str(path), "trace": cfg.get("trace", "conv"), "seed": cfg.get("seed", 0),
                     "rate": float(r["rate"]),
                     "real": {k: r["real"][k] for k in METRICS}, "error": {k: r["relative_error"][k] for k in METRICS}})
    return rows


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(f"{r['trace']}@{r['rate']:g}", []).append(r)
    out: dict[str, Any] = {}
    for key in sorted(groups):
        g = groups[key]
        entry: dict[str, Any] = {"runs": len(g), "per_run": [{"file": r["file"], "seed": r["seed"],
                                                              "error": r["error"]} for r in g]}
        for m in METRICS:
            errs = [r["error"][m] for r in g]
            entry[m] = {"median_error": statistics.median(errs), "worst_error": max(errs, key=abs),
                        "within_goal": sum(abs(e) <= GOAL[m] for e in errs)}
        same = {}
        for r in g:
            same.setdefault(r["seed"], []).append(r["real"])
        spread = {}
        for seed, reals in same.items():
            if len(reals) > 1:
                spread[str(seed)] = {m: max(x[m] for x in reals) / min(x[m] for x in reals) - 1 for m in METRICS}
        if spread:
            entry["real_run_to_run_spread"] = spread
        out[key] = entry
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = [r for p in args.results for r in load(Path(p))]
    summary = summarise(rows)
    print(f"{'trace@rate':12s} runs  " + "  ".join(f"{m:>24s}" for m in METRICS))
    for key, e in summary.items():
        cells = [f"{e[m]['median_error']:+6.1%} ({e[m]['worst_error']:+6.1%}) {e[m]['within_goal']}/{e['runs']}"
                 for m in METRICS]
        print(f"{key:12s} {e['runs']:4d}  " + "  ".join(f"{c:>24s}" for c in cells))
    print("cells: median error over the runs (the worst), runs within the goal (5% means, 10% P99s)")
    within = {m: sum(e[m]["within_goal"] for e in summary.values()) for m in METRICS}
    runs = sum(e["runs"] for e in summary.values())
    print("within the goal, of " + str(runs) + " (run, rate): " + ", ".join(f"{m} {n}" for m, n in within.items())
          + f"; latency cells {sum(n for m, n in within.items() if m != 'output_throughput')} of {4 * runs}")
    for key, e in summary.items():
        for seed, sp in e.get("real_run_to_run_spread", {}).items():
            print(f"real engine, {key} seed {seed}, same requests twice: "
                  + ", ".join(f"{m} {v:+.1%}" for m, v in sp.items()))
    if args.out:
        Path(args.out).write_text(json.dumps({"command": " ".join([sys.executable, *sys.argv]),
                                              "goal": GOAL, "within_goal": within, "runs": runs,
                                              "groups": summary}, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
