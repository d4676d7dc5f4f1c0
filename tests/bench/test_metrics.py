"""Metrics against brute-force references (numpy when installed, else the standard library)."""

from __future__ import annotations

import math
import random
import statistics

import pytest

from hetserve.bench.client import RequestRecord
from hetserve.bench.metrics import (
    Slo,
    compute_metrics,
    parse_percentiles,
    parse_slo,
    percentile,
    percentile_key,
    render_summary,
)

try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy is usually installed
    np = None  # type: ignore[assignment]


def _ref_percentile(values: list[float], p: float) -> float:
    if np is not None:
        return float(np.percentile(values, p))
    # the standard library's "inclusive" quantiles are numpy's linear interpolation
    return statistics.quantiles(values, n=1000, method="inclusive")[round(p * 10) - 1]


def _records(seed: int, n: int, fail_every: int = 0) -> list[RequestRecord]:
    rng = random.Random(seed)
    out: list[RequestRecord] = []
    for i in range(n):
        k = rng.choice([1, 1, 2, 5, 17, 64])
        rec = RequestRecord(index=i, prompt_len=rng.randint(1, 900), expected_output_len=k)
        rec.start_s = rng.uniform(0, 10)
        if fail_every and i % fail_every == 0:
            rec.error, rec.end_s = "HTTP 500: boom", rec.start_s + 0.01
        else:
            rec.success, rec.output_len = True, k
            rec.ttft_s = rng.expovariate(20)
            rec.itl_s = [rng.expovariate(100) for _ in range(k - 1)]
            rec.e2el_s = rec.ttft_s + sum(rec.itl_s)
            rec.end_s = rec.start_s + rec.e2el_s + 0.001
            rec.server_prompt_len = rec.prompt_len + (1 if i % 2 else 0)
        out.append(rec)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_percentiles_and_moments_match_reference(seed: int) -> None:
    recs = _records(seed, 200, fail_every=7)
    pcts = (50.0, 90.0, 99.0, 99.9)
    res = compute_metrics(recs, duration_s=12.5, percentiles=pcts)
    ok = [r for r in recs if r.success]
    refs = {
        "ttft": [r.ttft_s for r in ok],
        "tpot": [(r.e2el_s - r.ttft_s) / (r.output_len - 1) for r in ok if r.output_len > 1],
        "itl": [g for r in ok for g in r.itl_s],
        "e2el": [r.e2el_s for r in ok],
    }
    for metric, values in refs.items():
        for p in pcts:
            assert res[percentile_key(p, metric)] == pytest.approx(_ref_percentile(values, p) * 1000, rel=1e-12)
        assert res[f"median_{metric}_ms"] == pytest.approx(statistics.median(values) * 1000, rel=1e-12)
        assert res[f"mean_{metric}_ms"] == pytest.approx(statistics.fmean(values) * 1000, rel=1e-12)
        assert res[f"std_{metric}_ms"] == pytest.approx(statistics.pstdev(values) * 1000, rel=1e-9)
    assert "p99.9_ttft_ms" in res and "p99_itl_ms" in res
    assert res["completed"] == len(ok) and res["failed"] == len(recs) - len(ok)
    total_in = sum(r.server_prompt_len or 0 for r in ok)
    total_out = sum(r.output_len for r in ok)
    assert res["total_input_tokens"] == total_in and res["total_output_tokens"] == total_out
    assert res["request_throughput"] == pytest.approx(len(ok) / 12.5)
    assert res["output_throughput"] == pytest.approx(total_out / 12.5)
    assert res["total_token_throughput"] == pytest.approx((total_in + total_out) / 12.5)
    assert res["request_goodput"] is None
    assert res["errors"].count("HTTP 500: boom") == res["failed"]
    assert [x for x, r in zip(res["output_lens"], recs) if not r.success] == [0] * res["failed"]


def test_percentile_edge_cases() -> None:
    assert percentile([], 99) == 0.0
    assert percentile([3.0], 1) == 3.0
    assert percentile([1.0, 2.0], 50) == 1.5
    assert percentile([4.0, 1.0, 3.0, 2.0], 100) == 4.0 and percentile([4.0, 1.0, 3.0, 2.0], 0) == 1.0
    assert percentile_key(99.0, "ttft") == "p99_ttft_ms" and percentile_key(99.9, "itl") == "p99.9_itl_ms"


def test_goodput_counts_requests_meeting_every_slo() -> None:
    recs = _records(5, 300, fail_every=11)
    slo = Slo(ttft_ms=60.0, tpot_ms=12.0, e2el_ms=150.0)
    res = compute_metrics(recs, duration_s=4.0, slo=slo)
    good = 0
    for r in recs:
        if not r.success:
            continue
        tpot = (r.e2el_s - r.ttft_s) / (r.output_len - 1) if r.output_len > 1 else 0.0
        good += r.ttft_s * 1000 <= 60 and tpot * 1000 <= 12 and r.e2el_s * 1000 <= 150
    assert 0 < good < res["completed"]
    assert res["request_goodput"] == pytest.approx(good / 4.0)


def test_empty_and_all_failed_runs_report_zeros() -> None:
    res = compute_metrics([], duration_s=1.0)
    assert res["completed"] == res["failed"] == 0 and res["mean_ttft_ms"] == 0.0 and res["p99_e2el_ms"] == 0.0
    failed = compute_metrics(_records(1, 5, fail_every=1), duration_s=1.0, slo=Slo(ttft_ms=1.0))
    assert failed["completed"] == 0 and failed["failed"] == 5 and failed["request_goodput"] == 0.0


def test_max_concurrent_requests_matches_sweep_by_sampling() -> None:
    recs = _records(9, 60)
    res = compute_metrics(recs, duration_s=11.0)
    points = sorted({r.start_s for r in recs})
    brute = max(sum(1 for r in recs if r.start_s <= t < r.end_s) for t in points)
    assert res["max_concurrent_requests"] == brute


def test_max_output_tokens_per_s_buckets_chunk_times() -> None:
    recs = []
    for i, start in enumerate((0.1, 0.5, 1.2)):
        rec = RequestRecord(
            index=i,
            prompt_len=1,
            expected_output_len=3,
            success=True,
            output_len=3,
            ttft_s=0.1,
            itl_s=[0.2, 0.2],
            start_s=start,
        )
        rec.e2el_s = 0.5
        recs.append(rec)
    # token times: 0.2 0.4 0.6 | 0.6 0.8 1.0 | 1.3 1.5 1.7 -> 5 tokens in [0, 1), 4 in [1, 2)
    assert compute_metrics(recs, duration_s=2.0)["max_output_tokens_per_s"] == pytest.approx(5.0)


@pytest.mark.parametrize(
    "bad", ["", "ttft=1", "ttft_ms", "ttft_ms=x", "ttft_ms=0", "ttft_ms=1,ttft_ms=2", "tpot_ms=inf"]
)
def test_parse_slo_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_slo(bad)


def test_parse_slo_and_percentiles() -> None:
    assert parse_slo("ttft_ms=200,tpot_ms=50") == Slo(ttft_ms=200.0, tpot_ms=50.0)
    assert parse_slo("e2el_ms=1e4").as_dict() == {"e2el_ms": 10000.0}
    assert parse_percentiles("50,90,99.9") == (50.0, 90.0, 99.9)
    for bad in ("", "a", "0", "101"):
        with pytest.raises(ValueError):
            parse_percentiles(bad)


@pytest.mark.parametrize("use_rich", [True, False])
def test_summary_names_every_headline_number(use_rich: bool) -> None:
    res = compute_metrics(_records(3, 20, fail_every=4), duration_s=2.0, slo=Slo(ttft_ms=100.0))
    text = render_summary(res, use_rich=use_rich)
    for label in (
        "Successful requests",
        "Failed requests",
        "Request goodput",
        "Mean TTFT (ms)",
        "P99 ITL (ms)",
        "Median E2EL (ms)",
        "Output token throughput",
    ):
        assert label in text
    assert f"{res['mean_ttft_ms']:.2f}" in text and str(res["failed"]) in text
    assert not math.isnan(res["duration"])
