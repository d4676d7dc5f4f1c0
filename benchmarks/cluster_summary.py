"""Summarise the emulated-pair GPU runs (``benchmarks/results/gpu-cluster-*.json``) for issues 7 and 8.

No GPU: reads the result files (default: every ``gpu-cluster-*.json`` in ``benchmarks/results/`` but the summary
and smoke files), groups the runs by trace (conv / code), cluster (the pair / the memory-starved pair), strategy
and rate, and reports per group the median (and min / max) over the repeats of every metric, measured and
simulated. A later file replaces an earlier one's runs of the same group (files without ``started_utc``, the
older ones, first and in name order); the repeats within one file are pooled.

Throughput at SLO (the highest rate with >= 90% of requests within the SLO) comes two ways from the medians of
the fraction of good requests per rate: a bracket (highest passing rate below the lowest failing one, lowest
failing rate) and an estimate, interpolated linearly between those two rates (a lower bound when no rate failed;
interpolated from rate 0, all good, when the lowest rate failed). The simulator's prediction is the same
computation on its own fraction at the same rates.

Issue 8's five comparisons, each per trace, measured beside the simulator's prediction and its error: Cronus vs
PD (both directions) throughput at SLO, Cronus vs DP and PP tail latency at equal load, Hetis vs DP / PP / PD on
the memory-starved pair, hetero efficiency, the planner's pick vs the best measured strategy. Writes
``gpu-cluster-summary.{md,json}``, ``gpu-cluster-strategies.png`` and one plot per comparison
(``gpu-cluster-{cronus-vs-pd,cronus-tail,hetis-starved,hetero-efficiency,planner}.png``).

    python benchmarks/cluster_summary.py                       # every result file
    python benchmarks/cluster_summary.py benchmarks/results/gpu-cluster-h100-mps-j-code.json ...
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the cluster_summary_* modules beside this file

from cluster_summary_compare import load_plan, plan_strategy, summarise
from cluster_summary_plots import plots
from cluster_summary_stats import (
    COMPARISONS,
    METRICS,
    ORDER,
    PAIR,
    PLANS,
    RES,
    ROOT,
    TARGET,
    aggregate,
    at_slo,
    default_files,
    err_at_slo,
    f_err,
    file_meta,
    load,
    rate_at_slo,
    ratio,
    ratio_err,
    rel_err,
    spread,
    verdict,
)
from cluster_summary_tables import f_ms, f_rate, f_ratio, markdown, md_table

# the helpers stay importable from here (tests/benchmarks/test_cluster_summary.py loads this file)
__all__ = [
    "COMPARISONS", "METRICS", "ORDER", "PAIR", "PLANS", "RES", "ROOT", "TARGET", "aggregate", "at_slo", "default_files",
    "err_at_slo", "f_err", "f_ms", "f_rate", "f_ratio", "file_meta", "load", "load_plan", "main", "markdown",
    "md_table", "plan_strategy", "plots", "rate_at_slo", "ratio", "ratio_err", "rel_err", "spread", "summarise",
    "verdict",
]


def _clean(x: Any) -> Any:
    """JSON without Infinity / NaN."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", help="result files (default: benchmarks/results/gpu-cluster-*.json run at a "
                    "sustained load, i.e. with span_s > 0)")
    ap.add_argument("--include-bursts", action="store_true",
                    help="also the 100-request burst files of session 2 (a-i) and the first call")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--out-dir", default=str(RES), help="where the summary and plots go (default: results/)")
    args = ap.parse_args()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [Path(f) for f in args.files] or default_files(args.include_bursts)
    groups, files = load(paths)
    if not groups:
        print("no results", file=sys.stderr)
        return 1
    summary = summarise(groups)
    lines = markdown(summary, files)
    (out_dir / "gpu-cluster-summary.md").write_text("\n".join(lines) + "\n")
    out = {"command": " ".join(["python", *[a if not a.startswith(str(ROOT)) else a.removeprefix(str(ROOT) + "/")
                                           for a in sys.argv]]),
           "device": "; ".join(sorted({str(f["device"]) for f in files})), "source_files": files,
           "at_slo": f">= {100 * TARGET:.0f}% of requests within the SLO; medians over repeats",
           "emulation": "one H100 split by MPS 75% / 25% (examples/clusters/emulated-h100-mps-pair.yaml); the pair "
                        "shares HBM bandwidth",
           "traces": summary}
    (out_dir / "gpu-cluster-summary.json").write_text(json.dumps(_clean(out), indent=1))
    print("\n".join(lines))
    written = [] if args.no_plots else plots(summary, out_dir)
    print(f"wrote gpu-cluster-summary.md, gpu-cluster-summary.json{', ' if written else ''}{', '.join(written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
