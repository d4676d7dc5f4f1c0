"""Prometheus metrics with vLLM's names under our ``hetserve:`` prefix, each labelled with ``model_name``.

Each server gets its own ``CollectorRegistry`` (so tests can build several). The engine thread records
everything; prometheus_client's metric objects are thread-safe.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST

# seconds; from sub-step latencies of a tiny model on CPU up to long queues on a loaded server
_TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0, 640.0)
_ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                  2.5, 5.0, 10.0, 20.0, 80.0)
_REQUEST_BUCKETS_S = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                      60.0, 120.0, 240.0, 480.0, 960.0, 1920.0)


class ServerMetrics:
    """The metric objects of one server, already bound to its model name."""

    def __init__(self, model_name: str, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.model_name = model_name
        reg, label = self.registry, ["model_name"]

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(f"hetserve:{name}", doc, label, registry=reg, buckets=buckets)

        self.ttft_s = histogram(
            "time_to_first_token_seconds", "Time from arrival to the first output token.", _TTFT_BUCKETS_S
        ).labels(model_name)
        self.itl_s = histogram(
            "inter_token_latency_seconds", "Time between consecutive output tokens of a sequence.", _ITL_BUCKETS_S
        ).labels(model_name)
        self.e2e_s = histogram(
            "e2e_request_latency_seconds", "Time from arrival to the last output token.", _REQUEST_BUCKETS_S
        ).labels(model_name)
        self.queue_s = histogram(
            "request_queue_time_seconds", "Time a request waited before its first step.", _REQUEST_BUCKETS_S
        ).labels(model_name)
        self.num_running = Gauge(
            "hetserve:num_requests_running", "Sequences in the running batch.", label, registry=reg
        ).labels(model_name)
        self.num_waiting = Gauge(
            "hetserve:num_requests_waiting", "Sequences waiting to be scheduled.", label, registry=reg
        ).labels(model_name)
        self.kv_usage = Gauge(
            "hetserve:kv_cache_usage_perc", "Fraction of KV blocks in use (1 = full).", label, registry=reg
        ).labels(model_name)
        # prometheus_client appends _total to counters
        self.prompt_tokens = Counter(
            "hetserve:prompt_tokens", "Prompt tokens of requests that started generating.", label, registry=reg
        ).labels(model_name)
        self.generation_tokens = Counter(
            "hetserve:generation_tokens", "Output tokens generated.", label, registry=reg
        ).labels(model_name)
        self._success = Counter(
            "hetserve:request_success", "Finished sequences by finish reason.", ["model_name", "finished_reason"],
            registry=reg,
        )
        for reason in ("stop", "length", "abort"):
            self._success.labels(model_name, reason)
        # a cluster's instances (hetserve serve --cluster): one series per instance
        inst = ["model_name", "instance", "role", "device"]
        self._inst_running = Gauge("hetserve:instance_num_requests_running",
                                   "Sequences in the instance's running batch.", inst, registry=reg)
        self._inst_waiting = Gauge("hetserve:instance_num_requests_waiting",
                                   "Sequences waiting in the instance's scheduler.", inst, registry=reg)
        self._inst_kv = Gauge("hetserve:instance_kv_cache_usage_perc",
                              "Fraction of the instance's KV blocks in use (1 = full).", inst, registry=reg)
        self._inst_alive = Gauge("hetserve:instance_alive", "1 while the instance's worker is healthy, else 0.",
                                 inst, registry=reg)

    def count_finished(self, finished_reason: str) -> None:
        self._success.labels(self.model_name, finished_reason).inc()

    def set_scheduler_state(self, num_running: int, num_waiting: int, kv_usage: float) -> None:
        self.num_running.set(num_running)
        self.num_waiting.set(num_waiting)
        self.kv_usage.set(kv_usage)

    def set_instance_state(self, instances: Iterable[Any]) -> None:
        """From ``InstanceStatus`` objects (hetserve.server.cluster)."""
        for i in instances:
            labels = (self.model_name, i.name, i.role, i.device)
            self._inst_running.labels(*labels).set(i.num_running)
            self._inst_waiting.labels(*labels).set(i.num_waiting)
            self._inst_kv.labels(*labels).set(i.kv_cache_usage)
            self._inst_alive.labels(*labels).set(1 if i.alive else 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
