"""``hetserve bench`` against the live server: every request completes with exactly the forced output length, the
server's own token counters agree, and the reported percentiles match a brute-force computation."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hetserve.bench.cli import main as bench_main
from tests.server.conftest import API_KEY, LiveServer


def generation_tokens(server: LiveServer) -> float:
    text = httpx.get(server.base_url + "/metrics", headers=server.headers).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "hetserve:generation_tokens_total":
                return s.value
    raise AssertionError("no generation token counter")


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_bench_completes_every_request_with_forced_lengths(server: LiveServer, tmp_path: Path, endpoint: str) -> None:
    out = tmp_path / "result.json"
    before = generation_tokens(server)
    argv = ["--base-url", server.base_url, "--api-key", API_KEY, "--endpoint", endpoint, "--num-prompts", "20",
            "--random-input-len", "24", "--random-output-len", "12", "--random-range-ratio", "0.5", "--seed", "7",
            "--max-concurrency", "8", "--output", str(out), "--disable-tqdm"]
    if endpoint == "chat":
        argv += ["--tokenizer", str(server.model_dir)]
    assert bench_main(argv) == 0
    server.wait_idle()
    res = json.loads(out.read_text())

    assert res["completed"] == 20 and res["failed"] == 0, res["errors"]
    assert res["output_lens"] == res["expected_output_lens"]
    assert res["num_output_len_mismatch"] == 0
    assert res["total_output_tokens"] == sum(res["expected_output_lens"])
    assert generation_tokens(server) - before == res["total_output_tokens"]
    if endpoint == "completions":  # token-id prompts: the server counts exactly what was sent
        assert res["input_lens"] == res["requested_input_lens"]
    assert res["server_models"]["data"][0]["id"] == res["model_id"]

    ttft_ms = np.array(res["ttfts"]) * 1000
    itl_ms = np.array([g for gaps in res["itls"] for g in gaps]) * 1000
    e2el_ms = np.array(res["e2els"]) * 1000
    assert len(itl_ms) == sum(n - 1 for n in res["output_lens"]) or endpoint == "chat"
    for p in (50, 90, 99):
        assert res[f"p{p}_ttft_ms"] == pytest.approx(np.percentile(ttft_ms, p), rel=1e-9, abs=1e-9)
        assert res[f"p{p}_itl_ms"] == pytest.approx(np.percentile(itl_ms, p), rel=1e-9, abs=1e-9)
        assert res[f"p{p}_e2el_ms"] == pytest.approx(np.percentile(e2el_ms, p), rel=1e-9, abs=1e-9)
    assert res["mean_ttft_ms"] == pytest.approx(ttft_ms.mean(), rel=1e-9)
    assert res["std_e2el_ms"] == pytest.approx(e2el_ms.std(), rel=1e-9, abs=1e-9)
    assert res["output_throughput"] == pytest.approx(res["total_output_tokens"] / res["duration"], rel=1e-9)


def test_demo_writes_results_and_shuts_down(tiny_model_dir: Path, tmp_path: Path) -> None:
    import threading

    from hetserve.cli.main import main as cli_main

    threads_before = {t.name for t in threading.enumerate()}
    out = tmp_path / "demo"
    code = cli_main(["demo", "--model", str(tiny_model_dir), "--num-prompts", "8", "--input-len", "16",
                     "--output-len", "8", "--request-rate", "inf", "--output-dir", str(out), "--no-progress",
                     "--device", "cpu"])
    assert code == 0
    res = json.loads((out / "result.json").read_text())
    assert res["completed"] == 8 and res["output_lens"] == res["expected_output_lens"]
    assert (out / "result.png").stat().st_size > 0
    settings = json.loads((out / "server-settings.json").read_text())
    assert settings["model"] == str(tiny_model_dir)
    # the demo's server and engine threads are gone
    leftover = {t.name for t in threading.enumerate()} - threads_before
    assert not leftover & {"hetserve-uvicorn", "hetserve-engine"}
