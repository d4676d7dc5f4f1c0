"""The simulator's event loop: arrivals are merged into the event heap lazily, by time, and the workload's list
order only breaks ties between arrivals at one instant, so a workload listed out of time order (with ties) must
simulate exactly as the same requests listed in time order; the cyclic garbage collector, off while events run,
is left as the run found it."""

from __future__ import annotations

import gc
import random
from pathlib import Path

import pytest

from hetserve.core.cluster import load_cluster
from hetserve.core.model_config import ModelConfig
from hetserve.sim.simulator import Simulator
from hetserve.sim.workload import SimRequest
from hetserve.strategies.build import build_deployment

ROOT = Path(__file__).resolve().parents[2]
MODEL = ModelConfig.from_path(ROOT / "examples/models/llama-3.1-8b")
CLUSTER = load_cluster(ROOT / "examples/clusters/h100-a10.yaml")
CONFIGS = {
    "dp": {"strategy": "dp", "instances": [{"devices": ["n0:0"]}, {"devices": ["n0:1"]}]},
    "pd": {
        "strategy": "pd",
        "instances": [{"role": "prefill", "devices": ["n0:1"]}, {"role": "decode", "devices": ["n0:0"]}],
    },
}


def _outcomes(name: str, wl: list[SimRequest]) -> tuple[list[tuple], int]:
    res = Simulator(build_deployment(CLUSTER, MODEL, CONFIGS[name])).run(wl)
    rows = sorted(
        (wl[r.index].arrival_s, r.prompt_len, r.expected_output_len, r.ttft_s, tuple(r.itl_s)) for r in res.records
    )
    return rows, res.num_events


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_list_order_does_not_matter(name: str) -> None:
    rng = random.Random(3)
    wl, t = [], 0.0
    for _ in range(120):
        spec = SimRequest(t, rng.randint(20, 1500), rng.randint(1, 40))
        wl.append(spec)
        if rng.random() < 0.3:
            wl.append(SimRequest(t, spec.prompt_len, spec.output_len))  # a twin at the same instant
        t += rng.expovariate(8.0)
    shuffled = wl[:]
    rng.shuffle(shuffled)
    assert _outcomes(name, shuffled) == _outcomes(name, wl)


@pytest.mark.parametrize("enabled", [True, False])
def test_run_leaves_the_garbage_collector_as_it_found_it(enabled: bool) -> None:
    wl = [SimRequest(0.1 * i, 200, 8) for i in range(20)]
    was = gc.isenabled()
    try:
        gc.enable() if enabled else gc.disable()
        Simulator(build_deployment(CLUSTER, MODEL, CONFIGS["dp"])).run(wl)
        assert gc.isenabled() is enabled
    finally:
        gc.enable() if was else gc.disable()
