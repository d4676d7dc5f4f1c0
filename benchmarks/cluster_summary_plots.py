"""cluster_summary.py's plots (matplotlib, optional): the strategies overview and one plot per comparison."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster_summary_stats import COMPARISONS, ORDER, RES, TARGET


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
