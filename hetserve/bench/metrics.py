"""Benchmark metrics with the names and definitions of ``vllm bench serve``'s result JSON.

Definitions (per successful request, times in seconds, reported in ms):
- ttft: send to first token-carrying chunk; itl: gaps between later token chunks (pooled over requests);
- e2el: send to last token chunk; tpot = (e2el - ttft) / (output_len - 1), only for output_len > 1
  (for goodput a 1-token request counts as tpot 0, as in vLLM);
- percentiles use linear interpolation between closest ranks (numpy's default ``method="linear"``),
  std is the population std (numpy's ddof=0); an empty metric reports 0.
Throughputs divide by the benchmark duration (first send to last response). Failed requests count in
``failed`` and ``errors`` only.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from hetserve.bench.records import RequestRecord

PERCENTILE_METRICS: tuple[str, ...] = ("ttft", "tpot", "itl", "e2el")
DEFAULT_PERCENTILES: tuple[float, ...] = (50.0, 90.0, 99.0)
_METRIC_TITLES = {
    "ttft": "Time to First Token",
    "tpot": "Time per Output Token (excl. 1st token)",
    "itl": "Inter-token Latency",
    "e2el": "End-to-end Latency",
}


@dataclass(frozen=True)
class Slo:
    """Service-level objectives for goodput, in ms; a request is good when it meets every one that is set."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")

    def is_met(self, ttft_s: float, tpot_s: float, e2el_s: float) -> bool:
        return (
            (self.ttft_ms is None or ttft_s * 1000.0 <= self.ttft_ms)
            and (self.tpot_ms is None or tpot_s * 1000.0 <= self.tpot_ms)
            and (self.e2el_ms is None or e2el_s * 1000.0 <= self.e2el_ms)
        )

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in asdict(self).items() if v is not None}


def parse_slo(text: str) -> Slo:
    """``"ttft_ms=200,tpot_ms=50"`` -> Slo. Raises ValueError naming the bad part."""
    values: dict[str, float] = {}
    for part in text.replace(" ", ",").split(","):
        if not part:
            continue
        key, sep, raw = part.partition("=")
        if not sep:
            raise ValueError(f"expected KEY=VALUE, got {part!r} (keys: ttft_ms, tpot_ms, e2el_ms)")
        if key not in ("ttft_ms", "tpot_ms", "e2el_ms"):
            raise ValueError(f"unknown key {key!r} (keys: ttft_ms, tpot_ms, e2el_ms)")
        if key in values:
            raise ValueError(f"{key} given twice")
        try:
            values[key] = float(raw)
        except ValueError:
            raise ValueError(f"{key} needs a number of milliseconds, got {raw!r}") from None
    if not values:
        raise ValueError("empty SLO; example: ttft_ms=200,tpot_ms=50")
    return Slo(**values)


def parse_percentiles(text: str) -> tuple[float, ...]:
    """``"50,90,99"`` -> (50.0, 90.0, 99.0); each in (0, 100]."""
    try:
        ps = tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None
    if not ps or any(not 0 < p <= 100 for p in ps):
        raise ValueError(f"percentiles must be in (0, 100], got {text!r}")
    return ps


def percentile(values: Sequence[float], q: float, *, is_sorted: bool = False) -> float:
    """The q-th percentile (q in [0, 100]) with linear interpolation between closest ranks."""
    if not values:
        return 0.0
    ordered = values if is_sorted else sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values) if values else 0.0


def std(values: Sequence[float]) -> float:
    if not values:
        return 0.0
    m = mean(values)
    return math.sqrt(math.fsum((v - m) ** 2 for v in values) / len(values))


def percentile_key(p: float, metric: str) -> str:
    word = str(int(p)) if int(p) == p else str(p)
    return f"p{word}_{metric}_ms"


def tpot_s(rec: RequestRecord) -> float:
    if not rec.success or rec.output_len <= 1:
        return 0.0
    return (rec.e2el_s - rec.ttft_s) / (rec.output_len - 1)


def input_len(rec: RequestRecord) -> int:
    """The server's count when it reported usage (it knows chat templates, BOS), else the dataset's."""
    return rec.server_prompt_len if rec.server_prompt_len is not None else rec.prompt_len


def _max_output_tokens_per_s(records: Iterable[RequestRecord]) -> float:
    """Most output tokens whose chunk arrived within one 1-second bucket of the run."""
    buckets: dict[int, float] = {}
    for rec in records:
        if not rec.success:
            continue
        t = rec.start_s + rec.ttft_s
        tokens_per_chunk = rec.output_len / (len(rec.itl_s) + 1)
        b = math.floor(t)
        buckets[b] = buckets.get(b, 0.0) + tokens_per_chunk
        for gap in rec.itl_s:
            t += gap
            b = math.floor(t)
            buckets[b] = buckets.get(b, 0.0) + tokens_per_chunk
    return max(buckets.values(), default=0.0)


def _max_concurrent_requests(records: Iterable[RequestRecord]) -> int:
    events = sorted([(r.start_s, 1) for r in records] + [(r.end_s, -1) for r in records], key=lambda e: (e[0], e[1]))
    now = best = 0
    for _, step in events:
        now += step
        best = max(best, now)
    return best


def compute_metrics(
    records: Sequence[RequestRecord],
    duration_s: float,
    slo: Slo | None = None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> dict[str, Any]:
    """The vLLM-named result fields, plus per-request lists for plots and re-analysis."""
    ok = [r for r in records if r.success]
    per_metric: dict[str, list[float]] = {
        "ttft": [r.ttft_s for r in ok],
        "tpot": [tpot_s(r) for r in ok if r.output_len > 1],
        "itl": [gap for r in ok for gap in r.itl_s],
        "e2el": [r.e2el_s for r in ok],
    }
    total_input = sum(input_len(r) for r in ok)
    total_output = sum(r.output_len for r in ok)
    dur = duration_s if duration_s > 0 else float("nan")
    result: dict[str, Any] = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(ok) / dur,
        "request_goodput": None,
        "output_throughput": total_output / dur,
        "total_token_throughput": (total_input + total_output) / dur,
        "max_output_tokens_per_s": _max_output_tokens_per_s(ok),
        "max_concurrent_requests": _max_concurrent_requests(records),
    }
    if slo is not None:
        good = sum(1 for r in ok if slo.is_met(r.ttft_s, tpot_s(r), r.e2el_s))
        result["request_goodput"] = good / dur
    for metric in PERCENTILE_METRICS:
        values = per_metric[metric]
        result[f"mean_{metric}_ms"] = mean(values) * 1000.0
        ordered = sorted(values)
        result[f"median_{metric}_ms"] = percentile(ordered, 50.0, is_sorted=True) * 1000.0
        result[f"std_{metric}_ms"] = std(values) * 1000.0
        for p in percentiles:
            result[percentile_key(p, metric)] = percentile(ordered, p, is_sorted=True) * 1000.0
    result.update(
        {
            "input_lens": [input_len(r) for r in records],
            "output_lens": [r.output_len if r.success else 0 for r in records],
            "ttfts": [r.ttft_s for r in records],
            "itls": [list(r.itl_s) for r in records],
            "errors": [r.error for r in records],
            # our extras: enough per-request data to recompute every number above and draw the timeline
            "e2els": [r.e2el_s for r in records],
            "tpots": [tpot_s(r) for r in records],
            "start_times": [r.start_s for r in records],
            "end_times": [r.end_s for r in records],
            "scheduled_times": [r.scheduled_s for r in records],
            "requested_input_lens": [r.prompt_len for r in records],
            "expected_output_lens": [r.expected_output_len for r in records],
            "num_output_len_mismatch": sum(1 for r in ok if r.output_len != r.expected_output_len),
        }
    )
    return result


def format_summary(result: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) rows in the order of vLLM's summary; a label with value "" is a section title."""

    def num(key: str, fmt: str = "{:.2f}") -> str:
        v = result.get(key)
        return "n/a" if v is None else fmt.format(v)

    rows: list[tuple[str, str]] = [
        ("Serving Benchmark Result", ""),
        ("Successful requests", str(result["completed"])),
        ("Failed requests", str(result["failed"])),
        ("Benchmark duration (s)", num("duration")),
        ("Total input tokens", str(result["total_input_tokens"])),
        ("Total generated tokens", str(result["total_output_tokens"])),
        ("Request throughput (req/s)", num("request_throughput")),
    ]
    if result.get("request_goodput") is not None:
        rows.append(("Request goodput (req/s)", num("request_goodput")))
    rows += [
        ("Output token throughput (tok/s)", num("output_throughput")),
        ("Peak output token throughput (tok/s)", num("max_output_tokens_per_s")),
        ("Peak concurrent requests", str(result.get("max_concurrent_requests", "n/a"))),
        ("Total token throughput (tok/s)", num("total_token_throughput")),
    ]
    keys = list(result)
    for metric in PERCENTILE_METRICS:
        rows.append((_METRIC_TITLES[metric], ""))
        name = metric.upper()
        rows.append((f"Mean {name} (ms)", num(f"mean_{metric}_ms")))
        rows.append((f"Median {name} (ms)", num(f"median_{metric}_ms")))
        rows.append((f"Std {name} (ms)", num(f"std_{metric}_ms")))
        for key in keys:
            if key.startswith("p") and key.endswith(f"_{metric}_ms") and key != f"p{metric}_ms":
                pword = key[1 : -len(f"_{metric}_ms")]
                if pword == "50":
                    continue  # shown as the median
                rows.append((f"P{pword} {name} (ms)", num(key)))
    return rows


def render_summary(result: dict[str, Any], *, use_rich: bool = True) -> str:
    """The summary as text: a rich table when rich is installed and wanted, else a plain vLLM-style block."""
    rows = format_summary(result)
    if use_rich:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            use_rich = False
    if use_rich:
        table = Table(show_header=False, title=rows[0][0], title_style="bold")
        table.add_column("metric")
        table.add_column("value", justify="right")
        for label, value in rows[1:]:
            if value == "":
                table.add_section()
                table.add_row(f"[bold]{label}[/bold]", "")
            else:
                table.add_row(label, value)
        console = Console(width=72, record=True, force_terminal=False, color_system=None)
        with console.capture() as cap:
            console.print(table)
        return cap.get()
    lines: list[str] = []
    for label, value in rows:
        if value == "":
            lines.append(f"{' ' + label + ' ':=^50}" if not lines else f"{label:-^50}")
        else:
            lines.append(f"{label + ':':<40}{value:>10}")
    lines.append("=" * 50)
    return "\n".join(lines)
