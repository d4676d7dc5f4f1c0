"""Client disconnects free KV blocks; a full queue answers 503 + Retry-After; shutdown stops admitting, answers every
request in flight and exits 0 (SIGTERM on a real ``hetserve serve`` process)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from hetserve.server.launch import ServerThread
from tests.server.conftest import MODEL_NAME, LiveServer, settings_for, slow_steps

LONG = {"model": MODEL_NAME, "prompt": list(range(10, 50)), "max_tokens": 200, "ignore_eos": True}


def abort_count(server: LiveServer) -> float:
    text = httpx.get(server.base_url + "/metrics", headers=server.headers).text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "hetserve:request_success_total" and s.labels["finished_reason"] == "abort":
                return s.value
    raise AssertionError("no abort counter")


def blocks_in_use(server: LiveServer) -> int:
    pool = server.engine.scheduler.kv.pool
    return pool.num_usable_blocks - pool.num_free_blocks


def test_disconnect_mid_stream_frees_blocks(server: LiveServer) -> None:
    aborted_before = abort_count(server)
    with (
        server.client() as c,
        slow_steps(server.thread),
        c.stream("POST", "/v1/completions", json={**LONG, "stream": True}) as r,
    ):
        assert r.status_code == 200
        lines = r.iter_lines()
        data = [ln for ln in (next(lines) for _ in range(6)) if ln.startswith("data:")]
        assert data and "[DONE]" not in data[-1]
        # 40 prompt tokens + a few outputs: at least 3 blocks of 16 are held while it runs
        assert blocks_in_use(server) >= 3
        # leaving the block closes the connection mid-stream
    server.wait_idle(timeout_s=10)
    assert blocks_in_use(server) == 0
    assert not server.engine.has_unfinished_requests()
    assert abort_count(server) == aborted_before + 1


def test_disconnect_while_waiting_for_a_non_streamed_answer(server: LiveServer) -> None:
    aborted_before = abort_count(server)
    body = {**LONG, "n": 2, "max_tokens": 210}
    with pytest.raises(httpx.ReadTimeout), slow_steps(server.thread):
        httpx.post(server.base_url + "/v1/completions", json=body, headers=server.headers, timeout=httpx.Timeout(
            30.0, read=0.3))
    server.wait_idle(timeout_s=10)
    assert blocks_in_use(server) == 0
    # both samples were aborted, not run to their end
    assert abort_count(server) == aborted_before + 2


def test_full_queue_gives_503_with_retry_after(tiny_model_dir: Path) -> None:
    settings = settings_for(tiny_model_dir, max_num_seqs=1, max_queued_requests=1, retry_after_s=7)
    with ServerThread(settings) as srv, slow_steps(srv):

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=srv.base_url, timeout=60) as c:
                body = {**LONG, "max_tokens": 40}
                return list(await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(6))))

        responses = asyncio.run(burst())
        statuses = sorted(r.status_code for r in responses)
        # one runs, at most one waits, the rest are refused
        assert set(statuses) <= {200, 503}
        assert 1 <= statuses.count(200) <= 2, statuses
        for r in responses:
            if r.status_code == 503:
                assert r.headers["Retry-After"] == "7"
                err = r.json()["error"]
                assert err["code"] == 503 and "capacity" in err["message"]
            else:
                assert r.json()["usage"]["completion_tokens"] == 40


def _read_stream(response: httpx.Response) -> list[str]:
    return [ln[len("data: "):] for ln in response.iter_lines() if ln.startswith("data: ")]


def test_shutdown_stops_admitting_and_finishes_in_flight(tiny_model_dir: Path) -> None:
    srv = ServerThread(settings_for(tiny_model_dir, shutdown_timeout_s=60.0)).start()
    try:
        with (
            httpx.Client(base_url=srv.base_url, timeout=60) as c,
            slow_steps(srv),
            c.stream("POST", "/v1/completions", json={**LONG, "max_tokens": 60, "stream": True}) as r,
        ):
            lines = r.iter_lines()
            first = next(ln for ln in lines if ln.startswith("data:"))
            srv.server.request_shutdown()
            time.sleep(0.05)
            with httpx.Client(base_url=srv.base_url, timeout=10) as other:
                refused = other.post("/v1/completions", json={**LONG, "max_tokens": 2})
                health = other.get("/health")
            rest = [first[6:]] + [ln[6:] for ln in lines if ln.startswith("data: ")]
        assert refused.status_code == 503 and "Retry-After" in refused.headers
        assert refused.json()["error"]["code"] == 503
        assert health.status_code == 503
        assert rest[-1] == "[DONE]"
        chunks = [json.loads(x) for x in rest[:-1]]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    finally:
        srv.stop()
    assert not srv._thread.is_alive()


def test_shutdown_timeout_aborts_in_flight_with_an_error_event(tiny_model_dir: Path) -> None:
    srv = ServerThread(settings_for(tiny_model_dir, shutdown_timeout_s=0.0)).start()
    try:
        with httpx.Client(base_url=srv.base_url, timeout=60) as c, slow_steps(srv):
            result: dict[str, httpx.Response] = {}
            waiter = threading.Thread(target=lambda: result.setdefault(
                "r", c.post("/v1/completions", json={**LONG, "max_tokens": 210})))
            with c.stream("POST", "/v1/completions", json={**LONG, "max_tokens": 210, "stream": True}) as r:
                lines = r.iter_lines()
                next(ln for ln in lines if ln.startswith("data:"))
                waiter.start()
                time.sleep(0.1)
                srv.server.request_shutdown()
                rest = [ln[6:] for ln in lines if ln.startswith("data: ")]
            waiter.join(30)
        assert rest[-1] == "[DONE]"
        assert json.loads(rest[-2])["error"]["code"] == 503
        non_streamed = result["r"]
        assert non_streamed.status_code == 503
        assert "shutting down" in non_streamed.json()["error"]["message"]
    finally:
        srv.stop()
    pool = srv.engine.engine.scheduler.kv.pool
    assert pool.num_free_blocks == pool.num_usable_blocks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_on_hetserve_serve_finishes_the_stream_and_exits_0(tiny_model_dir: Path, tmp_path: Path) -> None:
    port = _free_port()
    config = tmp_path / "serve.yaml"
    # settings from a file (as the planner writes them); the flag --port overrides nothing here
    config.write_text(f"max_model_len: 256\nnum_blocks: 64\nserved_model_name: [{MODEL_NAME}]\n"
                      "uvicorn_log_level: warning\ndevice: cpu\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "hetserve.cli.main", "serve", str(tiny_model_dir), "--config", str(config),
         "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        with (
            httpx.Client(base_url=base, timeout=60) as c,
            c.stream("POST", "/v1/completions", json={**LONG, "max_tokens": 40, "stream": True}) as r,
        ):
            lines = r.iter_lines()
            first = next(ln for ln in lines if ln.startswith("data:"))
            proc.send_signal(signal.SIGTERM)
            rest = [first[6:]] + [ln[6:] for ln in lines if ln.startswith("data: ")]
        assert rest[-1] == "[DONE]"
        assert json.loads(rest[-2])["choices"][0]["finish_reason"] == "length"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_engine_death_fails_requests_and_turns_health_503(tiny_model_dir: Path) -> None:
    srv = ServerThread(settings_for(tiny_model_dir)).start()
    engine = srv.engine.engine
    real_step = engine.step
    calls = {"n": 0}

    def failing_step():
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("device lost")
        return real_step()

    engine.step = failing_step
    try:
        with httpx.Client(base_url=srv.base_url, timeout=30) as c:
            assert c.get("/health").status_code == 200
            with c.stream("POST", "/v1/completions", json={**LONG, "max_tokens": 50, "stream": True}) as r:
                assert r.status_code == 200
                events = _read_stream(r)
            assert events[-1] == "[DONE]"
            err = json.loads(events[-2])["error"]
            assert err["code"] == 503 and "device lost" in err["message"]
            health = c.get("/health")
            assert health.status_code == 503 and "device lost" in health.json()["error"]["message"]
            later = c.post("/v1/completions", json={**LONG, "max_tokens": 2})
            assert later.status_code == 503 and later.json()["error"]["code"] == 503
    finally:
        srv.stop()


def test_only_the_engine_thread_touches_the_engine_and_it_sleeps_when_idle(server: LiveServer) -> None:
    engine = server.engine
    seen: list[tuple[str, str]] = []
    wrapped = ("add_request", "step", "abort_request", "has_unfinished_requests")
    for name in wrapped:
        real = getattr(engine, name)

        def spy(*a: object, _real=real, _name=name, **kw: object) -> object:
            seen.append((_name, threading.current_thread().name))
            return _real(*a, **kw)

        setattr(engine, name, spy)
    try:
        with server.client() as c:
            assert c.post("/v1/completions", json={**LONG, "max_tokens": 4}).status_code == 200
            with c.stream("POST", "/v1/chat/completions", json={
                "model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 100,
                "ignore_eos": True, "stream": True,
            }) as r:
                next(ln for ln in r.iter_lines() if ln.startswith("data:"))
        server.wait_idle()
        time.sleep(0.05)
        steps_when_idle = sum(1 for name, _ in seen if name == "step")
        time.sleep(0.3)
        assert sum(1 for name, _ in seen if name == "step") == steps_when_idle  # no stepping while idle
    finally:
        for name in wrapped:
            delattr(engine, name)
    assert {name for name, _ in seen} >= {"add_request", "step", "abort_request"}
    assert {thread for _, thread in seen} == {"hetserve-engine"}
