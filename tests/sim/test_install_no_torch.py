"""``pip install .`` with core dependencies only (no torch), then ``hetserve plan`` and ``hetserve simulate`` on
the 16-device example cluster: the planner and the simulator must work where no GPU stack is installed."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _sh(cmd: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, cwd=cwd, check=False, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.mark.slow
def test_plan_and_simulate_in_a_venv_without_torch(tmp_path: Path) -> None:
    t0 = time.monotonic()
    # build from a copy so the source tree gets no build/ or egg-info from this test
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "hetserve", src / "hetserve", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    venv = tmp_path / "venv"
    _sh([sys.executable, "-m", "venv", str(venv)], tmp_path, 120)
    py, pip, cli = venv / "bin/python", venv / "bin/pip", venv / "bin/hetserve"
    r = subprocess.run(
        [str(pip), "install", "-q", "--disable-pip-version-check", str(src)],
        check=False,
        capture_output=True,
        text=True,
        timeout=240,
    )
    if r.returncode != 0:  # no index for an isolated build: use the venv's own setuptools
        _sh([str(pip), "install", "-q", "--no-build-isolation", str(src)], tmp_path, 240)
    probe = subprocess.run([str(py), "-c", "import torch"], check=False, capture_output=True, text=True)
    assert probe.returncode != 0, "torch is importable in the core-only venv"
    installed = _sh([str(pip), "list", "--format=json"], tmp_path, 60).stdout
    assert {p["name"].lower() for p in json.loads(installed)} <= {"hetserve", "pyyaml", "pip", "setuptools", "wheel"}

    plan_out = tmp_path / "winner.yaml"
    r = _sh(
        [
            str(cli),
            "plan",
            "--cluster",
            str(ROOT / "examples/clusters/mixed-16.yaml"),
            "--model",
            str(ROOT / "examples/models/llama-3.1-8b"),
            "--workload",
            str(ROOT / "tests/data/azure_conv_excerpt.csv"),
            "--slo",
            "ttft_ms=2000,tpot_ms=100",
            "--window-s",
            "4",
            "--max-requests",
            "150",
            "--per-strategy",
            "1",
            "--output",
            str(plan_out),
        ],
        tmp_path,
        120,
    )
    assert "winner" in r.stdout and plan_out.exists()
    metrics = tmp_path / "m.json"
    _sh(
        [
            str(cli),
            "simulate",
            "--config",
            str(plan_out),
            "--workload",
            str(ROOT / "tests/data/azure_conv_excerpt.csv"),
            "--num-requests",
            "100",
            "--output",
            str(metrics),
        ],
        tmp_path,
        120,
    )
    res = json.loads(metrics.read_text())
    assert res["completed"] == 100 and res["mean_ttft_ms"] > 0
    assert time.monotonic() - t0 < 180
