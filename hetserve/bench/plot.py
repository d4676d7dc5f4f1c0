"""One figure per benchmark: latency CDFs and the request timeline, drawn from the result JSON alone
(so an old ``--output`` file can be re-plotted)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _cdf(ax: Any, values_ms: list[float], label: str) -> None:
    if not values_ms:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        return
    xs = sorted(values_ms)
    ys = [(i + 1) / len(xs) for i in range(len(xs))]
    ax.step(xs, ys, where="post", label=label)


def plot_result(result: dict[str, Any], path: str | Path) -> Path:
    """Writes a PNG (or any format matplotlib infers from the suffix) and returns its path."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    errors: list[str] = result.get("errors", [])
    ok = [not e for e in errors]
    ttfts = [t * 1000.0 for t, good in zip(result.get("ttfts", []), ok) if good]
    e2els = [t * 1000.0 for t, good in zip(result.get("e2els", []), ok) if good]
    tpots = [
        t * 1000.0 for t, good, n in zip(result.get("tpots", []), ok, result.get("output_lens", [])) if good and n > 1
    ]
    itls = [g * 1000.0 for gaps, good in zip(result.get("itls", []), ok) if good for g in gaps]

    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    (ax_ttft, ax_tok), (ax_e2e, ax_time) = axes
    _cdf(ax_ttft, ttfts, "TTFT")
    ax_ttft.set(title="Time to first token", xlabel="ms", ylabel="fraction of requests")
    _cdf(ax_tok, tpots, "TPOT (per request)")
    _cdf(ax_tok, itls, "ITL (per token gap)")
    ax_tok.set(title="Time per output token / inter-token latency", xlabel="ms", ylabel="fraction")
    if tpots or itls:
        ax_tok.legend(loc="lower right")
    _cdf(ax_e2e, e2els, "E2E")
    ax_e2e.set(title="End-to-end latency", xlabel="ms", ylabel="fraction of requests")
    for ax in (ax_ttft, ax_tok, ax_e2e):
        ax.grid(True, alpha=0.3)
        ax.set_ylim(0, 1.02)

    starts = result.get("start_times", [])
    ends = result.get("end_times", [])
    for i, (s, e, good) in enumerate(zip(starts, ends, ok)):
        ax_time.hlines(i, s, e, colors="tab:blue" if good else "tab:red", linewidth=1)
    first_x = [s + t for s, t, good in zip(starts, result.get("ttfts", []), ok) if good]
    first_y = [i for i, good in enumerate(ok[: len(starts)]) if good]
    if first_x:
        ax_time.plot(first_x, first_y, "|", color="black", markersize=4, label="first token")
        ax_time.legend(loc="lower right")
    ax_time.set(
        title=f"Request timeline ({sum(ok)} ok, {len(ok) - sum(ok)} failed in red)",
        xlabel="s since benchmark start",
        ylabel="request",
    )
    ax_time.grid(True, alpha=0.3)

    rate = result.get("request_rate")
    fig.suptitle(
        f"{result.get('model_id', '')} {result.get('dataset', '')} rate={rate} "
        f"max_concurrency={result.get('max_concurrency')}  "
        f"{result.get('request_throughput', 0):.2f} req/s, {result.get('output_throughput', 0):.1f} tok/s"
    )
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
