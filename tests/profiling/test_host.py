"""The engine-level host terms of a profile: measured through a real ``LLMEngine`` around an executor whose
costs we planted, so the measurement must recover them; the small fits against brute force."""

from __future__ import annotations

import itertools
import random
import time
from pathlib import Path

import pytest

from hetserve.core.outputs import ModelRunnerOutput, SchedulerOutput
from hetserve.planner.profile import DeviceProfile, Table1D, load_profile
from hetserve.profiling.host import fit_line, measure_host_costs, monotone
from hetserve.sim.simulator import SimExecutor

NEW_S = 2e-3  # planted: each request the executor has not seen costs this once
STEP_S = 1e-3  # planted: every step
WAKE_S = 4e-3  # planted: a step that starts more than WAKE_AFTER_S after the previous one ended
WAKE_AFTER_S = 15e-3  # far from the measured gaps: a busy CI box pauses a process for milliseconds


class PlantedExecutor(SimExecutor):
    """An executor whose time is known: STEP_S a step, NEW_S per new request, WAKE_S after an idle gap.
    It sleeps rather than spins, so that on a busy machine other processes do not stretch its costs."""

    block_size = 16

    def __init__(self) -> None:
        super().__init__(400)
        self._last_end = time.perf_counter()

    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        if so.scheduled:
            cold = time.perf_counter() - self._last_end > WAKE_AFTER_S
            time.sleep(STEP_S + NEW_S * sum(s.new is not None for s in so.scheduled) + (WAKE_S if cold else 0.0))
        out = super().execute(so)
        self._last_end = time.perf_counter()
        return out


def _zero_profile() -> DeviceProfile:
    return DeviceProfile(device_name="fake", emulation=None, model_name="m", shape_hash="0", dtype="float32",
                         kv_cache_dtype="float32", tp=1, dense=Table1D((1.0,), (0.0,)))


def test_measurement_recovers_planted_step_new_request_and_wake_costs() -> None:
    host = measure_host_costs(
        PlantedExecutor(), _zero_profile(), 1, decode_num_seqs=(1, 2, 4), decode_ctx=32, prompt_lengths=(16, 64),
        idle_s=(0.0, 0.002, 0.03, 0.05), warmup=1, repeat=9, reduce=min,
    )
    # the engine's own host work (scheduler, outputs) comes on top of the planted costs: tens of microseconds
    slack = 1.5e-3
    assert STEP_S <= host.step_overhead_s + 5e-5 < STEP_S + slack
    assert NEW_S * 0.9 <= host.new_seq_overhead_s + 64 * host.new_seq_overhead_per_token_s < NEW_S + slack
    assert host.step_overhead_per_seq_s < 2e-4
    wake = host.idle_wake
    assert wake is not None and wake.xs == (0.0, 0.002, 0.03, 0.05)
    assert list(wake.ys) == sorted(wake.ys)  # never warmer after a longer gap
    # no gap, or one shorter than the planted threshold: far below the planted wake-up (a loaded box pauses
    # a process for a few milliseconds now and then; the median of the pairs absorbs most of it)
    assert wake.ys[0] < WAKE_S / 2 and wake.ys[1] < WAKE_S / 2
    assert WAKE_S * 0.75 < wake.ys[2] < WAKE_S + slack and WAKE_S * 0.75 < wake.ys[3] < WAKE_S + slack
    kinds = {v["kind"] for v in host.validation}
    assert kinds == {"engine decode", "engine new request", "engine idle wake"}


def test_fit_line_against_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(100):
        xs = [float(x) for x in sorted(rng.sample(range(1, 600), 3))]
        ys = [rng.uniform(0, 1e-3) for _ in xs]
        a, b = fit_line(xs, ys)
        assert a >= 0 and b >= 0

        def sse(a: float, b: float, xs: list[float] = xs, ys: list[float] = ys) -> float:
            return sum((a + b * x - y) ** 2 for x, y in zip(xs, ys, strict=True))

        # no point of a fine grid over the feasible region (a, b >= 0) does better
        best = min(sse(ga, gb) for ga, gb in itertools.product(
            [i * 2e-5 for i in range(60)], [i * 5e-8 for i in range(60)]))
        assert sse(a, b) <= best + 1e-15
    assert fit_line([16.0, 128.0, 256.0], [1e-5 + 2e-7 * x for x in (16, 128, 256)]) == pytest.approx((1e-5, 2e-7))


def test_monotone_is_the_least_squares_non_decreasing_fit() -> None:
    rng = random.Random(1)
    for _ in range(200):
        ys = [rng.choice([0.0, 1.0, 2.0, 3.0]) for _ in range(rng.randint(1, 6))]
        fit = monotone(ys)
        assert all(a <= b + 1e-12 for a, b in itertools.pairwise(fit))
        # brute force over non-decreasing sequences on a 0.25 grid
        grid = [i / 4 for i in range(13)]
        best = min(sum((a - b) ** 2 for a, b in zip(c, ys, strict=True))
                   for c in itertools.combinations_with_replacement(grid, len(ys)))
        assert sum((a - b) ** 2 for a, b in zip(fit, ys, strict=True)) <= best + 1e-12


def test_committed_cpu_profile_has_the_host_terms() -> None:
    path = Path(__file__).resolve().parents[2] / "profiles" / "cpu-tiny-llama.json"
    p = load_profile(path)
    assert p.idle_wake is not None and p.idle_wake.xs[0] == 0.0
    assert list(p.idle_wake.ys) == sorted(p.idle_wake.ys)
    assert p.new_seq_overhead_s >= 0 and p.new_seq_overhead_per_token_s >= 0
    assert p.meta.get("load_average") is not None
