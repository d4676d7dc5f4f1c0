"""Workloads for the simulator: trace replay, Poisson or gamma arrivals with length distributions, fixed."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from hetserve.core.errors import ValidationError


@dataclass(frozen=True, slots=True)
class SimRequest:
    arrival_s: float
    prompt_len: int
    output_len: int


def _arrivals(n: int, rate: float, burstiness: float, rng: random.Random) -> list[float]:
    if rate == float("inf"):
        return [0.0] * n
    shape = burstiness
    scale = 1.0 / (rate * shape)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.gammavariate(shape, scale)
    return out


def _read_trace(path: str) -> list[tuple[float, int, int]]:
    from hetserve.bench.datasets import read_azure_trace

    rows = read_azure_trace(path)
    t0 = rows[0].timestamp_s
    return [(r.timestamp_s - t0, r.context_tokens, r.generated_tokens) for r in rows]


def parse_kv(text: str, field: str) -> dict[str, str]:
    out = {}
    for part in filter(None, text.split(",")):
        if "=" not in part:
            raise ValidationError(field, f"expected key=value, got {part!r}")
        k, v = part.split("=", 1)
        out[k.strip()] = v.strip()
    return out


def load_workload(
    spec: str,
    num_requests: int | None = None,
    request_rate: float | None = None,
    burstiness: float = 1.0,
    seed: int = 0,
    max_input_len: int | None = None,
    max_output_len: int | None = None,
    time_scale: float = 1.0,
) -> list[SimRequest]:
    """``spec``: a trace CSV path (Azure columns), ``fixed:input=512,output=128``,
    ``uniform:input=64-2048,output=16-512``, or ``trace:PATH``. Trace arrivals are replayed (scaled by
    ``time_scale``) unless ``request_rate`` is given, which redraws Poisson/gamma arrivals."""
    rng = random.Random(seed)
    if spec.startswith(("fixed:", "uniform:")):
        kind, _, rest = spec.partition(":")
        kv = parse_kv(rest, "--workload")
        n = num_requests or int(kv.get("n", 1000))
        if request_rate is None:
            request_rate = float(kv.get("rate", "inf"))

        def draw(key: str, default: str) -> list[int]:
            v = kv.get(key, default)
            try:
                if kind == "uniform" and "-" in v:
                    lo, hi = (int(x) for x in v.split("-"))
                    return [rng.randint(lo, hi) for _ in range(n)]
                return [int(v)] * n
            except ValueError:
                raise ValidationError("--workload", f"{key}={v!r} is not an integer or lo-hi range") from None

        ins, outs = draw("input", "512"), draw("output", "128")
        arr = _arrivals(n, request_rate, burstiness, rng)
        reqs = [SimRequest(a, i, o) for a, i, o in zip(arr, ins, outs)]
    else:
        path = spec.removeprefix("trace:")
        if not Path(path).exists():
            raise ValidationError("--workload", f"no trace file at {path!r} (or use fixed:/uniform: specs)")
        rows = _read_trace(path)
        if num_requests is not None:
            rows = rows[:num_requests]
        if request_rate is not None:
            arr = _arrivals(len(rows), request_rate, burstiness, rng)
        else:
            arr = [t * time_scale for t, _, _ in rows]
        reqs = [SimRequest(a, max(1, c), max(1, g)) for a, (_, c, g) in zip(arr, rows)]
    if max_input_len is not None or max_output_len is not None:
        reqs = [
            SimRequest(r.arrival_s, min(r.prompt_len, max_input_len or r.prompt_len),
                       min(r.output_len, max_output_len or r.output_len))
            for r in reqs
        ]
    return reqs
