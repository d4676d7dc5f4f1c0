from __future__ import annotations

import os
import stat
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from hetserve.core.cluster import load_cluster
from hetserve.core.devices import CATALOG
from hetserve.core.errors import ValidationError
from hetserve.device import (
    EmulationError,
    MpsDaemon,
    Partition,
    catalog_name_for,
    create_green_contexts,
    kv_blocks_for_memory_cap,
    parse_partition,
    physical_device_info,
)

ROOT = Path(__file__).resolve().parents[2]
GiB = 2**30
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_parse_partition() -> None:
    assert parse_partition(None) == Partition("whole")
    assert parse_partition("whole").kind == "whole"
    p = parse_partition("sm:32")
    assert (p.kind, p.amount, p.memory_cap_bytes, p.label) == ("green_context", 32, None, "sm32")
    q = parse_partition("mps:25, mem:24")
    assert (q.kind, q.amount, q.memory_cap_bytes, q.label) == ("mps", 25, 24 * GiB, "mps25")
    assert parse_partition("mem:8") == Partition("whole", None, 8 * GiB)
    for bad in ("sm:0", "sm:2.5", "mps:0", "mps:150", "sm:32,mps:25", "gpu:3", "sm32", "sm:32,mem:x"):
        with pytest.raises(ValidationError):
            parse_partition(bad)


def test_names_match_what_the_cluster_file_declares() -> None:
    """The profile of a partition must carry the name and emulation wording the cluster parser gives the same
    partition, or the cost model will not match them (an independent reference: hetserve.core.cluster)."""
    cluster = load_cluster(ROOT / "examples" / "clusters" / "emulated-h100-pair.yaml")
    by_name = {d.spec.name: d for d in cluster.devices}
    for sms in (32, 100):
        p = Partition("green_context", sms)
        dev = by_name[p.device_name("H100-SXM")]
        assert dev.emulation == p.emulation_string("H100-SXM", CATALOG["H100-SXM"].num_sms)
        d = p.describe("H100-SXM", 132)
        assert d["emulated"] is True and d["method"] == "green_context" and d["num_sms"] == sms
    whole = Partition().describe("H100-SXM", 132)
    assert whole["emulated"] is False and whole["emulation"] is None


def test_mps_description_names_the_method() -> None:
    d = parse_partition("mps:25,mem:20").describe("H200")
    assert d["emulated"] and d["method"] == "mps" and d["thread_percentage"] == 25
    assert d["emulation"] == "mps: 25% of H200's threads"
    assert "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT" in d["memory_cap_enforced_by"]


def test_catalog_names() -> None:
    for torch_name, expected in (
        ("NVIDIA H100 80GB HBM3", "H100-SXM"),
        ("NVIDIA H100 PCIe", "H100-PCIe"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA A100-SXM4-80GB", "A100-80GB"),
        ("NVIDIA L40S", "L40S"),
    ):
        got = catalog_name_for(torch_name)
        assert got == expected and got in CATALOG
    assert catalog_name_for("Some Future GPU") == "Some-Future-GPU"


def test_kv_blocks_for_memory_cap_brute_force() -> None:
    for cap_gib, weights, per_block, reserve in ((24, 16 * 10**9, 2 * 2**20, 2 * GiB), (8, 10**9, 12345, 10**8)):
        cap = cap_gib * GiB
        n = kv_blocks_for_memory_cap(cap, weights, per_block, reserve)
        assert weights + reserve + n * per_block <= cap < weights + reserve + (n + 1) * per_block
    with pytest.raises(EmulationError, match="no KV room"):
        kv_blocks_for_memory_cap(16 * GiB, 15 * GiB, 2**20)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_clear_errors_without_cuda() -> None:
    with pytest.raises(EmulationError, match="CUDA GPU"):
        create_green_contexts([Partition("green_context", 32)])
    with pytest.raises(EmulationError, match="CUDA GPU"):
        physical_device_info()


def test_green_contexts_refuse_other_kinds() -> None:
    with pytest.raises(ValidationError):
        create_green_contexts([Partition("mps", 25)])
    assert create_green_contexts([]) == []


def _fake_mps_control(tmp_path: Path) -> Path:
    """A stand-in for nvidia-cuda-mps-control: '-d' writes the pid file the real one writes, 'quit' on stdin
    removes it; every call is appended to calls.log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "nvidia-cuda-mps-control"
    script.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import os, sys
        pipe = os.environ["CUDA_MPS_PIPE_DIRECTORY"]
        log = os.path.join({str(tmp_path)!r}, "calls.log")
        if sys.argv[1:] == ["-d"]:
            open(os.path.join(pipe, "nvidia-cuda-mps-control.pid"), "w").write("1")
            open(log, "a").write("start " + pipe + " cvd=" + os.environ.get("CUDA_VISIBLE_DEVICES", "-") + "\\n")
        else:
            cmd = sys.stdin.read().strip()
            open(log, "a").write(cmd + "\\n")
            if cmd == "quit":
                os.remove(os.path.join(pipe, "nvidia-cuda-mps-control.pid"))
        """))
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def test_mps_daemon_lifecycle_with_a_fake_control(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = _fake_mps_control(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    root = tmp_path / "mps"
    with pytest.raises(RuntimeError, match="boom"), MpsDaemon(root) as mps:
        pid_file = mps.pipe_dir / "nvidia-cuda-mps-control.pid"
        assert pid_file.exists()
        env = mps.client_env(thread_percentage=25, memory_limit_bytes=3 * GiB)
        assert env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] == "25"
        assert env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] == "0=3072M"
        assert env["CUDA_MPS_PIPE_DIRECTORY"] == str(mps.pipe_dir)
        child = mps.launch(
            [sys.executable, "-c", "import os; print(os.environ['CUDA_MPS_ACTIVE_THREAD_PERCENTAGE'])"],
            thread_percentage=40, stdout=__import__("subprocess").PIPE, text=True,
        )
        out, _ = child.communicate(timeout=30)
        assert out.strip() == "40"
        raise RuntimeError("boom")  # the daemon must still be told to quit
    calls = (tmp_path / "calls.log").read_text().split("\n")
    assert calls[0].startswith("start ") and "quit" in calls
    assert not (root / "pipe" / "nvidia-cuda-mps-control.pid").exists()


def test_mps_daemon_sees_only_the_gpus_it_is_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = _fake_mps_control(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with MpsDaemon(tmp_path / "mps", visible_devices="GPU-1234") as mps:
        assert "CUDA_VISIBLE_DEVICES" not in mps.client_env(thread_percentage=25)  # clients choose their own
    with MpsDaemon(tmp_path / "mps2"):
        pass
    starts = [c for c in (tmp_path / "calls.log").read_text().split("\n") if c.startswith("start ")]
    assert starts[0].endswith(" cvd=GPU-1234") and starts[1].endswith(" cvd=-")


def test_mps_daemon_missing_binary(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EmulationError, match="not found"), MpsDaemon(tmp_path / "m"):
        pass


@pytest.mark.gpu
@needs_cuda
def test_disjoint_green_contexts_on_a_gpu() -> None:
    total = physical_device_info()["num_sms"]
    small = 32 if total >= 64 else max(8, total // 4)
    gcs = create_green_contexts([Partition("green_context", small), Partition("green_context", total - small)])
    try:
        assert sum(g.num_sms for g in gcs) <= total
        assert gcs[0].num_sms < gcs[1].num_sms
        rates = []
        for g in gcs:
            with g.activate():
                a = torch.ones(4096, 4096, device="cuda", dtype=torch.bfloat16)
                for _ in range(3):
                    a @ a
                g.synchronize()
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                e0.record()
                for _ in range(20):
                    a @ a
                e1.record()
                g.synchronize()
                rates.append(1 / e0.elapsed_time(e1))
            assert g.describe()["emulated"] is True
        assert rates[0] < rates[1]  # fewer SMs, slower matmul
    finally:
        for g in gcs:
            g.close()
