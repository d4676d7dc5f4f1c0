"""The planner picks the obvious answer in constructed cases, and its winner is a config the builder reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hetserve.bench.metrics import Slo
from hetserve.core.cluster import load_cluster
from hetserve.core.model_config import ModelConfig
from hetserve.planner.report import format_table, plan_to_dict, winner_config, write_config
from hetserve.planner.search import PlanResult, SearchSettings, plan
from hetserve.sim.workload import load_workload
from hetserve.strategies.build import load_run_config

ROOT = Path(__file__).resolve().parents[2]
MODEL = ModelConfig.from_path(ROOT / "examples/models/llama-3.1-8b")
FAST = SearchSettings(window_s=6.0, min_requests=40, max_requests=120, rel_tol=0.2, max_sims=6)
SLO = Slo(ttft_ms=2000, tpot_ms=100)


def _plan(cluster: dict[str, Any], workload: str = "fixed:input=1024,output=48,n=200", **kw: Any) -> PlanResult:
    return plan(load_cluster(cluster), MODEL, load_workload(workload), SLO, settings=FAST, num_workers=1, **kw)


def _instances(r: Any) -> list[dict[str, Any]]:
    return r.candidate.config.get("instances", [])


def test_a_device_too_small_for_the_weights_is_never_a_replica() -> None:
    tiny = {"type": "custom", "name": "tiny", "memory_gb": 8, "tflops_bf16": 200, "hbm_gbps": 900}
    res = _plan({"nodes": [{"name": "n", "devices": [{"type": "A10"}, {"type": "A10"}, tiny]}]})
    pruned = [r for r in res.ranked if r.status == "pruned"]
    assert any("n:2" in r.candidate.name and "weights do not fit on tiny" in r.reason for r in pruned)
    for r in res.ranked:
        for inst in _instances(r):
            # the 8 GiB device may only be an attention worker or one stage of a pipeline
            if inst["devices"] == ["n:2"]:
                pytest.fail(f"{r.candidate.name} serves the model from the 8 GiB device alone")
    w = res.winner
    assert w.goodput_rps > 0
    assert all("n:2" not in i["devices"] or len(i["devices"]) > 1 for i in _instances(w))


def _two_nodes(link: dict[str, Any] | str) -> dict[str, Any]:
    return {
        "nodes": [{"name": "a", "devices": [{"type": "H100-SXM"}]}, {"name": "b", "devices": [{"type": "A100-80GB"}]}],
        "inter_node_link": link,
    }


def test_pd_is_not_chosen_across_a_very_slow_link() -> None:
    slow = {"name": "dialup", "kind": "ethernet", "bandwidth_gb_per_s": 0.02, "latency_us": 500}
    res = _plan(_two_nodes(slow), strategies=("dp", "pd"))
    assert res.winner.candidate.strategy != "pd"
    pd = [r for r in res.ranked if r.candidate.strategy == "pd"]
    assert pd and all(r.status == "pruned" or r.goodput_rps < res.winner.goodput_rps for r in pd)
    assert any("KV transfer over dialup" in r.reason or "TTFT" in r.reason for r in pd)


def test_pd_is_a_real_contender_over_a_fast_link() -> None:
    """The control for the test above: with NVLink the same PD layouts are simulated and serve requests."""
    res = _plan(_two_nodes("nvlink4"), strategies=("dp", "pd"))
    pd = [r for r in res.ranked if r.candidate.strategy == "pd" and r.status == "simulated"]
    assert pd and max(r.goodput_rps or r.goodput_below or 0 for r in pd) > 0


def test_winner_config_round_trips_and_the_table_explains_losers(tmp_path: Path) -> None:
    cluster = ROOT / "examples/clusters/h100-a10.yaml"
    res = plan(
        load_cluster(cluster),
        MODEL,
        load_workload(str(ROOT / "tests/data/azure_conv_excerpt.csv")),
        SLO,
        settings=FAST,
        num_workers=2,
        max_simulated_per_strategy=1,
    )
    cfg = winner_config(res, str(cluster), str(ROOT / "examples/models/llama-3.1-8b"))
    path = write_config(cfg, tmp_path / "winner.yaml")
    rc = load_run_config(path)
    assert rc.deployment.strategy == res.winner.candidate.strategy
    assert cfg["predicted"]["goodput_rps"] > 0
    table = format_table(res)
    assert "winner" in table
    losers = [r for r in res.ranked[1:]]
    assert losers and all(r.reason for r in losers)
    assert {r.candidate.strategy for r in res.ranked if r.status == "simulated"} >= {"dp", "pd", "cronus"}
    d = plan_to_dict(res)
    assert d["ranked"][0]["name"] == res.winner.candidate.name
