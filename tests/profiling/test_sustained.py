"""profiling/sustained.py: the per-machine speed scales from recorded steps, against steps made with
known ratios to the cost model; the scaled profile then reproduces those spans through ``CostModel``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hetserve.core.devices import get_device
from hetserve.core.model_config import ModelConfig
from hetserve.planner.batch_shape import BatchShape
from hetserve.planner.costmodel import CostModel
from hetserve.planner.profile import load_profile

ROOT = Path(__file__).resolve().parents[2]
PROFILE = ROOT / "profiles/h100-sxm-llama-3.1-8b.json"


def _cm(profile: Path) -> CostModel:
    cm = CostModel(ModelConfig.from_path(ROOT / "examples/models/llama-3.1-8b"), get_device("H100-SXM"), "bfloat16",
                   profile=load_profile(profile))
    cm.async_scheduling = cm.schedules_ahead = True
    return cm


def test_scales_are_the_ratio_of_busy_device_spans_to_the_model(tmp_path: Path) -> None:
    from hetserve.profiling import sustained as cal

    cm = _cm(PROFILE)
    fields = ["launch_start_s", "launch_end_s", "ready_s", "num_decode_seqs", "decode_context_tokens",
              "prefill_chunks", "num_sampled", "num_new_seqs", "new_seq_tokens", "device_span_s",
              "decode_max_context"]
    mixed = [BatchShape(((n, 0),), d, d * 700, d + 1, 1, n, 900) for n, d in
             ((2048, 40), (1500, 64), (800, 10), (300, 90), (1024, 30))]
    decode = [BatchShape((), d, d * c, d, 0, 0, c + 100) for d, c in ((16, 500), (64, 1200), (128, 900), (200, 300))]
    rows, t = [], 1.0
    truth = {"mixed": 1.07, "decode": 0.95}
    for i in range(60):
        shape = mixed[i % 5] if i % 2 else decode[i % 4]
        span = cm.step_time_s(shape) * truth["mixed" if shape.prefill_chunks else "decode"]
        gap = 0.01 if i % 10 == 9 else 0.0  # every tenth step starts an idle engine: not sustained, left out
        if i == 20:
            span *= 50  # a busy step the host held up (a preempted process): an outlier, left out
        start = t + gap
        rows.append([start, start + 1e-4, start + span, shape.num_decode_seqs, shape.decode_context_tokens,
                     [list(c) for c in shape.prefill_chunks], shape.num_sampled, shape.num_new_seqs,
                     shape.new_seq_tokens, span * (5.0 if gap else 1.0), shape.decode_max_context])
        t = start + span
    # an idle-gap step's span is off by 5x: the scales would show it if it were counted
    out = cal.scales_from_steps({"fields": fields, "rows": rows}, cm)
    assert out["mixed"]["steps"] == 24 and out["decode"]["steps"] == 28  # 6 after gaps, the first step, 1 outlier
    assert out["decode"]["dropped_outliers"] == 1 and out["mixed"]["dropped_outliers"] == 0
    assert out["meta"]["mixed_device_scale"] == pytest.approx(1.07, abs=1e-4)
    assert out["meta"]["decode_device_scale"] == pytest.approx(0.95, abs=1e-4)
    # the profile written with them predicts those spans
    path = cal.write_scales(PROFILE, out, tmp_path / "p.json")
    assert json.loads(path.read_text())["meta"]["sustained_calibration"]["mixed"]["steps"] == 24
    scaled = _cm(path)
    for shape in mixed[:2] + decode[1:3]:
        k = truth["mixed" if shape.prefill_chunks else "decode"]
        assert scaled.step_time_s(shape) == pytest.approx(cm.step_time_s(shape) * k, rel=1e-3)


def test_cli_profile_sustained_writes_scales_the_cost_model_reads(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """``hetserve profile --sustained`` on the CPU: the profile gets both scales, each the ratio of the sums it
    records (clipped to [0.5, 2]; 1.0 with too few steps), and a cost model built on it applies them."""
    import torch

    from hetserve.cli.main import main
    from hetserve.core.devices import cpu_host_spec

    out = tmp_path / "p.json"
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rc = main(["profile", "--model", str(tiny_llama_dir), "--device", "cpu", "--quick", "--output", str(out),
                   "--device-name", "cpu-test", "--sustained", "--sustained-requests", "24"])
    finally:
        torch.set_num_threads(before)
    assert rc == 0
    meta = json.loads(out.read_text())["meta"]
    cal = meta["sustained_calibration"]
    assert cal["decode"]["steps"] >= 20 and cal["workload"]["num_requests"] == 24
    for kind in ("mixed", "decode"):
        c = cal[kind]
        want = min(2.0, max(0.5, c["real_s"] / c["model_s"])) if c["steps"] >= 20 else 1.0
        assert meta[f"{kind}_device_scale"] == c["scale"] == pytest.approx(want, abs=1e-4)
    prof = load_profile(out)
    cm = CostModel(ModelConfig.from_path(tiny_llama_dir), cpu_host_spec(2, 8 * 2**30, name="cpu-test"), "float32",
                   profile=prof)
    assert (cm.mixed_device_scale, cm.decode_device_scale) == (meta["mixed_device_scale"], meta["decode_device_scale"])


def test_cli_sustained_requests_without_sustained_is_refused(tiny_llama_dir: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from hetserve.cli.main import main

    rc = main(["profile", "--model", str(tiny_llama_dir), "--device", "cpu", "--sustained-requests", "5"])
    assert rc != 0 and "--sustained-requests" in capsys.readouterr().err
