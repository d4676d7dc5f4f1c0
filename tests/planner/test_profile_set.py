"""Measured profiles in plans: ``--profiles`` items, stand-ins (DEVICE=PATH), and the shape/dtype filter."""

from __future__ import annotations

from pathlib import Path

import pytest

from hetserve.core.errors import ValidationError
from hetserve.planner.costmodel import BatchShape
from hetserve.planner.profile_set import load_profile_set, usable_profiles
from hetserve.strategies.build import load_model, load_run_config

ROOT = Path(__file__).resolve().parents[2]
P100 = ROOT / "profiles/h100-100sm-llama-3.1-8b.json"
CPU = ROOT / "profiles/cpu-tiny-llama.json"
CLUSTER = ROOT / "examples/clusters/emulated-h100-mps-pair.yaml"
MODEL = ROOT / "examples/models/llama-3.1-8b"


def test_stand_in_is_relabelled_and_says_so() -> None:
    got = load_profile_set([f"H100-MPS75={P100}"])
    prof, src = got["H100-MPS75"]
    assert prof.device_name == "H100-MPS75" and src == str(P100)
    assert "H100-100SM" in prof.meta["stands_in_for"]
    # a directory loads every profile under its own device name
    names = set(load_profile_set([str(ROOT / "profiles")]))
    assert {"H100-100SM", "H100-32SM", "H100-SXM"} <= names


def test_shape_and_dtype_filter() -> None:
    loaded = load_profile_set([str(P100), str(CPU)])
    usable, skipped = usable_profiles(loaded, load_model(str(MODEL), None, "model"), "bfloat16")
    assert set(usable) == {"H100-100SM"} and len(skipped) == 1 and "different shape" in skipped[0]
    usable, skipped = usable_profiles(loaded, load_model(str(MODEL), None, "model"), "float32")
    assert not usable and all("measured in" in s or "shape" in s for s in skipped)


def test_bad_items_name_the_flag(tmp_path: Path) -> None:
    with pytest.raises(ValidationError) as e:
        load_profile_set([str(tmp_path / "missing.json")])
    assert e.value.field == "--profiles"
    with pytest.raises(ValidationError, match="one profile file"):
        load_profile_set([f"X={tmp_path}"])


def test_config_profiles_drive_the_cost_model() -> None:
    base = {"strategy": "dp", "cluster": str(CLUSTER), "model": str(MODEL), "max_model_len": 4096,
            "instances": [{"name": "hi", "devices": ["gpu0:0"]}]}
    roof = load_run_config(base).deployment.plans["hi"].stage_costs[0]
    meas = load_run_config({**base, "profiles": {"H100-MPS75": str(P100)}}).deployment.plans["hi"].stage_costs[0]
    shape = BatchShape(((2048, 0),), 0, 0)
    # the measured table, not the roofline, times the step
    assert meas.profile is not None and roof.profile is None
    assert meas.step_time_s(shape) != pytest.approx(roof.step_time_s(shape), rel=0.02)
