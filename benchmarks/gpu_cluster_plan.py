"""How ``gpu_cluster.py`` reads a plan: per-strategy and per-trace rates, the traces, and the time model that
estimates a plan's wall time (``--estimate``; ``gpu_cluster_run.sh`` prints it before a device call)."""

from __future__ import annotations

TRACES = {"conv": "azure_llm_2023_conv.csv", "code": "azure_llm_2023_code.csv"}

# Time model (fit to files a-i, see gpu_cluster_run.sh): the process (MPS daemon, imports) FILE_OVERHEAD_S, each
# strategy's start-up and warm-up STARTUP_S (workers, weights; 8-22 s measured), each run its arrival span
# (num_requests / rate) plus RUN_OVERHEAD_S (the drain after the last arrival, the simulator); a run cut at its cap
# costs up to span + SLO bound + 5 s.
FILE_OVERHEAD_S, STARTUP_S, RUN_OVERHEAD_S = 10.0, 15.0, 9.0


def parse_rates_for(text: str) -> dict[str, list[float]]:
    """``"hetis=4,8;low-alone=4,8,12"`` -> per-strategy rates (the others use ``--rates``)."""
    out: dict[str, list[float]] = {}
    for part in text.replace(" ", ";").split(";"):
        if part:
            name, _, rates = part.partition("=")
            out[name] = sorted(float(r) for r in rates.split(",") if r)
    return out


def estimate_s(names: list[str], rates: dict[str, list[float]], repeats: int, num_requests: int,
               bound_s: float | None, span_s: float = 0.0) -> tuple[float, float]:
    """(typical, worst case) wall seconds of a plan: every run unsaturated / every run cut at its cap. ``rates``:
    per strategy, every rate it runs (over all traces)."""
    spans = [max(num_requests, int(r * span_s + 0.5)) / r for n in names for r in rates[n] for _ in range(repeats)]
    base = FILE_OVERHEAD_S + STARTUP_S * len(names)
    return base + sum(spans) + RUN_OVERHEAD_S * len(spans), base + sum(spans) + (5.0 + (bound_s or 30.0)) * len(spans)


def parse_traces(text: str) -> list[str]:
    traces = [t for t in text.split(",") if t]
    bad = [t for t in traces if t not in TRACES]
    if bad or not traces or len(set(traces)) != len(traces):
        raise ValueError(f"--trace: one or more of {', '.join(sorted(TRACES))}, comma-separated (got {text!r})")
    return traces


def rates_of(trace: str, name: str, rates: list[float], trace_rates: dict[str, list[float]],
             rates_for: dict[str, list[float]]) -> list[float]:
    """A strategy's rates on a trace: ``--rates-for trace:name``, then ``name``, then ``--trace-rates``, then
    ``--rates``."""
    return rates_for.get(f"{trace}:{name}", rates_for.get(name, trace_rates.get(trace, rates)))
