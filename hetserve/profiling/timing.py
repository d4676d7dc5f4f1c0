"""Timing one callable on a device: CUDA events on a stream (replayed from a CUDA graph when it can be captured)
or the wall clock on a CPU."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch


class Timer:
    """Median (GPU) or minimum (CPU) time of a callable: CUDA events on ``stream``, or the wall clock."""

    def __init__(self, device: torch.device, stream: Any, warmup: int, repeat: int, use_graphs: bool,
                 statistic: str = "auto") -> None:
        self.device = device
        if statistic == "auto":
            statistic = "median" if device.type == "cuda" else "min"
        self.reduce: Callable[[Sequence[float]], float] = statistics.median if statistic == "median" else min
        self.statistic = statistic
        self.stream = stream
        self.warmup = warmup
        self.repeat = repeat
        self.use_graphs = use_graphs and device.type == "cuda"
        self.modes: dict[str, int] = {}
        self.capture_errors: dict[str, int] = {}  # why a CUDA graph capture fell back to eager timing

    def _count(self, mode: str) -> None:
        self.modes[mode] = self.modes.get(mode, 0) + 1

    def __call__(self, fn: Callable[[], Any], graph: bool = True) -> float:
        if self.device.type != "cuda":
            for _ in range(self.warmup):
                fn()
            times = []
            for _ in range(self.repeat):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            self._count("wall")
            return self.reduce(times)
        s = self.stream
        with torch.cuda.stream(s):
            for _ in range(max(1, self.warmup)):
                fn()
            s.synchronize()
            run: Callable[[], Any] = fn
            mode = "eager"
            g = None
            if graph and self.use_graphs:
                # capture_begin/end on the current stream rather than torch.cuda.graph(), whose entry runs
                # gc.collect() and empty_cache() every time (a tenth of a second per grid point)
                # a private memory pool per graph: reusing one pool after its graphs were freed trips
                # "use_count > 0 INTERNAL ASSERT FAILED" in CUDACachingAllocator (torch 2.11, H100), and every
                # capture after the first then fell back to eager timing
                g = torch.cuda.CUDAGraph()
                try:
                    g.capture_begin()
                    try:
                        fn()
                    finally:
                        g.capture_end()
                    run, mode = g.replay, "graph"
                except Exception as e:  # noqa: BLE001 - capture is an optimisation; eager timing is still right
                    g = None
                    self.capture_errors.setdefault(f"{type(e).__name__}: {e}"[:300], 0)
                    self.capture_errors[f"{type(e).__name__}: {e}"[:300]] += 1
                    torch.cuda.synchronize(self.device)
            run()
            s.synchronize()
            starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeat)]
            ends = [torch.cuda.Event(enable_timing=True) for _ in range(self.repeat)]
            for a, b in zip(starts, ends, strict=True):
                a.record(s)
                run()
                b.record(s)
            s.synchronize()
        del g
        self._count(mode)
        return self.reduce([a.elapsed_time(b) for a, b in zip(starts, ends, strict=True)]) / 1e3


def mode_delta(before: dict[str, int], after: dict[str, int]) -> str:
    d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    used = [k for k, v in d.items() if v > 0]
    return "+".join(sorted(used)) if used else "none"


class nullcontext_:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None
