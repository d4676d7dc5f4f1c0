"""gpu_cluster.py on two GPUs (issue 9), without a GPU: which GPU and environment each device of a cluster file gets
(the emulated MPS pair exactly as before), the roles and strategies built on the H200 pair files, per-trace rates,
the plan estimate, and the fail-fast cut of a saturated run."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from hetserve.bench.metrics import parse_slo
from hetserve.core.cluster import load_cluster
from hetserve.core.errors import ValidationError
from hetserve.core.model_config import ModelConfig
from hetserve.strategies.build import build_deployment
from tests.benchmarks.bench_modules import load_bench

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
CLUSTERS = ROOT / "examples/clusters"
GiB = 2**30


dev = load_bench("gpu_cluster_devices")
stats = load_bench("cluster_summary_stats")
gc = load_bench("gpu_cluster")
sim = load_bench("gpu_cluster_sim")
IDS = ["GPU-aaaa", "GPU-bbbb"]


def _client_env(share: float, cap: int | None) -> dict[str, str]:
    """What MpsDaemon.client_env gives, reduced to the two settings that matter here."""
    return {"CUDA_MPS_ACTIVE_THREAD_PERCENTAGE": f"{share:g}", "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT": f"0={cap}"}


def test_the_emulated_pair_runs_exactly_as_before() -> None:
    c = load_cluster(CLUSTERS / "emulated-h100-mps-pair.yaml")
    lay = dev.gpu_layout(c)
    assert (lay.num_gpus, lay.multi, lay.mps_gpus) == (1, False, (0,))
    assert dev.roles(c) == ("gpu0:0", "gpu0:1")  # the HI, LO the script had hard-coded
    assert dev.mps_daemon_visible(lay, IDS) is None  # the daemon sees what the script sees, as before
    # before: for each partition, client_env(share, declared memory + 3 GiB), keyed by the partition's name
    before = {p.name: _client_env(p.amount, p.memory_bytes + 3 * GiB) for p in c.emulation.partitions}
    assert dev.worker_env(c, lay, [], _client_env) == before
    assert before == {"H100-MPS75": _client_env(75, 43 * GiB), "H100-MPS25": _client_env(25, 27 * GiB)}


def test_two_whole_h200s_each_see_their_own_gpu_first() -> None:
    c = load_cluster(CLUSTERS / "h200-pair.yaml")
    lay = dev.gpu_layout(c)
    assert (lay.gpu_of, lay.num_gpus, lay.uses_mps) == ({"host:0": 0, "host:1": 1}, 2, False)
    assert dev.roles(c) == ("host:0", "host:1")
    assert dev.worker_env(c, lay, IDS, None) == {
        "host:0": {"CUDA_VISIBLE_DEVICES": "GPU-aaaa,GPU-bbbb"},
        "host:1": {"CUDA_VISIBLE_DEVICES": "GPU-bbbb,GPU-aaaa"},
    }
    assert dev.mps_daemon_visible(lay, IDS) is None
    with pytest.raises(ValueError, match="needs 2 GPUs"):
        dev.worker_env(c, lay, IDS[:1], None)


def test_the_lowend_pair_puts_only_gpu1_under_mps() -> None:
    c = load_cluster(CLUSTERS / "h200-pair-lowend.yaml")
    lay = dev.gpu_layout(c)
    assert (lay.gpu_of, lay.mps_gpus) == ({"host:0": 0, "host:1": 1}, (1,))
    assert dev.roles(c) == ("host:0", "host:1")
    assert dev.mps_daemon_visible(lay, IDS) == "GPU-bbbb"
    env = dev.worker_env(c, lay, IDS, _client_env)
    assert env["host:0"] == {"CUDA_VISIBLE_DEVICES": "GPU-aaaa"}  # whole, no MPS client, the MPS GPU unseen
    assert env["host:1"] == {**_client_env(25, 27 * GiB), "CUDA_VISIBLE_DEVICES": "GPU-bbbb"}
    assert "GPU1 (H200-MPS25, emulated: mps: 25%" in dev.describe(c, lay, "NVIDIA H200")


@pytest.mark.parametrize("name", ["h200-pair", "h200-pair-lowend"])
def test_every_strategy_builds_on_the_pair(name: str) -> None:
    c = load_cluster(CLUSTERS / f"{name}.yaml")
    mc = ModelConfig.from_path(ROOT / "examples/models/llama-3.1-8b")
    table = gc.strategies(*dev.roles(c), 50.0)
    for strategy, spec in table.items():
        cfg = sim.strategy_config(spec, "bfloat16", 2048 + 256 + 16)
        if strategy == "pd-tp2" and name == "h200-pair-lowend":  # TP over a whole and a 25% GPU: refused
            with pytest.raises(ValidationError, match="one type"):
                build_deployment(c, mc, cfg)
            continue
        dep = build_deployment(c, mc, cfg)
        assert dep.plans
    tp2 = build_deployment(
        load_cluster(CLUSTERS / "h200-pair.yaml"), mc, sim.strategy_config(table["pd-tp2"], "bfloat16", 2320)
    )
    assert tp2.plans["prefill0"].cost.tp == 2 and tp2.plans["decode0"].device_ids == ("host:0",)


def test_per_trace_rates_and_the_estimate() -> None:
    assert gc.parse_traces("conv,code") == ["conv", "code"]
    for bad in ("conv,conv", "chat", ""):
        with pytest.raises(ValueError, match="--trace"):
            gc.parse_traces(bad)
    rates, trace_rates = [16.0, 32.0], gc.parse_rates_for("code=8,4")
    rates_for = gc.parse_rates_for("code:pd-lp=2;dp=64")
    assert gc.rates_of("conv", "cronus", rates, trace_rates, rates_for) == [16.0, 32.0]
    assert gc.rates_of("code", "cronus", rates, trace_rates, rates_for) == [4.0, 8.0]
    assert gc.rates_of("code", "pd-lp", rates, trace_rates, rates_for) == [2.0]
    assert gc.rates_of("code", "dp", rates, trace_rates, rates_for) == [64.0]
    # a run lasts max(num_requests, rate x span) / rate seconds of arrivals
    typ, _ = gc.estimate_s(["dp"], {"dp": [10.0, 40.0]}, 1, 40, 27.5, span_s=6.0)
    assert typ == pytest.approx(gc.FILE_OVERHEAD_S + gc.STARTUP_S + 60 / 10 + 240 / 40 + 2 * gc.RUN_OVERHEAD_S)


class _Engine:
    """Answers the first token at once for requests whose id is even, never for odd ones."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    def add_request(self, rid: str, *a: Any, **kw: Any) -> None:
        self.ids.append(rid)

    def has_unfinished_requests(self) -> bool:
        return True

    def step(self) -> list[Any]:
        out = [
            SimpleNamespace(request_id=r, outputs=[SimpleNamespace(delta_token_ids=[1])])
            for r in self.ids
            if int(r) % 2 == 0
        ]
        self.ids = [r for r in self.ids if int(r) % 2]
        return out


@pytest.mark.parametrize(("num_requests", "num_stuck", "cut"), [(20, 3, True), (20, 2, False)])
def test_fail_fast_cuts_only_a_run_that_cannot_reach_90_percent(num_requests: int, num_stuck: int, cut: bool) -> None:
    """3 of 20 without a first token past the TTFT SLO: at most 85% can be good, cut; 2 of 20: 90% still can."""
    capped = gc._Capped(_Engine(), None, num_requests, fail_ttft_s=0.01)
    odd = [str(2 * i + 1) for i in range(num_stuck)]
    even = [str(2 * i) for i in range(num_requests - num_stuck)]
    for rid in even + odd:
        capped.add_request(rid)
        capped.step()
    assert capped.has_unfinished_requests()  # replay asks right after adding: not judged yet
    time.sleep(0.03)
    assert capped.has_unfinished_requests() is not cut
    assert capped.cut is cut and capped.cut_reason == ("fail-fast" if cut else None)
    assert parse_slo("ttft_ms=2000,tpot_ms=100").ttft_ms == 2000  # what --fail-fast reads


def test_h200_result_files_stay_out_of_issue_8s_pair() -> None:
    assert stats.file_meta({"trace": "code", "cluster_name": "h200-pair-lowend"}, "x.json") == (
        "code",
        "h200-pair-lowend",
    )
    assert stats.file_meta({"trace": "conv", "cluster_name": "emulated-h100-mps-pair"}, "x.json") == ("conv", "pair")
    starved = {"cluster_name": "emulated-h100-mps-pair-starved", "memory_starved": True}
    assert stats.file_meta(starved, "x.json") == ("conv", "starved")
