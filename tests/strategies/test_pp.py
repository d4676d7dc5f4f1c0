"""PP layer split: the dynamic programme against brute force over every split, with full per-stage cost models."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from hetserve.core.devices import GiB, get_device
from hetserve.core.errors import ValidationError
from hetserve.core.model_config import ModelConfig
from hetserve.planner.costmodel import CostModel
from hetserve.strategies.pp import REPRESENTATIVE_BATCH, StageDevice, choose_layer_split

ROOT = Path(__file__).resolve().parents[2]
MODEL = ModelConfig.from_path(ROOT / "examples/models/llama-3.1-8b")


def _brute_force(stages: list[StageDevice], min_kv_tokens: int) -> float:
    """Lowest bottleneck stage time over every contiguous split, each stage costed by its own CostModel."""
    L = MODEL.num_hidden_layers
    best = float("inf")
    for cuts in itertools.combinations(range(1, L), len(stages) - 1):
        bounds = (0, *cuts, L)
        times = []
        for d, a, b in zip(stages, bounds, bounds[1:]):
            c = CostModel(MODEL, d.spec, layers=(a, b))
            fp = c.memory_footprint(256, 2048, d.memory_bytes)
            if fp["kv_bytes_available"] // c.kv_bytes_per_token() < min_kv_tokens:
                break
            times.append(c.step_time_s(REPRESENTATIVE_BATCH))
        else:
            best = min(best, max(times))
    return best


@pytest.mark.parametrize("names", [("H100-SXM", "A10"), ("A10", "L4"), ("A10", "L4", "T4")])
def test_split_matches_brute_force(names: tuple[str, ...]) -> None:
    stages = [StageDevice(get_device(n), get_device(n).memory_bytes) for n in names]
    ranges = choose_layer_split(MODEL, stages, min_kv_tokens=8192, time_tolerance=0.0)
    assert ranges[0][0] == 0 and ranges[-1][1] == MODEL.num_hidden_layers
    assert all(a < b for a, b in ranges) and all(r[1] == s[0] for r, s in itertools.pairwise(ranges))
    got = max(CostModel(MODEL, d.spec, layers=r).step_time_s(REPRESENTATIVE_BATCH) for d, r in zip(stages, ranges))
    assert got == pytest.approx(_brute_force(stages, 8192), rel=1e-9)


def test_faster_device_gets_more_layers_and_memory_binds() -> None:
    h100, a10 = get_device("H100-SXM"), get_device("A10")
    (a, b), (c, d) = choose_layer_split(
        MODEL, [StageDevice(h100, h100.memory_bytes), StageDevice(a10, a10.memory_bytes)]
    )
    assert b - a > d - c
    # cap the fast device's memory: it must give layers back to fit weights + KV
    small = StageDevice(h100, 9 * GiB)
    (a2, b2), _ = choose_layer_split(MODEL, [small, StageDevice(a10, a10.memory_bytes)], min_kv_tokens=4096)
    assert b2 - a2 < b - a
    c_first = CostModel(MODEL, h100, layers=(a2, b2))
    fp = c_first.memory_footprint(256, 2048, 9 * GiB)
    assert fp["kv_bytes_available"] // c_first.kv_bytes_per_token() >= 4096


def test_no_split_fits_names_the_key() -> None:
    t4 = get_device("T4")
    with pytest.raises(ValidationError) as e:
        choose_layer_split(MODEL, [StageDevice(t4, 4 * GiB), StageDevice(t4, 4 * GiB)])
    assert e.value.field == "layers"
