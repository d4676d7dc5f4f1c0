"""Instances sharing a device (``memory_fraction``): PD's prefill at TP 2 over both GPUs of a pair with its decode
instance on GPU0. Each is planned as if its device had only its share of the memory, the shares may not exceed
the device, and the simulator slows each while the other runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hetserve.core.cluster import load_cluster
from hetserve.core.errors import ValidationError
from hetserve.core.model_config import ModelConfig
from hetserve.sim.contention import Contention, shared_gpu_contention
from hetserve.sim.simulator import Simulator
from hetserve.sim.workload import SimRequest
from hetserve.strategies.build import build_deployment

ROOT = Path(__file__).resolve().parents[2]
MODEL = ModelConfig.from_path(ROOT / "examples/models/llama-3.1-8b")
PAIR = load_cluster(ROOT / "examples/clusters/h200-pair.yaml")
LOWEND = load_cluster(ROOT / "examples/clusters/h200-pair-lowend.yaml")


def _pd_tp2(prefill: float = 0.3, decode: float = 0.65, **decode_extra: Any) -> dict[str, Any]:
    return {
        "strategy": "pd",
        "max_model_len": 4096,
        "instances": [
            {"name": "prefill0", "role": "prefill", "devices": ["host:0", "host:1"], "memory_fraction": prefill},
            {"name": "decode0", "role": "decode", "devices": ["host:0"], "memory_fraction": decode, **decode_extra},
        ],
    }


def _capped_pair(cap_gib: float) -> Any:
    """The pair with both GPUs capped to ``cap_gib``: the reference a share of the memory must plan like."""
    d = PAIR.to_dict()
    d["nodes"][0]["devices"] = [{"type": "H200", "count": 2, "memory_cap_bytes": int(cap_gib * 2**30)}]
    return load_cluster(d)


def test_a_device_is_whole_unless_every_instance_on_it_declares_a_share() -> None:
    cfg = _pd_tp2()
    for inst in cfg["instances"]:
        del inst["memory_fraction"]
    with pytest.raises(ValidationError, match=r"instances\[1\]\.devices.*host:0 is already used by prefill0"):
        build_deployment(PAIR, MODEL, cfg)
    cfg = _pd_tp2()
    del cfg["instances"][1]["memory_fraction"]
    with pytest.raises(ValidationError, match=r"instances\[1\]\.devices.*each give memory_fraction"):
        build_deployment(PAIR, MODEL, cfg)
    cfg = _pd_tp2()
    del cfg["instances"][0]["memory_fraction"]
    with pytest.raises(ValidationError, match=r"instances\[1\]\.devices.*holds it whole"):
        build_deployment(PAIR, MODEL, cfg)
    with pytest.raises(ValidationError, match=r"instances\[1\]\.memory_fraction.*1\.05 > 1"):
        build_deployment(PAIR, MODEL, _pd_tp2(0.4, 0.65))
    for bad in (0, 1.5, "half", True):
        with pytest.raises(ValidationError, match=r"instances\[0\]\.memory_fraction"):
            build_deployment(PAIR, MODEL, _pd_tp2(bad))  # type: ignore[arg-type]
    with pytest.raises(ValidationError, match=r"instances\[1\]\.shared_slowdown\.memory"):
        build_deployment(PAIR, MODEL, _pd_tp2(shared_slowdown={"memory": 0.5}))
    cfg = _pd_tp2()
    del cfg["instances"][1]["memory_fraction"]
    cfg["instances"][1]["devices"] = ["host:1"]
    cfg["instances"][0]["devices"] = ["host:0"]
    cfg["instances"][1]["shared_slowdown"] = {"memory": 3}
    with pytest.raises(ValidationError, match=r"instances\[1\]\.shared_slowdown.*only .*memory_fraction"):
        build_deployment(PAIR, MODEL, cfg)


def test_a_share_plans_like_a_device_capped_to_it() -> None:
    dep = build_deployment(PAIR, MODEL, _pd_tp2(0.3, 0.65))
    for name, frac, devices, tp in (("prefill0", 0.3, ["host:0", "host:1"], 2), ("decode0", 0.65, ["host:0"], 1)):
        ref = build_deployment(
            _capped_pair(141 * frac),
            MODEL,
            {"strategy": "dp", "max_model_len": 4096, "instances": [{"name": "x", "devices": devices}]},
        )
        # the capped device rounds its cap to whole bytes once; the share multiplies the device's memory
        assert abs(dep.plans[name].num_kv_blocks - ref.plans["x"].num_kv_blocks) <= 1
        assert dep.plans[name].cost.tp == tp
        assert dep.plans[name].notes["shared_devices"] == ["host:0"]


def test_a_tp_group_across_the_lowend_pair_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"instances\[0\]\.devices.*one type.*H200, H200-MPS25"):
        build_deployment(LOWEND, MODEL, _pd_tp2())


def test_instances_on_a_shared_device_contend_and_run_slower() -> None:
    dep = build_deployment(PAIR, MODEL, _pd_tp2(shared_slowdown={"memory": 3.0, "compute": 1.5}))
    got = shared_gpu_contention(PAIR, dep)
    assert got == {"prefill0": Contention("device host:0", 2.0, 2.0), "decode0": Contention("device host:0", 3.0, 1.5)}
    # separate devices (or one instance per device): nothing shared, nothing slowed
    alone = build_deployment(
        PAIR,
        MODEL,
        {
            "strategy": "pd",
            "max_model_len": 4096,
            "instances": [
                {"name": "p", "role": "prefill", "devices": ["host:1"], "memory_fraction": 0.5},
                {"name": "d", "role": "decode", "devices": ["host:0"]},
            ],
        },
    )
    assert shared_gpu_contention(PAIR, alone) == {}
    # the same requests take longer when the instances slow each other than when they do not
    reqs = [SimRequest(0.05 * i, 1500, 64) for i in range(40)]
    slow = Simulator(dep, contention=got).run(reqs).metrics(None)
    fast = Simulator(build_deployment(PAIR, MODEL, _pd_tp2()), contention={}).run(reqs).metrics(None)
    assert slow["completed"] == fast["completed"] == 40
    assert slow["mean_tpot_ms"] > fast["mean_tpot_ms"] and slow["duration"] > fast["duration"]
