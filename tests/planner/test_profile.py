from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from hetserve.core.errors import ValidationError
from hetserve.core.model_config import ModelConfig
from hetserve.planner.profile import DeviceProfile, Table1D, Table2D, load_profile, model_shape_hash

ROOT = Path(__file__).resolve().parents[2]


def brute_1d(xs: list[float], ys: list[float], x: float) -> float:
    """Independent reference: scan for the segment; clamp below, extend the last segment above (never below it)."""
    if len(xs) == 1 or x <= xs[0]:
        return ys[0]
    for k in range(len(xs) - 1):
        if xs[k] <= x <= xs[k + 1]:
            return ys[k] + (ys[k + 1] - ys[k]) * (x - xs[k]) / (xs[k + 1] - xs[k])
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    return max(ys[-1], ys[-1] + slope * (x - xs[-1]))


def random_grid(rng: random.Random, n: int) -> list[float]:
    xs: list[float] = []
    x = rng.choice([0.0, 1.0, 16.0])
    for _ in range(n):
        xs.append(x)
        x += rng.choice([1.0, 3.0, x or 1.0])  # mostly doubling, like a power-of-two grid
    return xs


def test_1d_against_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(200):
        xs = random_grid(rng, rng.randint(1, 8))
        ys = [rng.uniform(0, 1e-3) for _ in xs]
        t = Table1D(tuple(xs), tuple(ys))
        probes = xs + [rng.uniform(-5, xs[-1] * 3 + 10) for _ in range(20)]
        for x in probes:
            assert t(x) == pytest.approx(brute_1d(xs, ys, x), rel=1e-12, abs=1e-18)


def test_1d_exact_on_linear_functions_including_extrapolation() -> None:
    xs = (1.0, 2.0, 4.0, 8.0, 64.0, 1024.0)
    t = Table1D(xs, tuple(3e-6 + 2e-8 * x for x in xs))
    for x in (1.0, 1.5, 3.0, 100.0, 1024.0, 5000.0, 1e6):
        assert t(x) == pytest.approx(3e-6 + 2e-8 * x, rel=1e-12)
    assert t(0.0) == pytest.approx(3e-6 + 2e-8)  # clamped below the grid


def test_1d_matches_numpy_inside_the_grid() -> None:
    np = pytest.importorskip("numpy")
    rng = random.Random(1)
    xs = random_grid(rng, 10)
    ys = [rng.uniform(0, 1) for _ in xs]
    t = Table1D(tuple(xs), tuple(ys))
    probes = [rng.uniform(xs[0], xs[-1]) for _ in range(100)]
    for x, ref in zip(probes, np.interp(probes, xs, ys), strict=True):
        assert t(x) == pytest.approx(float(ref), rel=1e-12)


def brute_2d(xs: list[float], ys: list[float], zs: list[list[float]], x: float, y: float) -> float:
    rows = [brute_1d(ys, row, y) for row in zs]
    return brute_1d(xs, rows, x)


def test_2d_against_brute_force_and_bilinear_exactness() -> None:
    rng = random.Random(2)
    for _ in range(100):
        xs = random_grid(rng, rng.randint(1, 5))
        ys = random_grid(rng, rng.randint(1, 5))
        zs = [[rng.uniform(0, 1) for _ in ys] for _ in xs]
        t = Table2D(tuple(xs), tuple(ys), tuple(tuple(r) for r in zs))
        for _ in range(20):
            x = rng.uniform(-1, xs[-1] * 2 + 2)
            y = rng.uniform(-1, ys[-1] * 2 + 2)
            assert t(x, y) == pytest.approx(brute_2d(xs, ys, zs, x, y), rel=1e-12, abs=1e-15)
    # f = a + b x + c y + d x y is reproduced exactly inside the grid (bilinear)
    xs2, ys2 = (1.0, 4.0, 32.0), (0.0, 128.0, 4096.0)

    def f(x: float, y: float) -> float:
        return 1e-6 + 2e-7 * x + 3e-9 * y + 1e-10 * x * y

    t = Table2D(xs2, ys2, tuple(tuple(f(x, y) for y in ys2) for x in xs2))
    for x, y in ((1, 0), (2.5, 64), (10, 1000), (32, 4096), (20, 3000)):
        assert t(x, y) == pytest.approx(f(x, y), rel=1e-12)


def _profile_dict() -> dict:
    m = ModelConfig.from_path(ROOT / "examples/models/llama-3.1-8b")
    return {
        "format": "hetserve-profile",
        "version": 1,
        "device": {"name": "H100-SXM", "emulation": None},
        "model": {"name": "llama-3.1-8b", "shape_hash": model_shape_hash(m), "num_hidden_layers": 32},
        "dtype": "bfloat16",
        "kv_cache_dtype": "bfloat16",
        "tp": 1,
        "tables": {
            "dense_s_per_layer": {"num_tokens": [1, 64, 4096], "time_s": [1.6e-4, 1.7e-4, 2.4e-3]},
            "decode_attn_s_per_layer": {
                "num_seqs": [1, 64],
                "context_len": [128, 4096],
                "time_s": [[5e-6, 9e-6], [2e-5, 3e-4]],
            },
            "prefill_attn_s_per_layer": {
                "num_tokens": [64, 4096],
                "context_len": [0, 4096],
                "time_s": [[6e-6, 2e-5], [2e-4, 6e-4]],
            },
            "lm_head_s": {"num_tokens": [1, 256], "time_s": [2e-4, 4e-4]},
        },
        "copy_bytes_per_s": 3.0e12,
        "kv_bytes_per_token": 131072,
        "step_overhead_s": 4e-5,
        "meta": {"command": "hetserve profile", "notes": "synthetic"},
    }


def test_save_load_round_trip(tmp_path: Path) -> None:
    p = DeviceProfile.from_dict(_profile_dict())
    f = tmp_path / "p.json"
    p.save(f)
    q = load_profile(f)
    assert q == p and q.meta["notes"] == "synthetic"
    assert q.dense(64) == 1.7e-4
    assert json.loads(f.read_text())["tables"]["decode_attn_s_per_layer"]["time_s"][1][1] == 3e-4


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (
            lambda d: d["tables"]["dense_s_per_layer"].update(num_tokens=[1, 64, 64]),
            "profile: tables.dense_s_per_layer.num_tokens",
        ),
        (
            lambda d: d["tables"]["dense_s_per_layer"].update(time_s=[1.0, 2.0]),
            "profile: tables.dense_s_per_layer.time_s",
        ),
        (
            lambda d: d["tables"]["decode_attn_s_per_layer"].update(time_s=[[1.0, 2.0]]),
            "profile: tables.decode_attn_s_per_layer.time_s",
        ),
        (lambda d: d["tables"]["lm_head_s"].update(time_s=[1.0, -2.0]), "profile: tables.lm_head_s.time_s"),
        (lambda d: d["tables"].pop("dense_s_per_layer"), "profile: tables.dense_s_per_layer"),
        (lambda d: d.update(format="vidur"), "profile: format"),
        (lambda d: d.update(version=9), "profile: version"),
        (lambda d: d.update(tp=0), "profile: tp"),
        (lambda d: d["model"].pop("shape_hash"), "profile: model.shape_hash"),
    ],
)
def test_validation_names_the_field(mutate, field: str) -> None:  # type: ignore[no-untyped-def]
    d = _profile_dict()
    mutate(d)
    with pytest.raises(ValidationError) as e:
        DeviceProfile.from_dict(d)
    assert e.value.field == field


def test_host_terms_round_trip_and_old_profiles_load_without_them(tmp_path: Path) -> None:
    d = _profile_dict()
    old = DeviceProfile.from_dict(d)  # a profile written before the host terms existed
    assert (old.step_overhead_per_seq_s, old.new_seq_overhead_s, old.new_seq_overhead_per_token_s) == (0, 0, 0)
    assert old.idle_wake is None and old.idle_wake_s(1.0) == 0.0
    d.update(step_overhead_per_seq_s=3e-6, new_seq_overhead_s=5e-5, new_seq_overhead_per_token_s=2e-7)
    d["tables"]["idle_wake_s"] = {"idle_s": [0, 0.005, 0.1], "time_s": [0, 4e-4, 9e-4]}
    p = DeviceProfile.from_dict(d)
    p.save(tmp_path / "p.json")
    q = load_profile(tmp_path / "p.json")
    assert q == p and q.new_seq_overhead_s == 5e-5 and q.new_seq_overhead_per_token_s == 2e-7
    assert q.idle_wake_s(0.0025) == pytest.approx(2e-4) and q.idle_wake_s(5.0) == pytest.approx(9e-4)
    for name in sorted(ROOT.glob("profiles/*.json")):  # every committed profile still loads
        assert load_profile(name).dense.ys


@pytest.mark.parametrize("key", ["step_overhead_per_seq_s", "new_seq_overhead_s", "new_seq_overhead_per_token_s"])
def test_host_terms_must_be_non_negative(key: str) -> None:
    d = _profile_dict()
    d[key] = -1e-6
    with pytest.raises(ValidationError) as e:
        DeviceProfile.from_dict(d)
    assert e.value.field == f"profile: {key}"


def test_idle_wake_table_is_validated() -> None:
    d = _profile_dict()
    d["tables"]["idle_wake_s"] = {"idle_s": [0, 0.01, 0.005], "time_s": [0, 1e-4, 2e-4]}
    with pytest.raises(ValidationError) as e:
        DeviceProfile.from_dict(d)
    assert e.value.field == "profile: tables.idle_wake_s.idle_s"


def test_shape_hash_ignores_layer_count_only() -> None:
    m = ModelConfig.from_path(ROOT / "examples/models/llama-3.1-8b")
    short = ModelConfig.from_dict({**m.raw, "num_hidden_layers": 2})
    wide = ModelConfig.from_dict({**m.raw, "intermediate_size": 14336 * 2})
    assert model_shape_hash(short) == model_shape_hash(m)
    assert model_shape_hash(wide) != model_shape_hash(m)
    assert model_shape_hash(ModelConfig.from_path(ROOT / "examples/models/mistral-7b")) != model_shape_hash(m)


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        load_profile(tmp_path / "none.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValidationError, match="not valid JSON"):
        load_profile(bad)
