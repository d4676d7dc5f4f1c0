"""cluster_summary.py's Markdown: the per-run and throughput-at-SLO tables, the five comparisons, the sources."""

from __future__ import annotations

from typing import Any

from cluster_summary_stats import COMPARISONS, TARGET, err_at_slo, f_err


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


# ---- the report ------------------------------------------------------------------------------------------
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
