"""Async streaming load generator for any OpenAI-compatible server (vLLM, SGLang, hetserve): HTTP only.

Timing follows ``vllm bench serve`` so numbers are comparable across servers: a request's clock starts when it
is sent (after its arrival time and after a ``--max-concurrency`` slot frees up); TTFT is the first chunk that
carries a token; each later token-carrying chunk adds one inter-token gap; E2E latency ends at the last
token-carrying chunk (so ``sum(itl) == e2el - ttft`` for every request).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp

from hetserve.bench.datasets import SampleRequest
from hetserve.bench.records import RequestRecord

Endpoint = Literal["completions", "chat"]
ENDPOINT_PATHS: dict[str, str] = {"completions": "/v1/completions", "chat": "/v1/chat/completions"}


class BenchClientError(Exception):
    """The benchmark cannot talk to the server at all (for example /v1/models is unreachable)."""


@dataclass(frozen=True)
class ClientConfig:
    """How to send. ``request_rate`` in requests/s (``inf``: all at once); ``burstiness`` is the gamma shape of
    inter-arrival gaps (1 = Poisson, < 1 burstier, > 1 more regular); ``time_scale`` multiplies the trace's own
    arrival offsets when ``use_trace_timestamps`` (0.5 replays twice as fast)."""

    base_url: str
    model: str
    endpoint: Endpoint = "completions"
    api_key: str | None = None
    request_rate: float = math.inf
    burstiness: float = 1.0
    max_concurrency: int | None = None
    seed: int = 0
    timeout_s: float = 600.0
    use_trace_timestamps: bool = False
    time_scale: float = 1.0
    temperature: float = 0.0
    disable_tqdm: bool = False

    def __post_init__(self) -> None:
        if self.endpoint not in ENDPOINT_PATHS:
            raise ValueError(f"endpoint must be one of {sorted(ENDPOINT_PATHS)}, got {self.endpoint!r}")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be > 0, got {self.request_rate}")
        if not (self.burstiness > 0 and math.isfinite(self.burstiness)):
            raise ValueError(f"burstiness must be a finite number > 0, got {self.burstiness}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if not (self.time_scale >= 0 and math.isfinite(self.time_scale)):
            raise ValueError(f"time_scale must be a finite number >= 0, got {self.time_scale}")

    @property
    def url(self) -> str:
        return normalize_base_url(self.base_url) + ENDPOINT_PATHS[self.endpoint]

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass
class BenchmarkRun:
    records: list[RequestRecord]
    duration_s: float
    started_at_unix_s: float


def normalize_base_url(url: str) -> str:
    """``http://h:8000``, ``http://h:8000/`` and ``http://h:8000/v1`` all mean the same server root."""
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


def arrival_offsets_s(num_requests: int, request_rate: float, burstiness: float = 1.0, seed: int = 0) -> list[float]:
    """Send times relative to the first request (which goes at 0). Gaps are gamma(shape=burstiness,
    scale=1/(rate*burstiness)): mean 1/rate, coefficient of variation 1/sqrt(burstiness)."""
    if num_requests <= 0:
        return []
    if math.isinf(request_rate):
        return [0.0] * num_requests
    rng = random.Random(seed)
    scale = 1.0 / (request_rate * burstiness)
    offsets = [0.0]
    for _ in range(num_requests - 1):
        offsets.append(offsets[-1] + rng.gammavariate(burstiness, scale))
    return offsets


def schedule_offsets_s(requests: Sequence[SampleRequest], cfg: ClientConfig) -> list[float]:
    if cfg.use_trace_timestamps:
        return [(r.arrival_offset_s or 0.0) * cfg.time_scale for r in requests]
    return arrival_offsets_s(len(requests), cfg.request_rate, cfg.burstiness, cfg.seed)


def build_body(req: SampleRequest, cfg: ClientConfig) -> dict[str, Any]:
    """Request body; output length is forced with max_tokens + ignore_eos (+ min_tokens, for servers that
    stop on stop strings or ignore ignore_eos but honour min_tokens)."""
    body: dict[str, Any] = {
        "model": cfg.model,
        "max_tokens": req.expected_output_len,
        "min_tokens": req.expected_output_len,
        "ignore_eos": True,
        "temperature": cfg.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cfg.endpoint == "chat":
        if not isinstance(req.prompt, str):
            raise ValueError("the chat endpoint needs text prompts, not token ids")
        body["messages"] = [{"role": "user", "content": req.prompt}]
    else:
        body["prompt"] = req.prompt
    return body


def _error_message(raw: bytes) -> str:
    """The message of an OpenAI-style ``{"error": {"message": ...}}``, FastAPI ``{"detail": ...}``, or raw text."""
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return text[:500]
    if isinstance(data, dict):
        err = data.get("error", data)
        if isinstance(err, dict):
            msg = err.get("message", err.get("detail", err))
            return msg if isinstance(msg, str) else json.dumps(msg)[:500]
        if isinstance(err, str):
            return err
    return text[:500]


def _token_text(data: dict[str, Any], endpoint: Endpoint) -> str | None:
    """Text of the token(s) a stream chunk carries, or None when it carries none (usage-only chunk, chat's
    role-only opening delta, a trailing finish_reason-only chunk)."""
    choices = data.get("choices")
    if not choices or not isinstance(choices, list):
        return None
    choice = choices[0]
    if endpoint == "chat":
        delta = choice.get("delta") or {}
        text = delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning")
        return text if isinstance(text, str) and text else None
    text = choice.get("text")
    if isinstance(text, str) and text:
        return text
    # an empty text with no finish_reason is a token whose bytes are not a full character yet
    return "" if choice.get("finish_reason") is None else None


class _StreamState:
    """Per-request bookkeeping while its SSE stream arrives."""

    def __init__(self, start: float) -> None:
        self.start = start
        self.last_token_t: float | None = None
        self.num_token_chunks = 0
        self.usage_output_len: int | None = None
        self.texts: list[str] = []


def _on_event(payload: str, endpoint: Endpoint, rec: RequestRecord, st: _StreamState, now: float) -> bool:
    """Handles one ``data:`` payload; returns False when the stream is over ([DONE] or an error event)."""
    if payload == "[DONE]":
        return False
    data = json.loads(payload)
    if not isinstance(data, dict):
        return True
    if "error" in data and not data.get("choices"):
        err = data["error"]
        msg = err.get("message", err) if isinstance(err, dict) else err
        rec.error = f"stream error: {msg}"
        return False
    text = _token_text(data, endpoint)
    if text is not None:
        if st.last_token_t is None:
            rec.ttft_s = now - st.start
        else:
            rec.itl_s.append(now - st.last_token_t)
        st.last_token_t = now
        st.num_token_chunks += 1
        st.texts.append(text)
    usage = data.get("usage")
    if isinstance(usage, dict):
        if isinstance(usage.get("completion_tokens"), int):
            st.usage_output_len = usage["completion_tokens"]
        if isinstance(usage.get("prompt_tokens"), int):
            rec.server_prompt_len = usage["prompt_tokens"]
    return True


async def _stream(
    session: aiohttp.ClientSession, body: dict[str, Any], cfg: ClientConfig, rec: RequestRecord, st: _StreamState
) -> None:
    async with session.post(cfg.url, json=body, headers=cfg.headers) as resp:
        rec.status_code = resp.status
        if resp.status != 200:
            rec.error = f"HTTP {resp.status}: {_error_message(await resp.read())}"
            return
        # split lines ourselves: aiohttp's line reader caps line length, and one SSE event can be long
        pending = b""
        async for piece in resp.content.iter_any():
            now = time.perf_counter()
            pending += piece
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                line = raw.strip()
                # blank separators, ": keep-alive" comments and "event:" lines carry no data
                if line.startswith(b"data:") and not _on_event(line[5:].strip().decode(), cfg.endpoint, rec, st, now):
                    return
        line = pending.strip()
        if line.startswith(b"data:"):
            _on_event(line[5:].strip().decode(), cfg.endpoint, rec, st, time.perf_counter())


async def _send_one(
    session: aiohttp.ClientSession, body: dict[str, Any], cfg: ClientConfig, rec: RequestRecord, t0: float
) -> None:
    start = time.perf_counter()
    rec.start_s = start - t0
    st = _StreamState(start)
    try:
        await asyncio.wait_for(_stream(session, body, cfg, rec, st), timeout=cfg.timeout_s)
        if not rec.error:
            if st.last_token_t is None:
                rec.error = "the stream ended without any token"
            else:
                rec.e2el_s = st.last_token_t - start
                rec.output_len = st.usage_output_len if st.usage_output_len is not None else st.num_token_chunks
                rec.generated_text = "".join(st.texts)
                rec.success = True
    except asyncio.TimeoutError:
        rec.error = f"timed out after {cfg.timeout_s:g} s (--timeout)"
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        rec.error = f"bad JSON in the stream: {e}"
    except Exception as e:  # a benchmark records every failure (connection, protocol, ...) and keeps going
        rec.error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    finally:
        rec.end_s = time.perf_counter() - t0
        if not rec.success:
            rec.ttft_s, rec.itl_s, rec.e2el_s = 0.0, [], 0.0


def _progress_bar(total: int, disable: bool) -> Any:
    if disable:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="req", desc="bench")


async def run_benchmark_async(requests: Sequence[SampleRequest], cfg: ClientConfig) -> BenchmarkRun:
    """Sends every request at its arrival time; returns one record per request, in input order."""
    offsets = schedule_offsets_s(requests, cfg)
    records = [
        RequestRecord(index=i, prompt_len=r.prompt_len, expected_output_len=r.expected_output_len, scheduled_s=o)
        for i, (r, o) in enumerate(zip(requests, offsets, strict=True))
    ]
    bodies = [build_body(r, cfg) for r in requests]
    semaphore = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None
    # the pool never makes a request wait: unbounded (limit=0), or exactly the concurrency cap
    connector = aiohttp.TCPConnector(limit=cfg.max_concurrency or 0, limit_per_host=0)
    # no session-wide timeout (each request has its own deadline); trust_env=False keeps proxies out
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=min(cfg.timeout_s, 60.0))
    bar = _progress_bar(len(requests), cfg.disable_tqdm)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout, trust_env=False) as session:

        async def one(i: int) -> None:
            if semaphore is None:
                await _send_one(session, bodies[i], cfg, records[i], t0)
            else:
                async with semaphore:
                    await _send_one(session, bodies[i], cfg, records[i], t0)
            if bar is not None:
                bar.update(1)

        started_at = time.time()
        t0 = time.perf_counter()
        tasks: list[asyncio.Task[None]] = []
        for i, offset_s in enumerate(offsets):
            delay_s = t0 + offset_s - time.perf_counter()
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        duration_s = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    return BenchmarkRun(records=records, duration_s=duration_s, started_at_unix_s=started_at)


def run_benchmark(requests: Sequence[SampleRequest], cfg: ClientConfig) -> BenchmarkRun:
    return asyncio.run(run_benchmark_async(requests, cfg))


async def fetch_models_async(base_url: str, api_key: str | None = None, timeout_s: float = 30.0) -> dict[str, Any]:
    """The server's ``/v1/models`` answer; BenchClientError when unreachable or not JSON."""
    url = normalize_base_url(base_url) + "/v1/models"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        async with (
            aiohttp.ClientSession(timeout=timeout, trust_env=False) as session,
            session.get(url, headers=headers) as resp,
        ):
            status, raw = resp.status, await resp.read()
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
        raise BenchClientError(f"cannot reach {url}: {type(e).__name__}: {e}") from None
    if status != 200:
        raise BenchClientError(f"GET {url} -> HTTP {status}: {_error_message(raw)}")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BenchClientError(f"GET {url} did not return JSON: {raw[:200]!r}") from None
    if not isinstance(data, dict):
        raise BenchClientError(f"GET {url} returned {type(data).__name__}, expected an object")
    return data


def fetch_models(base_url: str, api_key: str | None = None, timeout_s: float = 30.0) -> dict[str, Any]:
    return asyncio.run(fetch_models_async(base_url, api_key, timeout_s))


def first_model_id(models: dict[str, Any]) -> str | None:
    data = models.get("data")
    if isinstance(data, list) and data and isinstance(data[0], dict) and isinstance(data[0].get("id"), str):
        return str(data[0]["id"])
    return None
