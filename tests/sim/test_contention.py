"""Partitions of one GPU slow each other (shared HBM / L2): the cluster file's ``shared_slowdown`` and the
simulator's use of it, checked against a hand-computed timeline."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from hetserve.core.cluster import load_cluster, parse_cluster
from hetserve.core.errors import ValidationError
from hetserve.core.model_config import ModelConfig
from hetserve.core.request import KVTransferParams, Request
from hetserve.sim.contention import Contention, shared_gpu_contention
from hetserve.sim.simulator import Simulator
from hetserve.sim.workload import SimRequest
from hetserve.strategies.base import Deployment, InstancePlan, InstanceView
from hetserve.strategies.build import build_deployment

from .test_simulator import ConstantCost

ROOT = Path(__file__).resolve().parents[2]
PAIR = ROOT / "examples/clusters/emulated-h100-mps-pair.yaml"


def _pair_dict() -> dict[str, Any]:
    return load_cluster(PAIR).to_dict()


def test_shared_slowdown_parses_round_trips_and_names_bad_keys() -> None:
    c = load_cluster(PAIR)
    p75, p25 = c.emulation.partitions  # type: ignore[union-attr]
    assert (p75.shared_slowdown_memory, p75.shared_slowdown_compute) == (1.49, 1.19)
    assert (p25.shared_slowdown_memory, p25.shared_slowdown_compute) == (1.77, 1.17)
    again = parse_cluster(c.to_dict())
    assert again.emulation == c.emulation
    d = _pair_dict()
    d["emulation"]["partitions"][1]["shared_slowdown"] = {"memory": 0.5}
    with pytest.raises(ValidationError, match=r"emulation\.partitions\[1\]\.shared_slowdown\.memory"):
        parse_cluster(d)
    d["emulation"]["partitions"][1]["shared_slowdown"] = {"bandwidth": 2}
    with pytest.raises(ValidationError, match=r"shared_slowdown\.bandwidth"):
        parse_cluster(d)
    d["emulation"]["partitions"][1].pop("shared_slowdown")
    del d["emulation"]["partitions"][0]["shared_slowdown"]
    plain = parse_cluster(d)
    assert all((p.shared_slowdown_memory, p.shared_slowdown_compute) == (1.0, 1.0)
               for p in plain.emulation.partitions)  # type: ignore[union-attr]


def test_instances_on_one_gpu_are_grouped_with_their_partitions_factors() -> None:
    model = ModelConfig.from_path(ROOT / "examples/models/llama-3.1-8b")
    cluster = load_cluster(PAIR)
    dep = build_deployment(cluster, model, {"strategy": "dp", "instances": [
        {"name": "hi", "devices": ["gpu0:0"]}, {"name": "lo", "devices": ["gpu0:1"]}]})
    got = shared_gpu_contention(cluster, dep)
    assert got == {"hi": Contention("gpu0/H100-SXM", 1.49, 1.19), "lo": Contention("gpu0/H100-SXM", 1.77, 1.17)}
    # no factors declared, or real devices: nothing to model
    d = _pair_dict()
    for p in d["emulation"]["partitions"]:
        p.pop("shared_slowdown")
    assert shared_gpu_contention(parse_cluster(d), dep) == {}
    h100_a10 = load_cluster(ROOT / "examples/clusters/h100-a10.yaml")
    dep2 = build_deployment(h100_a10, model, {"strategy": "dp", "instances": [{"devices": ["n0:0"]}]})
    assert shared_gpu_contention(h100_a10, dep2) == {}


class ByIndex(Deployment):
    """Request ``r<i>`` goes to instance ``a`` when i is even, ``b`` when odd."""

    strategy = "by-index"

    def route(self, req: Request, views: dict[str, InstanceView], now_s: float) -> tuple[str, KVTransferParams | None]:
        return ("a" if int(req.request_id.removeprefix("r")) % 2 == 0 else "b"), None


def _sim(contention: dict[str, Contention] | None, step_a: float, step_b: float) -> Simulator:
    plans = [InstancePlan(n, (f"d{i}",), "mixed", (ConstantCost(st),), num_kv_blocks=64,  # type: ignore[arg-type]
                          max_num_seqs=4) for i, (n, st) in enumerate((("a", step_a), ("b", step_b)))]
    return Simulator(ByIndex(plans, lambda a, b: None), contention=contention)  # type: ignore[arg-type]


def _e2e(res: Any) -> list[float]:
    return [r.e2el_s for r in res.records]


def test_a_step_is_slowed_only_while_the_other_partition_is_busy() -> None:
    sa, sb = 0.010, 0.013  # unequal, so no two steps end at the same instant
    c = {"a": Contention("g", 2.0, 3.0), "b": Contention("g", 2.0, 3.0)}
    # far apart: never both busy, so the declared slowdown never applies
    apart = [SimRequest(0.0, 40, 3), SimRequest(1.0, 40, 3)]
    assert _e2e(_sim(c, sa, sb).run(copy.deepcopy(apart))) == pytest.approx(_e2e(_sim(None, sa, sb).run(apart)))
    # both at t=0, three tokens each. By hand:
    #   a: prefill [0, .010) alone (b not started yet); decode [.010, .030) x2 (b busy); decode [.030, .050) x2
    #   b: prefill [0, .039) x3 (a busy; 40 tokens for 1 sequence: compute-bound); decode [.039, .065) x2 (a busy
    #      until .050); decode [.065, .078) alone
    res = _sim(c, sa, sb).run([SimRequest(0.0, 40, 3), SimRequest(0.0, 40, 3)])
    a, b = res.records
    assert (a.ttft_s, a.e2el_s) == (pytest.approx(0.010), pytest.approx(0.050))
    assert (b.ttft_s, b.e2el_s) == (pytest.approx(0.039), pytest.approx(0.078))
    # and without the model, each runs as if alone
    plain = _sim(None, sa, sb).run([SimRequest(0.0, 40, 3), SimRequest(0.0, 40, 3)])
    assert _e2e(plain) == pytest.approx([3 * sa, 3 * sb])
