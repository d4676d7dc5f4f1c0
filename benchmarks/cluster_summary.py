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
import statistics
import sys
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
    starved pair is named in their emulation's cluster."""
    trace = d.get("trace") or ("code" if "code" in str(d.get("workload", "")) else "conv")
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


# ---- formatting ------------------------------------------------------------------------------------------
def f_rate(x: dict[str, Any]) -> str:
    """'41.2 (36-48)' for an interpolated throughput at SLO, '>= 48' for a lower bound."""
    if x.get("estimate") is None:
        return "-"
    br = f"{x['lo']:g}-{x['hi']:g}" if x.get("hi") is not None else f">= {x['lo']:g}"
    if x["how"] == "lower bound":
        return f">= {x['lo']:g}"
    return f"{x['estimate']:.1f} ({br}{', from 0' if x['how'] == 'interpolated from 0' else ''})"


def f_ratio(r: dict[str, Any]) -> str:
    if r.get("estimate") is None:
        b = []
        if r.get("at_least") is not None:
            b.append(f">= {r['at_least']:.2f}")
        if r.get("at_most") is not None:
            b.append(f"<= {r['at_most']:.2f}")
        return " and ".join(b) + " (bracket)" if b else "-"
    text = f"{'' if r['kind'] == '=' else r['kind'] + ' '}{r['estimate']:.2f}x"
    b = [f"{r['at_least']:.2f}" if r.get("at_least") is not None else "",
         f"{r['at_most']:.2f}" if r.get("at_most") is not None else ""]
    if any(b):
        text += f" [{b[0] or '?'}, {b[1] or 'inf'}]"
    return text


def f_err(e: float | None) -> str:
    return "-" if e is None else f"{100 * e:+.0f}%"


def f_ms(s: dict[str, Any], digits: int = 0) -> str:
    """median (min-max) over repeats; the median alone for one repeat."""
    if s["median"] is None:
        return "-"
    if s["n"] <= 1:
        return f"{s['median']:.{digits}f}"
    return f"{s['median']:.{digits}f} ({s['min']:.{digits}f}-{s['max']:.{digits}f})"


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(r) + " |" for r in rows]]


# ---- planner ---------------------------------------------------------------------------------------------
def plan_strategy(cand: dict[str, Any], hi: str = "gpu0:0", lo: str = "gpu0:1") -> str | None:
    """A planner candidate as one of this benchmark's strategy names (None: not measured here, e.g. Cronus with
    a fixed k)."""
    s, devs, name = cand.get("strategy"), list(cand.get("devices") or []), cand.get("name", "")
    if s == "dp":
        return "dp" if len(devs) >= 2 else ("high-alone" if devs == [hi] else "low-alone" if devs == [lo] else None)
    if s == "pd":
        return "pd-lp" if devs[:1] == [lo] else "pd-hp" if devs[:1] == [hi] else None
    if s == "cronus":
        return "cronus" if "adaptive" in name else None
    return s if s in ("pp", "hetis") else None


def load_plan(trace: str) -> dict[str, Any] | None:
    p = RES / PLANS[trace]
    if not p.exists():
        return None
    d = json.loads(p.read_text())
    ranked = d.get("ranked") or []
    if not ranked:
        return None
    cands = []
    for c in ranked:
        cands.append({"name": c.get("name"), "strategy": plan_strategy(c), "goodput_rps": c.get("goodput_rps"),
                      "goodput_below_rps": c.get("goodput_below_rps")})
    return {"file": p.name, "pick": cands[0], "candidates": cands, "command": d.get("command")}


# ---- the comparisons -------------------------------------------------------------------------------------
def summarise(groups: dict[tuple[str, str, str, float], list[dict[str, Any]]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for trace in sorted({k[0] for k in groups}):
        res: dict[str, Any] = {}
        aggs = {setting: {(s, r): aggregate(runs) for (t, st, s, r), runs in groups.items()
                          if t == trace and st == setting} for setting in ("pair", "starved")}
        for setting, agg in aggs.items():
            strategies = sorted({s for s, _ in agg}, key=ORDER.index)
            res[setting] = {
                "table": [{"strategy": s, "rate": r, **agg[(s, r)]} for s in strategies
                          for r in sorted(rr for ss, rr in agg if ss == s)],
                "rate_at_slo": {s: {"real": at_slo(agg, s), "sim": at_slo(agg, s, "sim")} for s in strategies},
            }
        pair, ras = aggs["pair"], res["pair"]["rate_at_slo"]
        comps: dict[str, list[dict[str, Any]]] = {k: [] for k in COMPARISONS}
        # 1. Cronus vs PD
        for other in ("pd-lp", "pd-hp"):
            if "cronus" not in ras or other not in ras:
                comps["cronus-vs-pd"].append({"vs": other, "status": "not measured"})
                continue
            m = ratio(ras["cronus"]["real"], ras[other]["real"])
            p = ratio(ras["cronus"]["sim"], ras[other]["sim"])
            comps["cronus-vs-pd"].append({
                "vs": other, "goal": ">= 1.5x", "cronus_rate_at_slo": ras["cronus"]["real"],
                "other_rate_at_slo": ras[other]["real"], "ratio": m, "sim_ratio": p,
                "sim_cronus_rate_at_slo": ras["cronus"]["sim"], "sim_other_rate_at_slo": ras[other]["sim"],
                "sim_error": ratio_err(p, m),
                "verdict": verdict(m["estimate"], m["kind"], (">=", 1.5), m["at_least"], m["at_most"])})
        # 2. Cronus tail vs DP / PP at equal load
        for other in ("dp", "pp"):
            rates = sorted({r for s, r in pair if s == "cronus"} & {r for s, r in pair if s == other})
            if not rates:
                comps["cronus-tail"].append({"vs": other, "status": "not measured at a common rate"})
            for rate in rates:
                c, o = pair[("cronus", rate)], pair[(other, rate)]
                row: dict[str, Any] = {"vs": other, "rate": rate, "goal": "TTFT P99 <= 0.5x",
                                       "repeats": [c["repeats"], o["repeats"]]}
                for key, label in (("p99_ttft_ms", "ttft_p99"), ("p99_itl_ms", "tbt_p99")):
                    rm = _div(c["real"][key]["median"], o["real"][key]["median"])
                    rp = _div(c["sim"][key]["median"], o["sim"][key]["median"])
                    row[f"{label}_ratio"], row[f"sim_{label}_ratio"] = rm, rp
                    row[f"sim_{label}_error"] = rel_err(rp, rm)
                    row[f"cronus_{label}_ms"], row[f"{other}_{label}_ms"] = c["real"][key], o["real"][key]
                r = row["ttft_p99_ratio"]
                row["verdict"] = "undetermined" if r is None else ("met" if r <= 0.5 else "missed")
                comps["cronus-tail"].append(row)
        # 3. Hetis on the memory-starved pair
        st = res["starved"]["rate_at_slo"]
        base = [s for s in ("dp", "pp", "pd-lp", "pd-hp") if s in st]
        if "hetis" in st and base:
            best = max(base, key=lambda s: st[s]["real"]["estimate"] or 0.0)
            best_sim = max(base, key=lambda s: st[s]["sim"]["estimate"] or 0.0)
            m = ratio(st["hetis"]["real"], st[best]["real"])
            p = ratio(st["hetis"]["sim"], st[best_sim]["sim"])
            comps["hetis-starved"].append({
                "goal": ">= 1.3x the best of dp/pp/pd", "best": best, "sim_best": best_sim,
                "rate_at_slo": {s: st[s] for s in st}, "ratio": m, "sim_ratio": p,
                "sim_error": ratio_err(p, m),
                "verdict": verdict(m["estimate"], m["kind"], (">=", 1.3), m["at_least"], m["at_most"])})
        else:
            comps["hetis-starved"].append({
                "status": "not measured: needs hetis and at least one of dp/pp/pd-lp/pd-hp on the starved pair",
                "measured": sorted(st, key=ORDER.index), "rate_at_slo": {s: st[s] for s in st}})
        # 4. hetero efficiency
        pair_s = [s for s in PAIR if s in ras]
        if pair_s and "high-alone" in ras and "low-alone" in ras:
            best = max(pair_s, key=lambda s: (ras[s]["real"]["estimate"] or 0.0, ras[s]["real"]["lo"] or 0.0))
            row = {"goal": ">= 0.95", "best": best}
            for side in ("real", "sim"):
                b, h, lo_ = ras[best][side], ras["high-alone"][side], ras["low-alone"][side]
                if None in (b["estimate"], h["estimate"], lo_["estimate"]):
                    row[side] = {"estimate": None, "kind": None, "at_least": None, "at_most": None}
                    continue
                denom = {"estimate": h["estimate"] + lo_["estimate"],
                         "lo": (h["lo"] or 0) + (lo_["lo"] or 0),
                         "hi": (h["hi"] + lo_["hi"]) if h["hi"] is not None and lo_["hi"] is not None else None,
                         "how": "lower bound" if "lower bound" in (h["how"], lo_["how"]) else "interpolated"}
                row[side] = ratio(b, denom)
                row[f"{side}_rates"] = {"pair_best": b, "high-alone": h, "low-alone": lo_}
            row["sim_error"] = ratio_err(row["sim"], row["real"])
            m = row["real"]
            row["verdict"] = verdict(m["estimate"], m["kind"], (">=", 0.95), m["at_least"], m["at_most"])
            comps["hetero-efficiency"].append(row)
        else:
            comps["hetero-efficiency"].append({"status": "not measured: needs high-alone, low-alone and a pair"})
        # 5. planner
        plan = load_plan(trace)
        measured = {s: ras[s]["real"] for s in ras}
        if plan is None:
            comps["planner"].append({"status": f"no planner output ({PLANS[trace]})"})
        else:
            pick = plan["pick"]["strategy"]
            best = max(measured, key=lambda s: measured[s]["estimate"] or 0.0) if measured else None
            row = {"goal": "pick within 5% of the best measured", "plan_file": plan["file"],
                   "pick": pick, "pick_name": plan["pick"]["name"],
                   "best_measured": best if best is None or measured[best]["how"] != "lower bound"
                   else f"{best} (a lower bound)",
                   "pick_predicted_rps": plan["pick"]["goodput_rps"],
                   "candidates": [dict(c, measured=measured.get(c["strategy"] or "")) for c in plan["candidates"]]}
            if pick in measured and best is not None:
                m = (ratio(measured[pick], measured[best]) if pick != best else
                     {"estimate": 1.0, "kind": "=", "at_least": None, "at_most": None})
                row["pick_over_best"] = m
                row["pick_measured"] = measured[pick]
                row["sim_error"] = err_at_slo({"estimate": plan["pick"]["goodput_rps"], "how": "planner"},
                                              measured[pick])
                row["verdict"] = verdict(m["estimate"], m["kind"], (">=", 0.95), m["at_least"], m["at_most"])
                open_ = [s for s in measured if s != pick and measured[s]["how"] == "lower bound"]
                if open_ and row["verdict"].startswith("met"):  # one of these may still beat the pick
                    row["verdict"] += f"; not bounded above: {', '.join(open_)}"
            else:
                row["verdict"] = "undetermined: the pick was not measured"
            comps["planner"].append(row)
        res["comparisons"] = comps
        out[trace] = res
    return out


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def markdown(summary: dict[str, Any], files: list[dict[str, Any]]) -> list[str]:
    lines = ["# Strategies on an emulated GPU pair (issues 7, 8)", "",
             ("One H100 split by MPS 75% / 25% (`examples/clusters/emulated-h100-mps-pair.yaml`; the memory-starved "
             "variant `-starved.yaml` caps the high-end at 20 GB); the two share HBM bandwidth and L2. Llama-3.1-8B "
             "shape, random weights; Azure LLM 2023 lengths (prompt <= 2048, output <= 256), Poisson arrivals. "
             f"SLO: TTFT 2 s, TPOT 100 ms; at SLO = >= {100 * TARGET:.0f}% of requests within it. Values are "
             "medians over the repeats (min-max in brackets where there were several). Throughput at SLO: "
             "the estimate interpolated between the highest passing and the lowest failing rate, the bracket beside "
             "it; '>= x' when no rate failed, 'from 0' when the lowest rate failed (the line from rate 0, all good). "
              "Simulator errors are (sim - real) / real on the medians; a ratio's error only where neither side is a "
              "bound."), ""]
    for trace, res in summary.items():
        lines += [f"## Azure-{trace}", ""]
        runs_start = len(lines)  # the per-run tables go after the comparisons
        for setting, title in (("pair", "the pair"), ("starved", "the memory-starved pair")):
            tab = res[setting]["table"]
            if not tab:
                continue
            lines += [f"### Runs on {title}", ""]
            rows = []
            for t in tab:
                r, e = t["real"], t["sim_error"]
                rows.append([t["strategy"], f"{t['rate']:g}", str(t["repeats"]),
                             f"{f_ms(r['p50_ttft_ms'])} / {f_ms(r['p99_ttft_ms'])}",
                             f"{f_ms(r['p50_itl_ms'], 1)} / {f_ms(r['p99_itl_ms'])}",
                             f_ms(r["output_throughput"]),
                             "-" if r["good_fraction"]["median"] is None else
                             f"{100 * r['good_fraction']['median']:.0f}%" + (" cut" if t["cut"] else ""),
                             f_err(e["mean_ttft_ms"]), f_err(e["p99_ttft_ms"]), f_err(e["output_throughput"]),
                             ", ".join(f.removeprefix("gpu-cluster-").removesuffix(".json") for f in t["files"])])
            lines += md_table(["strategy", "rate req/s", "n", "TTFT p50 / p99 ms", "ITL p50 / p99 ms", "out tok/s",
                               "within SLO", "sim err TTFT mean", "TTFT p99", "tput", "file"], rows) + [""]
            lines += [f"Throughput at SLO on {title} (req/s):", ""]
            rows = [[s, f_rate(v["real"]), f_rate(v["sim"]), err_at_slo(v["sim"], v["real"])]
                    for s, v in res[setting]["rate_at_slo"].items()]
            lines += md_table(["strategy", "measured (bracket)", "simulated (bracket)", "sim err"], rows) + [""]
        runs_part = lines[runs_start:]
        del lines[runs_start:]
        c = res["comparisons"]
        lines += [f"### 1. {COMPARISONS['cronus-vs-pd']} (goal >= 1.5x)", ""]
        rows = []
        for x in c["cronus-vs-pd"]:
            if "status" in x:
                rows.append([f"cronus / {x['vs']}", x["status"], "", "", "", "", ""])
                continue
            rows.append([f"cronus / {x['vs']}", f_rate(x["cronus_rate_at_slo"]), f_rate(x["other_rate_at_slo"]),
                         f_ratio(x["ratio"]), f_ratio(x["sim_ratio"]), f_err(x["sim_error"]), x["verdict"]])
        lines += md_table(["ratio", "cronus req/s", "other req/s", "measured", "simulated", "sim err", "goal"],
                          rows) + [""]
        lines += [f"### 2. {COMPARISONS['cronus-tail']} (goal TTFT P99 <= 0.5x)", ""]
        rows = []
        for x in c["cronus-tail"]:
            if "status" in x:
                rows.append([f"cronus / {x['vs']}", "-", x["status"], "", "", "", "", ""])
                continue
            rows.append([f"cronus / {x['vs']}", f"{x['rate']:g}", _fx(x["ttft_p99_ratio"]),
                         _fx(x["sim_ttft_p99_ratio"]), f_err(x["sim_ttft_p99_error"]), _fx(x["tbt_p99_ratio"]),
                         _fx(x["sim_tbt_p99_ratio"]), x["verdict"]])
        lines += md_table(["ratio", "rate req/s", "TTFT P99", "sim", "sim err", "TBT P99", "sim", "goal"],
                          rows) + [""]
        lines += [f"### 3. {COMPARISONS['hetis-starved']} (goal >= 1.3x)", ""]
        for x in c["hetis-starved"]:
            if "status" in x:
                lines += [f"{x['status']} (measured there: {', '.join(x['measured']) or 'nothing'}).", ""]
            else:
                lines += md_table(["hetis / best", "best", "measured", "simulated", "sim err", "goal"],
                                  [[f"hetis / {x['best']}", x["best"], f_ratio(x["ratio"]), f_ratio(x["sim_ratio"]),
                                    f_err(x["sim_error"]), x["verdict"]]]) + [""]
        lines += [f"### 4. {COMPARISONS['hetero-efficiency']} (goal >= 0.95)", ""]
        for x in c["hetero-efficiency"]:
            if "status" in x:
                lines += [x["status"] + ".", ""]
            else:
                rr = x.get("real_rates", {})
                lines += md_table(["best pair strategy", "its req/s", "high + low req/s", "measured", "simulated",
                                   "sim err", "goal"],
                                  [[x["best"], f_rate(rr.get("pair_best", {})),
                                    f"{f_rate(rr.get('high-alone', {}))} + {f_rate(rr.get('low-alone', {}))}",
                                    f_ratio(x["real"]), f_ratio(x["sim"]), f_err(x["sim_error"]), x["verdict"]]])
                lines += [""]
        lines += [f"### 5. {COMPARISONS['planner']} (goal within 5%)", ""]
        for x in c["planner"]:
            if "status" in x:
                lines += [x["status"] + ".", ""]
                continue
            lines += [(f"Planner ({x['plan_file']}) picks **{x['pick_name']}** ({x['pick']}), predicted "
                      f"{x['pick_predicted_rps']:.1f} req/s; best measured: {x['best_measured']}. Pick / best "
                      f"measured: {f_ratio(x.get('pick_over_best', {}))}; the planner's figure against the "
                      f"pick's measured throughput at SLO: {x.get('sim_error', '-')}. Goal: {x['verdict']}."), ""]
            rows = [[c_["name"], c_["strategy"] or "(not measured)",
                     "-" if not c_["goodput_rps"] else f"{c_['goodput_rps']:.1f}",
                     f_rate(c_["measured"] or {}),
                     err_at_slo({"estimate": c_["goodput_rps"] or None, "how": "planner"}, c_["measured"] or {})]
                    for c_ in x["candidates"]]
            lines += md_table(["candidate", "strategy", "planner goodput req/s", "measured at SLO req/s",
                               "planner err"], rows) + [""]
        lines += runs_part
    lines += ["## Sources", ""]
    lines += md_table(["file", "trace", "cluster", "commit", "complete", "device"],
                      [[f["file"], f["trace"], f["setting"], str(f["git_commit"]), str(f["complete"]),
                        str(f["device"])] for f in files]) + [""]
    return lines


def _fx(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


# ---- plots -----------------------------------------------------------------------------------------------
def plots(summary: dict[str, Any], out_dir: Path = RES) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plots")
        return []
    traces = list(summary)
    written = []

    def series(tab: list[dict[str, Any]], s: str, key: str, side: str = "real") -> tuple[list, list, list, list]:
        rows = [t for t in tab if t["strategy"] == s and t[side][key]["median"] is not None]
        return ([t["rate"] for t in rows], [t[side][key]["median"] for t in rows],
                [t[side][key]["median"] - t[side][key]["min"] for t in rows],
                [t[side][key]["max"] - t[side][key]["median"] for t in rows])

    def curves(ax: Any, tab: list[dict[str, Any]], names: list[str], key: str, scale: float = 1.0) -> None:
        for i, s in enumerate(names):
            x, y, lo, hi = series(tab, s, key)
            if not x:
                continue
            color = f"C{i}"
            ax.errorbar(x, [v * scale for v in y], yerr=[[v * scale for v in lo], [v * scale for v in hi]],
                        marker="o", color=color, label=s, capsize=3)
            xs, ys, _, _ = series(tab, s, key, "sim")
            if xs:
                ax.plot(xs, [v * scale for v in ys], ls="--", marker="x", color=color, alpha=0.6)
        ax.set_xlabel("request rate (req/s)")
        ax.grid(alpha=0.3)

    curves_note = "solid: measured median, bars min-max over repeats; dashed: simulator"
    bars_note = "bars: measured estimate, whiskers the bracket ('>=': no rate failed);\ndiamonds: simulator"

    def save(fig: Any, name: str, title: str, note: str = curves_note) -> None:
        fig.suptitle(f"{title}\n({note})", fontsize=10)
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=90)
        plt.close(fig)
        written.append(name)

    # strategies overview (as before: TTFT / ITL P99, throughput; the pair, per trace)
    fig, axes = plt.subplots(len(traces), 3, figsize=(15, 4 * len(traces)), squeeze=False)
    for row, trace in zip(axes, traces, strict=True):
        tab = summary[trace]["pair"]["table"]
        for ax, key, title in zip(row, ("p99_ttft_ms", "p99_itl_ms", "output_throughput"),
                                  ("TTFT P99 (ms)", "ITL P99 (ms)", "output tok/s"), strict=True):
            curves(ax, tab, ORDER, key)
            ax.set_title(f"Azure-{trace}: {title}")
        row[0].set_yscale("log")
        row[1].set_yscale("log")
        row[2].legend(fontsize=7)
    save(fig, "gpu-cluster-strategies.png", "Llama-3.1-8B shape on one H100 split by MPS 75/25 (emulated pair)")

    # 1. Cronus vs PD: fraction within SLO against the rate, the at-SLO estimates marked
    fig, axes = plt.subplots(1, len(traces), figsize=(6 * len(traces), 4), squeeze=False)
    for ax, trace in zip(axes[0], traces, strict=True):
        names = ["cronus", "pd-lp", "pd-hp"]
        curves(ax, summary[trace]["pair"]["table"], names, "good_fraction", 100.0)
        ax.axhline(100 * TARGET, color="k", lw=0.8, ls=":")
        for i, s in enumerate(names):
            est = summary[trace]["pair"]["rate_at_slo"].get(s, {}).get("real", {})
            if est.get("estimate") is not None and est["how"] != "lower bound":
                ax.axvline(est["estimate"], color=f"C{i}", lw=0.8, ls=":")
        ax.set_ylabel("requests within SLO (%)")
        ax.set_title(f"Azure-{trace}")
        ax.legend(fontsize=8)
    save(fig, "gpu-cluster-cronus-vs-pd.png", COMPARISONS["cronus-vs-pd"])

    # 2. Cronus tail: TTFT P99 and ITL P99 of cronus, dp, pp
    fig, axes = plt.subplots(len(traces), 2, figsize=(12, 4 * len(traces)), squeeze=False)
    for row, trace in zip(axes, traces, strict=True):
        for ax, key, title in zip(row, ("p99_ttft_ms", "p99_itl_ms"), ("TTFT P99 (ms)", "TBT (ITL) P99 (ms)"),
                                  strict=True):
            curves(ax, summary[trace]["pair"]["table"], ["cronus", "dp", "pp"], key)
            ax.set_yscale("log")
            ax.set_title(f"Azure-{trace}: {title}")
            ax.legend(fontsize=8)
    save(fig, "gpu-cluster-cronus-tail.png", COMPARISONS["cronus-tail"])

    # 3. Hetis on the starved pair
    fig, axes = plt.subplots(1, len(traces), figsize=(6 * len(traces), 4), squeeze=False)
    for ax, trace in zip(axes[0], traces, strict=True):
        curves(ax, summary[trace]["starved"]["table"], ["hetis", "dp", "pp", "pd-lp", "pd-hp", "high-alone"],
               "good_fraction", 100.0)
        ax.axhline(100 * TARGET, color="k", lw=0.8, ls=":")
        ax.set_ylabel("requests within SLO (%)")
        ax.set_title(f"Azure-{trace}, memory-starved pair")
        if summary[trace]["starved"]["table"]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", transform=ax.transAxes)
    save(fig, "gpu-cluster-hetis-starved.png", COMPARISONS["hetis-starved"])

    # 4. hetero efficiency and 5. planner: throughput at SLO per strategy as bars (bracket as error bars)
    def bars(ax: Any, trace: str, highlight: dict[str, str], extra: dict[str, float] | None = None) -> None:
        ras = summary[trace]["pair"]["rate_at_slo"]
        names = [s for s in ORDER if s in ras]
        x = list(range(len(names)))
        est = [ras[s]["real"]["estimate"] or 0.0 for s in names]
        lo = [e - (ras[s]["real"]["lo"] or 0.0) for s, e in zip(names, est, strict=True)]
        hi = [((ras[s]["real"]["hi"] or e) - e) for s, e in zip(names, est, strict=True)]
        colors = [highlight.get(s, "C0") for s in names]
        ax.bar(x, est, yerr=[lo, hi], color=colors, capsize=3, alpha=0.8, label="measured (bracket)")
        for i, s in enumerate(names):
            if ras[s]["real"]["how"] == "lower bound":
                ax.annotate(">=", (i, est[i]), ha="center", va="bottom", fontsize=8)
        sim = [ras[s]["sim"]["estimate"] for s in names]
        ax.plot([i for i, v in zip(x, sim, strict=True) if v is not None], [v for v in sim if v is not None],
                "kD", ms=5, label="simulated")
        if extra:
            for label, v in extra.items():
                ax.axhline(v, color="C3", ls="--", lw=1, label=label)
        ax.set_xticks(x, names, rotation=30, fontsize=8)
        ax.set_ylabel("throughput at SLO (req/s)")
        ax.set_title(f"Azure-{trace}")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)

    fig, axes = plt.subplots(1, len(traces), figsize=(6 * len(traces), 4), squeeze=False)
    for ax, trace in zip(axes[0], traces, strict=True):
        ras = summary[trace]["pair"]["rate_at_slo"]
        extra = {}
        if "high-alone" in ras and "low-alone" in ras:
            h, l_ = ras["high-alone"]["real"]["estimate"], ras["low-alone"]["real"]["estimate"]
            if h is not None and l_ is not None:
                extra["high alone + low alone"] = h + l_
                extra["0.95 x (high + low)"] = 0.95 * (h + l_)
        bars(ax, trace, {"high-alone": "C7", "low-alone": "C7"}, extra)
    save(fig, "gpu-cluster-hetero-efficiency.png", COMPARISONS["hetero-efficiency"], bars_note)

    fig, axes = plt.subplots(1, len(traces), figsize=(6 * len(traces), 4), squeeze=False)
    for ax, trace in zip(axes[0], traces, strict=True):
        pl = summary[trace]["comparisons"]["planner"][0]
        hl = {pl["pick"]: "C2"} if pl.get("pick") else {}
        bars(ax, trace, hl)
        if pl.get("pick"):
            ras = summary[trace]["pair"]["rate_at_slo"]
            names = [s for s in ORDER if s in ras]
            pts = [(names.index(c["strategy"]), c["goodput_rps"]) for c in pl["candidates"]
                   if c["strategy"] in names and c["goodput_rps"]]
            if pts:
                ax.plot(*zip(*pts, strict=True), "r*", ms=10, label="planner's goodput")
                ax.legend(fontsize=7)
            ax.set_title(f"Azure-{trace}: planner picks {pl['pick']} (green)")
    save(fig, "gpu-cluster-planner.png", COMPARISONS["planner"], bars_note + ";\nstars: the planner's goodput")
    return written


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
