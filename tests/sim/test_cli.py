"""``hetserve plan`` and ``hetserve simulate``: results in the bench JSON shape; bad input names the flag or key,
exits 2, prints no traceback."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hetserve.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = str(ROOT / "examples/clusters/h100-a10.yaml")
MODEL = str(ROOT / "examples/models/llama-3.1-8b")
TRACE = str(ROOT / "tests/data/azure_conv_excerpt.csv")
PLAN = ["plan", "--cluster", CLUSTER, "--model", MODEL, "--workload", TRACE, "--slo", "ttft_ms=2000,tpot_ms=100"]


def _config(tmp_path: Path, **over: object) -> Path:
    cfg = {
        "strategy": "cronus",
        "cluster": CLUSTER,
        "model": MODEL,
        "instances": [{"role": "head", "devices": ["n0:1"]}, {"role": "main", "devices": ["n0:0"]}],
        **over,
    }
    p = tmp_path / "c.json"
    p.write_text(json.dumps(cfg))
    return p


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (
            ["plan", "--cluster", "nowhere.yaml", "--model", MODEL, "--workload", TRACE, "--slo", "ttft_ms=1"],
            "--cluster",
        ),
        (
            ["plan", "--cluster", CLUSTER, "--model", "/nonexistent", "--workload", TRACE, "--slo", "ttft_ms=1"],
            "--model",
        ),
        (
            ["plan", "--cluster", CLUSTER, "--model", MODEL, "--workload", "nope.csv", "--slo", "ttft_ms=1"],
            "--workload",
        ),
        ([*PLAN[:-1], "speed=3"], "--slo"),
        ([*PLAN, "--strategies", "dp,magic"], "--strategies"),
        ([*PLAN, "--window-s", "0"], "--window-s"),
        (["simulate", "--config", "missing.yaml", "--workload", TRACE], "--config"),
    ],
)
def test_bad_input_names_the_flag(argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err


def test_bad_config_key_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(tmp_path, instances=[{"role": "main", "devices": ["n0:7"]}])
    assert main(["simulate", "--config", str(cfg), "--workload", TRACE]) == 2
    err = capsys.readouterr().err
    assert "instances[0].devices" in err and "n0:7" in err and "Traceback" not in err


def test_simulate_writes_bench_metrics(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.json"
    rc = main(
        [
            "simulate",
            "--config",
            str(_config(tmp_path)),
            "--workload",
            TRACE,
            "--num-requests",
            "40",
            "--request-rate",
            "4",
            "--slo",
            "ttft_ms=2000,tpot_ms=100",
            "--output",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["completed"] == 40 and res["failed"] == 0
    for key in ("mean_ttft_ms", "p99_tpot_ms", "request_goodput", "output_throughput", "itls", "ttfts"):
        assert key in res
    assert res["deployment"]["strategy"] == "cronus" and res["simulated"] is True
    assert "Time to First Token" in capsys.readouterr().out


def test_plan_writes_a_config_simulate_accepts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "sub" / "winner.yaml"
    cfg.parent.mkdir()
    rc = main(
        [
            *PLAN,
            "--strategies",
            "dp,cronus",
            "--window-s",
            "4",
            "--max-requests",
            "60",
            "--per-strategy",
            "1",
            "--workers",
            "1",
            "--output",
            str(cfg),
            "--json",
            str(tmp_path / "plan.json"),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "winner" in text
    ranked = json.loads((tmp_path / "plan.json").read_text())["ranked"]
    assert ranked[0]["status"] == "simulated" and ranked[0]["goodput_rps"] > 0
    rc = main(["simulate", "--config", str(cfg), "--workload", TRACE, "--num-requests", "20", "--request-rate", "2"])
    assert rc == 0
