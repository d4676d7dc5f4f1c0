"""benchmarks/gpu_link.py: the CPU smoke mode (the tcp path between two processes on CPU tensors) writes a result
file of the documented shape whose every measured bandwidth is positive and finite; how each process is told
which GPU is its own."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from tests.benchmarks.bench_modules import load_bench

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def test_cpu_smoke_writes_positive_finite_bandwidths(tmp_path: Path) -> None:
    out = tmp_path / "link.json"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    r = subprocess.run(
        [
            sys.executable,
            str(BENCH / "gpu_link.py"),
            "--device",
            "cpu",
            "--sizes-mib",
            "1,4",
            "--repeats",
            "5",
            "--tcp-batch-mib",
            "8",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(out.read_text())
    for key in ("command", "git_commit", "device", "direction", "emulation", "config", "methods", "table", "wall_s"):
        assert key in d
    assert "gpu_link.py" in d["command"] and "--device cpu" in d["command"]
    assert d["emulation"] is None and d["num_gpus"] == 0 and "CPU" in d["direction"]
    assert d["env"]["NCCL_NVLS_ENABLE"] == "0" and d["env"]["NVSHMEM_DISABLE_NVLS"] == "1"
    assert d["config"]["sizes_bytes"] == [2**20, 4 * 2**20] and d["complete"] is True
    tcp = d["methods"]["tcp"]
    assert "error" not in tcp and tcp["bytes_checked"] is True
    assert [row["size_bytes"] for row in tcp["rows"]] == d["config"]["sizes_bytes"]
    for row in tcp["rows"]:
        assert len(row["rounds_gb_per_s"]) == 5
        for v in (*row["rounds_gb_per_s"], row["median_gb_per_s"], row["median_s_per_transfer"]):
            assert v > 0 and math.isfinite(v)
        assert row["transfers_per_round"] * row["size_bytes"] >= 8 * 2**20
    for m in ("peer", "ipc", "shm", "nccl", "ipc_isolated", "ipc_mps", "shm_mps"):
        assert d["methods"][m]["skipped"] and "rows" not in d["methods"][m]
    # the table is what the script prints last
    assert r.stdout.rstrip().endswith(d["table"].rstrip()) and "tcp" in d["table"].splitlines()[0]


def test_each_process_lists_its_own_gpu_first_or_alone() -> None:
    gl = load_bench("gpu_link")
    ids = ["GPU-aaa", "GPU-bbb"]
    assert gl.visible_devices(ids, 0, "own-first") == "GPU-aaa,GPU-bbb"
    assert gl.visible_devices(ids, 1, "own-first") == "GPU-bbb,GPU-aaa"
    assert gl.visible_devices(ids, 1, "isolated") == gl.visible_devices(ids, 1, "mps") == "GPU-bbb"
    assert gl.slug("NVIDIA H200") == "h200" and gl.slug("NVIDIA H100 80GB HBM3") == "h100"
    # torch 2.11's props.uuid is a _CUuuid with the 16 bytes (its str() is an object repr, no UUID)
    raw = bytes.fromhex("e54bb181edbb771d9a69a119a009d662")
    assert gl.uuid_text(SimpleNamespace(bytes=raw)) == "GPU-e54bb181-edbb-771d-9a69-a119a009d662"
    assert gl.uuid_text("E54BB181-EDBB-771D-9A69-A119A009D662") == "GPU-e54bb181-edbb-771d-9a69-a119a009d662"
    assert gl.uuid_text(object()) is None and gl.uuid_text(None) is None
