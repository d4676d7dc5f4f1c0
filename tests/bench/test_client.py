"""The benchmark client and CLI against a fake OpenAI-compatible server on loopback.

The fake server streams exactly ``max_tokens`` chunks (one token each, ``TOKEN_DELAY_S`` apart), reports usage,
and records what it received, so the client's counts and timings can be checked against what really happened.
"""

from __future__ import annotations

import asyncio
import csv
import itertools
import json
import math
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hetserve.bench.cli import main
from hetserve.bench.client import ClientConfig, arrival_offsets_s, run_benchmark
from hetserve.bench.datasets import DatasetConfig, SampleRequest, load_requests

uvicorn = pytest.importorskip("uvicorn")
starlette_apps = pytest.importorskip("starlette.applications")
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, Response, StreamingResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "data"
MODEL = "fake-model"
TOKEN_DELAY_S = 0.001
REJECTED_MAX_TOKENS = 13  # the fake answers 400 to these
HANG_MAX_TOKENS = 777  # the fake never answers these
MODELS_ANSWER = {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "test"}]}


@dataclass
class FakeState:
    bodies: list[dict[str, Any]] = field(default_factory=list)
    arrivals_s: list[float] = field(default_factory=list)
    auth_headers: list[str | None] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    send_usage: bool = True

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


STATE = FakeState()


def _error(status: int, message: str, param: str) -> JSONResponse:
    body = {"error": {"message": message, "type": "BadRequestError", "param": param, "code": status}}
    return JSONResponse(body, status_code=status)


async def _models(request: Request) -> Response:
    return JSONResponse(MODELS_ANSWER)


async def _generate(request: Request, chat: bool) -> Response:
    STATE.arrivals_s.append(time.perf_counter())
    STATE.auth_headers.append(request.headers.get("authorization"))
    body = await request.json()
    STATE.bodies.append(body)
    if body.get("model") != MODEL:
        return _error(404, f"model {body.get('model')!r} does not exist", "model")
    num_tokens = body["max_tokens"]
    if num_tokens == REJECTED_MAX_TOKENS:
        return _error(400, f"max_tokens={num_tokens} is not allowed here", "max_tokens")
    prompt_tokens = len(body["prompt"]) if isinstance(body.get("prompt"), list) else 7
    include_usage = bool((body.get("stream_options") or {}).get("include_usage")) and STATE.send_usage

    def chunk(i: int) -> dict[str, Any]:
        finish = "length" if i == num_tokens - 1 else None
        if chat:
            return {
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": f" w{i}"}, "finish_reason": None}],
            }
        return {"object": "text_completion", "choices": [{"index": 0, "text": f" w{i}", "finish_reason": finish}]}

    async def stream() -> Any:
        STATE.in_flight += 1
        STATE.max_in_flight = max(STATE.max_in_flight, STATE.in_flight)
        try:
            if num_tokens == HANG_MAX_TOKENS:
                await asyncio.sleep(3600)
            if chat:  # role-only opening delta and finish-only closing chunk carry no token
                yield "data: " + json.dumps({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]})
                yield "\n\n"
            for i in range(num_tokens):
                await asyncio.sleep(TOKEN_DELAY_S)
                yield f"data: {json.dumps(chunk(i))}\n\n"
            if chat:
                yield "data: " + json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
                yield "\n\n"
            if include_usage:
                usage = {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": num_tokens,
                    "total_tokens": prompt_tokens + num_tokens,
                }
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            STATE.in_flight -= 1

    return StreamingResponse(stream(), media_type="text/event-stream")


async def _completions(request: Request) -> Response:
    return await _generate(request, chat=False)


async def _chat(request: Request) -> Response:
    return await _generate(request, chat=True)


@pytest.fixture(scope="module")
def server_url() -> Iterator[str]:
    app = starlette_apps.Starlette(
        routes=[
            Route("/v1/models", _models),
            Route("/v1/completions", _completions, methods=["POST"]),
            Route("/v1/chat/completions", _chat, methods=["POST"]),
        ]
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline, "fake server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture(autouse=True)
def _fresh_state() -> None:
    STATE.reset()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _reference_percentile(values: list[float], p: float) -> float:
    try:
        import numpy as np

        return float(np.percentile(values, p))
    except ImportError:
        return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1]


def test_forced_lengths_and_timing_invariants(server_url: str) -> None:
    reqs = load_requests(
        DatasetConfig(num_prompts=16, random_input_len=16, random_output_len=12, random_range_ratio=0.5, seed=3),
        as_text=False,
    )
    run = run_benchmark(reqs, ClientConfig(base_url=server_url, model=MODEL, disable_tqdm=True))
    assert [r.error for r in run.records] == [""] * 16
    by_prompt = sorted(STATE.bodies, key=lambda b: b["prompt"])  # bodies arrive in any order
    for req, body in zip(sorted(reqs, key=lambda r: r.prompt), by_prompt):
        assert body["prompt"] == req.prompt and len(body["prompt"]) == req.prompt_len
        assert body["max_tokens"] == body["min_tokens"] == req.expected_output_len
        assert body["ignore_eos"] is True and body["stream"] is True
        assert body["stream_options"] == {"include_usage": True}
    for req, rec in zip(reqs, run.records):
        assert rec.output_len == req.expected_output_len
        assert rec.server_prompt_len == req.prompt_len
        assert len(rec.itl_s) == rec.output_len - 1  # one token per chunk in the fake
        assert math.isclose(sum(rec.itl_s), rec.e2el_s - rec.ttft_s, abs_tol=1e-9)
        # the fake sleeps TOKEN_DELAY_S before every token: timings cannot be shorter
        assert rec.ttft_s >= 0.9 * TOKEN_DELAY_S
        assert rec.e2el_s >= 0.9 * TOKEN_DELAY_S * rec.output_len
        assert rec.start_s <= rec.start_s + rec.e2el_s <= rec.end_s <= run.duration_s


def test_cli_trace_replay_matches_csv_and_brute_force(server_url: str, tmp_path: Path) -> None:
    n = 24
    out, png = tmp_path / "r.json", tmp_path / "p.png"
    argv = [
        "--base-url",
        server_url + "/v1",
        "--dataset",
        "azure-conv",
        "--dataset-path",
        str(DATA / "azure_conv_excerpt.csv"),
        "--num-prompts",
        str(n),
        "--slo",
        "ttft_ms=1000,tpot_ms=1000",
        "--output",
        str(out),
        "--plot",
        str(png),
        "--disable-tqdm",
        "--api-key",
        "sekrit",
    ]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    with open(DATA / "azure_conv_excerpt.csv", newline="") as f:
        rows = list(csv.reader(f))[1 : n + 1]
    assert res["completed"] == n and res["failed"] == 0
    assert res["output_lens"] == [int(r[2]) for r in rows]
    assert res["input_lens"] == [int(r[1]) for r in rows]
    assert res["total_output_tokens"] == sum(int(r[2]) for r in rows)
    assert res["total_input_tokens"] == sum(int(r[1]) for r in rows)
    assert res["server_models"] == MODELS_ANSWER and res["model_id"] == MODEL
    assert "sekrit" not in json.dumps(res) and res["command"].startswith("hetserve bench ")
    assert res["request_goodput"] is not None and res["slo"] == {"ttft_ms": 1000.0, "tpot_ms": 1000.0}
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    ttfts = res["ttfts"]
    e2els = [t + sum(gaps) for t, gaps in zip(ttfts, res["itls"])]  # independent of the e2els field
    assert e2els == pytest.approx(res["e2els"], abs=1e-9)
    tpots = [(e - t) / (k - 1) for e, t, k in zip(e2els, ttfts, res["output_lens"]) if k > 1]
    itls = [g for gaps in res["itls"] for g in gaps]
    for metric, values in (("ttft", ttfts), ("tpot", tpots), ("itl", itls), ("e2el", e2els)):
        for p in (50, 90, 99):
            assert res[f"p{p}_{metric}_ms"] == pytest.approx(_reference_percentile(values, p) * 1000, rel=1e-9)
        assert res[f"median_{metric}_ms"] == pytest.approx(_reference_percentile(values, 50) * 1000, rel=1e-9)
        assert res[f"mean_{metric}_ms"] == pytest.approx(statistics.fmean(values) * 1000, rel=1e-9)
        assert res[f"std_{metric}_ms"] == pytest.approx(statistics.pstdev(values) * 1000, rel=1e-6)
    assert res["output_throughput"] == pytest.approx(res["total_output_tokens"] / res["duration"])
    assert res["request_throughput"] == pytest.approx(n / res["duration"])
    assert STATE.auth_headers == ["Bearer sekrit"] * n


def test_server_errors_count_as_failed(server_url: str) -> None:
    reqs = [SampleRequest([11, 12, 13], 3, REJECTED_MAX_TOKENS if i % 3 == 0 else 5) for i in range(9)]
    run = run_benchmark(reqs, ClientConfig(base_url=server_url, model=MODEL, disable_tqdm=True))
    for req, rec in zip(reqs, run.records):
        if req.expected_output_len == REJECTED_MAX_TOKENS:
            assert not rec.success and rec.status_code == 400
            assert "HTTP 400" in rec.error and "max_tokens=13 is not allowed" in rec.error
        else:
            assert rec.success and rec.output_len == 5
    wrong_model = run_benchmark(reqs[:2], ClientConfig(base_url=server_url, model="nope", disable_tqdm=True))
    assert all("HTTP 404" in r.error and "does not exist" in r.error for r in wrong_model.records)


def test_connection_refused_and_timeout_fail_without_hanging(server_url: str) -> None:
    reqs = [SampleRequest([11, 12], 2, 4) for _ in range(3)]
    refused = run_benchmark(
        reqs, ClientConfig(base_url=f"http://127.0.0.1:{_free_port()}", model=MODEL, disable_tqdm=True)
    )
    assert all(not r.success and "Connect" in r.error for r in refused.records)
    hang = [SampleRequest([11, 12], 2, HANG_MAX_TOKENS), SampleRequest([11, 12], 2, 3)]
    t = time.perf_counter()
    run = run_benchmark(hang, ClientConfig(base_url=server_url, model=MODEL, timeout_s=0.5, disable_tqdm=True))
    assert time.perf_counter() - t < 5
    assert not run.records[0].success and "timed out" in run.records[0].error
    assert run.records[1].success and run.records[1].output_len == 3


def test_chat_endpoint_counts_only_content_chunks(server_url: str) -> None:
    reqs = load_requests(DatasetConfig(num_prompts=4, random_input_len=10, random_output_len=6), as_text=True)
    run = run_benchmark(reqs, ClientConfig(base_url=server_url, model=MODEL, endpoint="chat", disable_tqdm=True))
    for body, rec in zip(STATE.bodies, run.records):
        assert body["messages"][0]["role"] == "user" and len(body["messages"][0]["content"].split()) == 10
        assert rec.success and rec.output_len == 6 and len(rec.itl_s) == 5
        assert rec.generated_text == "".join(f" w{i}" for i in range(6))


def test_without_usage_counts_chunks(server_url: str) -> None:
    STATE.send_usage = False
    reqs = [SampleRequest([20] * 5, 5, k) for k in (1, 4, 9)]
    run = run_benchmark(reqs, ClientConfig(base_url=server_url, model=MODEL, disable_tqdm=True))
    assert [r.output_len for r in run.records] == [1, 4, 9]
    assert all(r.server_prompt_len is None for r in run.records)


def test_max_concurrency_is_respected(server_url: str) -> None:
    reqs = [SampleRequest([11] * 4, 4, 10) for _ in range(12)]
    run = run_benchmark(reqs, ClientConfig(base_url=server_url, model=MODEL, max_concurrency=3, disable_tqdm=True))
    assert all(r.success for r in run.records)
    assert STATE.max_in_flight <= 3
    starts_ends = [(r.start_s, r.end_s) for r in run.records]
    overlap = max(sum(1 for s, e in starts_ends if s <= t < e) for t, _ in starts_ends)
    assert overlap <= 3


def test_gamma_arrivals_have_the_requested_rate_and_spread() -> None:
    rate = 20.0
    for burstiness, cv in ((1.0, 1.0), (4.0, 0.5), (0.25, 2.0)):
        offsets = arrival_offsets_s(20001, rate, burstiness, seed=7)
        gaps = [b - a for a, b in itertools.pairwise(offsets)]
        assert offsets[0] == 0.0 and all(g >= 0 for g in gaps)
        assert statistics.fmean(gaps) == pytest.approx(1 / rate, rel=0.05)
        assert statistics.pstdev(gaps) / statistics.fmean(gaps) == pytest.approx(cv, rel=0.08)
    offsets = arrival_offsets_s(20001, rate, 1.0, seed=7)
    gaps = [b - a for a, b in itertools.pairwise(offsets)]
    # exponential gaps: P(gap <= mean) = 1 - 1/e
    assert sum(g <= 1 / rate for g in gaps) / len(gaps) == pytest.approx(1 - math.exp(-1), abs=0.015)
    assert arrival_offsets_s(50, rate, seed=1) == arrival_offsets_s(50, rate, seed=1)
    assert arrival_offsets_s(50, rate, seed=1) != arrival_offsets_s(50, rate, seed=2)
    assert arrival_offsets_s(5, math.inf) == [0.0] * 5


def test_live_arrivals_follow_the_schedule(server_url: str) -> None:
    n, rate = 30, 60.0
    reqs = [SampleRequest([11, 12], 2, 2) for _ in range(n)]
    run = run_benchmark(
        reqs, ClientConfig(base_url=server_url, model=MODEL, request_rate=rate, seed=5, disable_tqdm=True)
    )
    expected = arrival_offsets_s(n, rate, 1.0, seed=5)
    assert [r.scheduled_s for r in run.records] == expected
    for rec in run.records:
        assert rec.success and rec.scheduled_s - 1e-3 <= rec.start_s < rec.scheduled_s + 0.25
    seen = sorted(STATE.arrivals_s)
    assert (seen[-1] - seen[0]) / (n - 1) == pytest.approx(expected[-1] / (n - 1), rel=0.25)


def test_trace_timestamps_are_replayed_scaled(server_url: str, tmp_path: Path) -> None:
    out = tmp_path / "r.json"
    argv = [
        "--base-url",
        server_url,
        "--dataset",
        "azure-code",
        "--dataset-path",
        str(DATA / "azure_code_excerpt.csv"),
        "--num-prompts",
        "8",
        "--use-trace-timestamps",
        "--time-scale",
        "0.05",
        "--max-output-len",
        "3",
        "--output",
        str(out),
        "--disable-tqdm",
    ]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    with open(DATA / "azure_code_excerpt.csv", newline="") as f:
        rows = list(csv.reader(f))[1:9]
    from datetime import datetime

    ts = [datetime.strptime(r[0][:26], "%Y-%m-%d %H:%M:%S.%f").timestamp() for r in rows]
    assert res["scheduled_times"] == pytest.approx([0.05 * (t - ts[0]) for t in ts], abs=1e-5)
    assert all(s >= sch - 1e-3 for s, sch in zip(res["start_times"], res["scheduled_times"]))
    assert res["output_lens"] == [min(3, int(r[2])) for r in rows]


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["--request-rate", "-1"], "--request-rate"),
        (["--request-rate", "fast"], "--request-rate"),
        (["--burstiness", "0"], "--burstiness"),
        (["--num-prompts", "0"], "--num-prompts"),
        (["--max-concurrency", "x"], "--max-concurrency"),
        (["--endpoint", "embeddings"], "--endpoint"),
        (["--dataset", "mmlu"], "--dataset"),
        (["--dataset", "azure-conv"], "--dataset-path"),
        (["--dataset", "azure-conv", "--dataset-path", "/no/such/file.csv"], "--dataset-path"),
        (["--dataset", "sharegpt", "--dataset-path", str(DATA / "README.md")], "--dataset-path"),
        (["--dataset", "azure-code", "--dataset-path", str(DATA / "README.md")], "--dataset-path"),
        (["--slo", "ttft=100"], "--slo"),
        (["--slo", "ttft_ms=-5"], "--slo"),
        (["--random-range-ratio", "1.5"], "--random-range-ratio"),
        (["--timeout", "0"], "--timeout"),
        (["--use-trace-timestamps"], "--use-trace-timestamps"),
        (["--time-scale", "2"], "--time-scale"),
        (["--vocab-size", "5"], "--vocab-size"),
        (["--tokenizer", "/no/such/dir"], "--tokenizer"),
        (["--metric-percentiles", "0,101"], "--metric-percentiles"),
        (["--base-url", "localhost:8000"], "--base-url"),
        (["--no-such-flag"], "--no-such-flag"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(argv: list[str], flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err


def test_unreachable_server_without_model_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--base-url", f"http://127.0.0.1:{_free_port()}", "--num-prompts", "2", "--disable-tqdm"]) == 1
    assert "--model" in capsys.readouterr().err
