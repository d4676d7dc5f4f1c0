"""The two-H200 cluster files of issue 9 (``examples/clusters/h200-pair*.yaml``) load as the issue describes them,
and ``hetserve plan`` / ``hetserve simulate`` take them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hetserve.cli.main import main
from hetserve.core.cluster import load_cluster, parse_cluster
from hetserve.core.devices import CATALOG, LINKS, GiB
from hetserve.core.model_config import ModelConfig
from hetserve.sim.contention import shared_gpu_contention
from hetserve.strategies.build import build_deployment

ROOT = Path(__file__).resolve().parents[2]
PAIR = ROOT / "examples/clusters/h200-pair.yaml"
LOWEND = ROOT / "examples/clusters/h200-pair-lowend.yaml"
MODEL = str(ROOT / "examples/models/llama-3.1-8b")
TRACE = str(ROOT / "tests/data/azure_conv_excerpt.csv")


def test_the_pair_is_two_whole_h200s_on_nvlink() -> None:
    c = load_cluster(PAIR)
    assert c.device_ids == ["host:0", "host:1"] and c.emulation is None
    for d in c.devices:
        assert d.spec == CATALOG["H200"] and d.emulation is None and d.memory_bytes == 141 * GiB
    assert c.link_between("host:0", "host:1") == LINKS["nvlink4"]
    assert parse_cluster(c.to_dict()) == c


def test_the_lowend_pair_emulates_gpu1_only_and_shares_no_hbm() -> None:
    c = load_cluster(LOWEND)
    gpu0, gpu1 = c.devices
    assert gpu0.spec == CATALOG["H200"] and gpu0.emulation is None and gpu0.memory_bytes == 141 * GiB
    assert gpu1.spec.name == "H200-MPS25" and gpu1.emulation == "mps: 25% of H200's threads"
    assert gpu1.memory_bytes == 24 * GiB
    # a quarter of the H200's compute (bandwidth follows the partition curve, well above a quarter)
    assert gpu1.spec.flops("bfloat16") == pytest.approx(0.25 * CATALOG["H200"].flops("bfloat16"))
    assert 0.25 * CATALOG["H200"].hbm_bytes_per_s < gpu1.spec.hbm_bytes_per_s < CATALOG["H200"].hbm_bytes_per_s
    (part,) = c.emulation.partitions  # type: ignore[union-attr]
    assert (part.amount, part.shared_slowdown_memory, part.shared_slowdown_compute) == (25, 1.0, 1.0)
    assert c.link_between("host:1", "host:0") == LINKS["nvlink4"]
    assert parse_cluster(c.to_dict()) == c
    # two real GPUs: the simulator slows neither while the other runs
    dep = build_deployment(
        c,
        ModelConfig.from_path(MODEL),
        {"strategy": "dp", "instances": [{"name": "hi", "devices": ["host:0"]}, {"name": "lo", "devices": ["host:1"]}]},
    )
    assert shared_gpu_contention(c, dep) == {}


@pytest.mark.parametrize("cluster", [PAIR, LOWEND], ids=["pair", "lowend"])
def test_simulate_and_plan_take_the_files(cluster: Path, tmp_path: Path) -> None:
    cfg = tmp_path / "pd.json"
    cfg.write_text(
        json.dumps(
            {
                "strategy": "pd",
                "cluster": str(cluster),
                "model": MODEL,
                "instances": [{"role": "prefill", "devices": ["host:1"]}, {"role": "decode", "devices": ["host:0"]}],
            }
        )
    )
    out = tmp_path / "m.json"
    assert (
        main(
            [
                "simulate",
                "--config",
                str(cfg),
                "--workload",
                TRACE,
                "--num-requests",
                "30",
                "--request-rate",
                "8",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads(out.read_text())
    assert res["completed"] == 30 and res["failed"] == 0
    plan_json = tmp_path / "plan.json"
    assert (
        main(
            [
                "plan",
                "--cluster",
                str(cluster),
                "--model",
                MODEL,
                "--workload",
                TRACE,
                "--slo",
                "ttft_ms=2000,tpot_ms=100",
                "--strategies",
                "dp,cronus",
                "--window-s",
                "4",
                "--max-requests",
                "40",
                "--per-strategy",
                "1",
                "--workers",
                "1",
                "--output",
                str(tmp_path / "w.yaml"),
                "--json",
                str(plan_json),
            ]
        )
        == 0
    )
    ranked = json.loads(plan_json.read_text())["ranked"]
    assert ranked[0]["status"] == "simulated" and ranked[0]["goodput_rps"] > 0
