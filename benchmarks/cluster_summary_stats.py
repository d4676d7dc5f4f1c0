"""cluster_summary.py's data: the result files read and grouped (trace, setting, strategy, rate), medians over
repeats, throughput at SLO (bracket and interpolation), ratios of two and their verdicts. No GPU, no plots."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RES = ROOT / "benchmarks/results"
ORDER = ["high-alone", "low-alone", "dp", "pp", "pd-lp", "pd-hp", "cronus", "hetis"]
PAIR = ["dp", "pp", "pd-lp", "pd-hp", "cronus", "hetis"]  # strategies using both devices
TARGET = 0.9  # fraction of requests within the SLO that counts as "at SLO"
# KV path per old file: a-c through the coordinator (msgpack bytes), d-g direct worker-to-worker staged through
# host memory, h-i (and everything later) direct GPU to GPU by CUDA IPC. PD and Cronus are reported for the last
# path only, so their runs in a-g are left out; the other strategies move no KV.
KV_STRATEGIES = {"pd-lp", "pd-hp", "cronus"}
SUPERSEDED_KV = {f"gpu-cluster-h100-mps-{x}.json" for x in "abcdefg"}
PLANS = {"conv": "plan-emulated-h100-mps-pair.json", "code": "plan-emulated-h100-mps-pair-code.json"}
METRICS = ("mean_ttft_ms", "p50_ttft_ms", "p99_ttft_ms", "p50_itl_ms", "p99_itl_ms", "output_throughput",
           "request_goodput", "good_fraction")
COMPARISONS = {
    "cronus-vs-pd": "Cronus vs full PD (both directions): throughput at SLO",
    "cronus-tail": "Cronus vs DP and PP: TTFT P99 and TBT (ITL) P99 at equal load",
    "hetis-starved": "Hetis vs DP, PP and PD on the memory-starved pair: throughput at SLO",
    "hetero-efficiency": "hetero efficiency: goodput(pair, best) / (goodput(high alone) + goodput(low alone))",
    "planner": "planner: its pick vs the best measured strategy",
}
INF = float("inf")


# ---- loading ---------------------------------------------------------------------------------------------
def file_meta(d: dict[str, Any], name: str) -> tuple[str, str]:
    """(trace, setting) of a result file; old files (no ``trace`` / ``memory_starved``) are Azure-conv, and the
    starved pair is named in their emulation's cluster. A file of another cluster than the emulated H100 pair has
    that cluster's name as its setting (issue 8's comparisons read only "pair" and "starved")."""
    trace = d.get("trace") or ("code" if "code" in str(d.get("workload", "")) else "conv")
    other = str(d.get("cluster_name") or "")
    if other and not other.startswith("emulated-h100-mps-pair"):  # e.g. issue 9's H200 pairs: kept apart
        return trace, other
    cluster = str(d.get("cluster") or (d.get("emulation") or {}).get("cluster") or "")
    starved = d.get("memory_starved")
    if starved is None:
        starved = "starved" in cluster or "starved" in name
    return trace, "starved" if starved else "pair"


def default_files(include_bursts: bool = False) -> list[Path]:
    """The result files; without ``include_bursts`` only sustained-load ones (``span_s`` > 0): a run of 100
    requests at 48-96 req/s is a burst that fits in one batch and never shows an engine's limit."""
    out = []
    for p in sorted(RES.glob("gpu-cluster-*.json")):
        if p.name == "gpu-cluster-summary.json" or "smoke" in p.name:
            continue
        if not include_bursts and not (json.loads(p.read_text()).get("span_s") or 0) > 0:
            continue
        out.append(p)
    return out


def load(paths: list[Path]) -> tuple[dict[tuple[str, str, str, float], list[dict[str, Any]]], list[dict[str, Any]]]:
    """(trace, setting, strategy, rate) -> the runs (repeats) of the latest file that measured it; and the files
    read (name, trace, setting, device, commit)."""
    docs = []
    for p in paths:
        d = json.loads(p.read_text())
        docs.append((d.get("started_utc") or "", p.name, d))
    docs.sort(key=lambda x: (x[0], x[1]))
    groups: dict[tuple[str, str, str, float], list[dict[str, Any]]] = {}
    files = []
    for _, name, d in docs:
        trace, setting = file_meta(d, name)
        files.append({"file": name, "trace": trace, "setting": setting, "device": d.get("device"),
                      "git_commit": d.get("git_commit"), "complete": d.get("complete", True)})
        mine: dict[tuple[str, str, str, float], list[dict[str, Any]]] = {}
        for row in d.get("results", []):
            s = row["strategy"]
            if s in KV_STRATEGIES and name in SUPERSEDED_KV:
                continue
            for run in row.get("runs", []):
                if "real" in run and run["real"].get("completed"):
                    mine.setdefault((trace, setting, s, float(run["rate"])), []).append(
                        dict(run, file=name, commit=d.get("git_commit")))
        groups.update(mine)  # a later file replaces the runs of the same group
    return groups, files


# ---- statistics ------------------------------------------------------------------------------------------
def _num(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def spread(values: list[Any]) -> dict[str, Any]:
    """Median, min, max and count of the finite values (None when there are none)."""
    v = [x for x in (_num(y) for y in values) if x is not None]
    if not v:
        return {"median": None, "min": None, "max": None, "n": 0}
    return {"median": statistics.median(v), "min": min(v), "max": max(v), "n": len(v)}


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per metric the spread over the repeats, measured (``real``) and simulated (``sim``), and the simulator's
    error on the medians, (sim - real) / real."""
    real = {k: spread([r["real"].get(k) for r in runs]) for k in METRICS}
    sim = {k: spread([(r.get("simulated") or {}).get(k) for r in runs]) for k in METRICS}
    err = {k: rel_err(sim[k]["median"], real[k]["median"]) for k in METRICS}
    return {"repeats": len(runs), "real": real, "sim": sim, "sim_error": err,
            "cut": any(r.get("cut") for r in runs), "files": sorted({r["file"] for r in runs})}


def err_at_slo(sim: dict[str, Any], real: dict[str, Any]) -> str:
    """The simulator's error on a throughput at SLO, '<=' / '>=' where one side is only a lower bound."""
    e = rel_err(sim.get("estimate"), real.get("estimate"))
    s_lb, r_lb = sim.get("how") == "lower bound", real.get("how") == "lower bound"
    if e is None or (s_lb and r_lb):
        return "-"
    return ("<= " if r_lb else ">= " if s_lb else "") + f_err(e)


def ratio_err(pred: dict[str, Any], meas: dict[str, Any]) -> float | None:
    """The simulator's error on a ratio, only where both ratios are estimates (not bounds)."""
    if pred.get("kind") != "=" or meas.get("kind") != "=":
        return None
    return rel_err(pred["estimate"], meas["estimate"])


def rel_err(pred: float | None, meas: float | None) -> float | None:
    if pred is None or meas is None or meas == 0 or not math.isfinite(pred) or not math.isfinite(meas):
        return None
    return (pred - meas) / meas


def rate_at_slo(points: dict[float, float], target: float = TARGET) -> dict[str, Any]:
    """Throughput at SLO from (rate -> median fraction of good requests).

    ``lo``: the highest passing rate below the lowest failing one (0 if none), ``hi``: the lowest failing rate
    (None if none failed). ``estimate``: where the fraction crosses ``target`` on the straight line between
    (lo, f(lo)) and (hi, f(hi)) (``how`` = "interpolated"); with no failing rate ``lo`` itself ("lower bound");
    with no passing rate below ``hi`` the line from (0, 1.0) ("interpolated from 0")."""
    pts = {float(r): g for r, g in points.items() if g is not None}
    if not pts:
        return {"lo": None, "hi": None, "estimate": None, "how": "not measured"}
    hi = min((r for r, g in pts.items() if g < target), default=INF)
    passing = [r for r, g in pts.items() if g >= target and r < hi]  # conservative: short runs are noisy
    lo = max(passing, default=0.0)
    if hi == INF:
        return {"lo": lo, "hi": None, "estimate": lo, "how": "lower bound"}
    g_lo = pts[lo] if passing else 1.0
    g_hi = pts[hi]
    est = lo + (g_lo - target) / (g_lo - g_hi) * (hi - lo) if g_lo > g_hi else lo
    return {"lo": lo, "hi": hi, "estimate": est, "how": "interpolated" if passing else "interpolated from 0"}


def at_slo(agg: dict[tuple[str, float], dict[str, Any]], strategy: str, side: str = "real") -> dict[str, Any]:
    pts = {rate: a[side]["good_fraction"]["median"] for (s, rate), a in agg.items() if s == strategy}
    return rate_at_slo(pts)


def ratio(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """a / b for two throughputs at SLO: the estimate (with its kind: '=' both interpolated, '>=' / '<=' when one
    side is a lower bound, None when both are) and the bounds from the brackets."""
    ea, eb = a.get("estimate"), b.get("estimate")
    out: dict[str, Any] = {"estimate": None, "kind": None, "at_least": None, "at_most": None}
    if ea is None or eb is None:
        return out
    if b.get("hi") and a.get("lo") is not None:
        out["at_least"] = a["lo"] / b["hi"]
    if a.get("hi") and b.get("lo"):
        out["at_most"] = a["hi"] / b["lo"]
    a_exact, b_exact = a["how"] != "lower bound", b["how"] != "lower bound"
    if eb > 0 and (a_exact or b_exact):
        out["estimate"] = ea / eb
        out["kind"] = "=" if a_exact and b_exact else (">=" if b_exact else "<=")
    return out


def verdict(value: float | None, kind: str | None, goal: tuple[str, float], at_least: float | None = None,
            at_most: float | None = None) -> str:
    """'met (bracket)' / 'missed (bracket)' where the bracket decides, else from the estimate ('met (interpolated)'),
    or 'undetermined'."""
    op, g = goal
    if op == ">=":
        if at_least is not None and at_least >= g:
            return "met (bracket)"
        if at_most is not None and at_most < g:
            return "missed (bracket)"
        if value is not None and kind in ("=", ">=") and value >= g:
            return "met (interpolated)"
        if value is not None and kind in ("=", "<=") and value < g:
            return "missed (interpolated)"
    else:  # "<="
        if at_most is not None and at_most <= g:
            return "met (bracket)"
        if at_least is not None and at_least > g:
            return "missed (bracket)"
        if value is not None and kind in ("=", "<=") and value <= g:
            return "met"
        if value is not None and kind in ("=", ">=") and value > g:
            return "missed"
    return "undetermined"


def f_err(e: float | None) -> str:
    return "-" if e is None else f"{100 * e:+.0f}%"
