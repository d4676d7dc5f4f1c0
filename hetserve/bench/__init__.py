"""Load generator for OpenAI-compatible servers (``hetserve bench``). Talks HTTP only; imports no engine code.

The HTTP client (aiohttp) is imported on first use, so the simulator can share the records and metrics
without the bench extra installed.
"""

from __future__ import annotations

from typing import Any

from hetserve.bench.datasets import DatasetConfig, SampleRequest, load_requests
from hetserve.bench.metrics import Slo, compute_metrics, parse_slo
from hetserve.bench.records import RequestRecord

__all__ = [
    "BenchmarkRun",
    "ClientConfig",
    "DatasetConfig",
    "RequestRecord",
    "SampleRequest",
    "Slo",
    "arrival_offsets_s",
    "compute_metrics",
    "load_requests",
    "parse_slo",
    "run_benchmark",
]


def __getattr__(name: str) -> Any:
    if name in ("BenchmarkRun", "ClientConfig", "arrival_offsets_s", "run_benchmark"):
        from hetserve.bench import client

        return getattr(client, name)
    raise AttributeError(name)
