"""benchmarks/cluster_summary.py and gpu_cluster.py's pure helpers: throughput at SLO (bracket and interpolation),
medians over repeats, ratios and verdicts, which file wins, the run-time estimate. No GPU, no engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks.bench_modules import load_bench

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


cs = load_bench("cluster_summary")
gc = load_bench("gpu_cluster")


def test_rate_at_slo_interpolates_between_last_pass_and_first_fail() -> None:
    # 24 passes at 0.97, 36 fails at 0.41: 0.9 is crossed at 24 + (0.97 - 0.9) / (0.97 - 0.41) * 12 = 25.5
    r = cs.rate_at_slo({8.0: 1.0, 24.0: 0.97, 36.0: 0.41, 48.0: 0.41})
    assert (r["lo"], r["hi"], r["how"]) == (24.0, 36.0, "interpolated")
    assert r["estimate"] == pytest.approx(25.5)


def test_rate_at_slo_bounds_and_edge_cases() -> None:
    never = cs.rate_at_slo({12.0: 1.0, 64.0: 0.98})
    assert (never["lo"], never["hi"], never["estimate"], never["how"]) == (64.0, None, 64.0, "lower bound")
    # the lowest rate already fails: the line from (0, 1.0) to (12, 0.82) crosses 0.9 at 12 * 0.1 / 0.18
    first = cs.rate_at_slo({12.0: 0.82, 24.0: 0.58})
    assert (first["lo"], first["hi"], first["how"]) == (0.0, 12.0, "interpolated from 0")
    assert first["estimate"] == pytest.approx(12 * 0.1 / 0.18)
    # conservative: a pass above the lowest failing rate does not count
    noisy = cs.rate_at_slo({8.0: 0.95, 12.0: 0.85, 16.0: 0.92})
    assert (noisy["lo"], noisy["hi"]) == (8.0, 12.0)
    assert noisy["estimate"] == pytest.approx(8 + 0.05 / 0.10 * 4)
    assert cs.rate_at_slo({})["estimate"] is None


def _run(rate: float, gf: float, ttft99: float, sim_gf: float | None = None, repeat: int = 0) -> dict:
    real = {k: None for k in cs.METRICS}
    real.update(good_fraction=gf, p99_ttft_ms=ttft99, completed=10)
    sim = dict(real, good_fraction=gf if sim_gf is None else sim_gf, p99_ttft_ms=ttft99 / 2)
    return {"rate": rate, "repeat": repeat, "real": real, "simulated": sim, "file": "x", "cut": False}


def test_aggregate_reports_median_min_max_and_sim_error_on_medians() -> None:
    runs = [_run(24, 0.95, 300.0), _run(24, 0.80, 900.0, repeat=1), _run(24, 0.99, 500.0, repeat=2)]
    a = cs.aggregate(runs)
    assert a["repeats"] == 3
    assert a["real"]["p99_ttft_ms"] == {"median": 500.0, "min": 300.0, "max": 900.0, "n": 3}
    assert a["real"]["good_fraction"]["median"] == 0.95
    assert a["sim_error"]["p99_ttft_ms"] == pytest.approx(-0.5)  # sim 250 vs real 500
    even = cs.spread([1.0, 2.0, None, float("nan"), 4.0, 10.0])
    assert even == {"median": 3.0, "min": 1.0, "max": 10.0, "n": 4}


def test_ratio_kinds_and_verdicts() -> None:
    a = {"lo": 48.0, "hi": 64.0, "estimate": 60.0, "how": "interpolated"}
    b = {"lo": 24.0, "hi": 36.0, "estimate": 30.0, "how": "interpolated"}
    r = cs.ratio(a, b)
    assert r["estimate"] == pytest.approx(2.0) and r["kind"] == "="
    assert r["at_least"] == pytest.approx(48 / 36) and r["at_most"] == pytest.approx(64 / 24)
    assert cs.verdict(r["estimate"], r["kind"], (">=", 1.5), r["at_least"], r["at_most"]) == "met (interpolated)"
    assert cs.verdict(2.0, "=", (">=", 1.3), r["at_least"], r["at_most"]) == "met (bracket)"
    open_a = dict(a, hi=None, estimate=48.0, how="lower bound")
    r2 = cs.ratio(open_a, b)
    assert r2["kind"] == ">=" and r2["at_most"] is None
    assert cs.ratio(open_a, dict(b, hi=None, estimate=24.0, how="lower bound"))["estimate"] is None
    assert cs.verdict(1.2, ">=", (">=", 1.5)) == "undetermined"  # >= 1.2 says nothing about 1.5


def _write(path: Path, runs: list[dict], strategy: str = "dp", **meta: object) -> Path:
    path.write_text(json.dumps({"results": [{"strategy": strategy, "runs": runs}], **meta}))
    return path


def test_load_later_file_replaces_and_repeats_pool(tmp_path: Path) -> None:
    old = _write(tmp_path / "gpu-cluster-h100-mps-a.json", [_run(24, 1.0, 100.0)],
                 workload="azure_llm_2023_conv.csv lengths")  # an old file: no trace, no started_utc
    new = _write(tmp_path / "gpu-cluster-new-conv.json",
                 [_run(24, 0.9, 200.0), _run(24, 0.8, 400.0, repeat=1), {"rate": 36, "skipped": "deadline"}],
                 trace="conv", started_utc="2026-11-24T00:00:00+00:00", memory_starved=False)
    code = _write(tmp_path / "gpu-cluster-new-code.json", [_run(24, 0.5, 900.0)], trace="code",
                  started_utc="2026-11-24T01:00:00+00:00")
    starved = _write(tmp_path / "gpu-cluster-h100-mps-starved.json", [_run(12, 0.0, 9.0)], strategy="hetis",
                     emulation={"cluster": "examples/clusters/emulated-h100-mps-pair-starved.yaml"})
    groups, files = cs.load([new, old, code, starved])
    assert [r["real"]["p99_ttft_ms"] for r in groups[("conv", "pair", "dp", 24.0)]] == [200.0, 400.0]
    assert ("conv", "pair", "dp", 36.0) not in groups
    assert [r["real"]["p99_ttft_ms"] for r in groups[("code", "pair", "dp", 24.0)]] == [900.0]
    assert ("conv", "starved", "hetis", 12.0) in groups
    assert {f["file"]: f["trace"] for f in files}["gpu-cluster-h100-mps-a.json"] == "conv"


def test_summary_runs_end_to_end_on_synthetic_runs(tmp_path: Path) -> None:
    runs = {s: [_run(r, g, 100.0 * r) for r, g in pts] for s, pts in {
        "high-alone": [(16, 1.0), (32, 0.5)], "low-alone": [(4, 1.0), (8, 0.6)],
        "dp": [(16, 1.0), (32, 0.95), (48, 0.7)], "pd-lp": [(16, 0.8)], "pd-hp": [(16, 1.0), (32, 0.8)],
        "cronus": [(16, 1.0), (32, 0.95), (48, 0.75)], "pp": [(16, 0.95), (32, 0.2)]}.items()}
    groups = {("conv", "pair", s, float(r["rate"])): [r] for s, rs in runs.items() for r in rs}
    out = cs.summarise(groups)["conv"]
    dp = out["pair"]["rate_at_slo"]["dp"]["real"]
    assert dp["estimate"] == pytest.approx(32 + 0.05 / 0.25 * 16)
    comps = out["comparisons"]
    assert comps["cronus-vs-pd"][0]["ratio"]["kind"] == "="
    assert {c["rate"] for c in comps["cronus-tail"] if c["vs"] == "dp"} == {16.0, 32.0, 48.0}
    eff = comps["hetero-efficiency"][0]
    assert eff["best"] in ("dp", "cronus")
    assert "status" in comps["hetis-starved"][0]
    lines = cs.markdown({"conv": out}, [])
    assert any(line.startswith("### 1.") for line in lines)


def test_gpu_cluster_helpers() -> None:
    assert gc.arrival_seed(24.0, 0) == 240 and gc.arrival_seed(24.0, 2) == 2240
    assert gc.parse_rates_for("hetis=8,4;low-alone=4,8,12") == {"hetis": [4.0, 8.0], "low-alone": [4.0, 8.0, 12.0]}
    from hetserve.bench.metrics import parse_slo

    assert gc.slo_bound_s(parse_slo("ttft_ms=2000,tpot_ms=100"), 256) == pytest.approx(27.5)
    assert gc.slo_bound_s(parse_slo("ttft_ms=2000"), 256) is None
    typ, worst = gc.estimate_s(["dp", "pp"], {"dp": [10.0, 20.0], "pp": [10.0]}, 2, 100, 27.5)
    spans = 2 * (10 + 5 + 10)
    assert typ == pytest.approx(gc.FILE_OVERHEAD_S + 2 * gc.STARTUP_S + spans + 6 * gc.RUN_OVERHEAD_S)
    assert worst == pytest.approx(gc.FILE_OVERHEAD_S + 2 * gc.STARTUP_S + spans + 6 * 32.5)
