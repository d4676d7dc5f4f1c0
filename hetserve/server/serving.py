"""The two generation endpoints: body -> token ids + SamplingParams -> AsyncLLM -> OpenAI-shaped JSON or SSE.

Handlers never touch the engine: prompts are tokenised on a worker thread, requests are queued through
``AsyncLLM.add_requests`` and outputs are read from its queue. A client that goes away (mid-stream or while
waiting for a non-streamed answer) aborts its requests, which frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from hetserve.core.errors import EngineDeadError, ValidationError
from hetserve.core.outputs import CompletionOutput, Logprobs, RequestOutput
from hetserve.core.sampling_params import SamplingParams
from hetserve.server.async_engine import AsyncLLM, RequestGroup
from hetserve.server.errors import APIError, RequestFailedError, ServerDrainingError, api_error_from, error_body
from hetserve.server.protocol import ChatCompletionRequest, CompletionRequest
from hetserve.server.settings import ServerSettings

_LOGPROB_FLOOR = -9999.0  # JSON has no -inf; what a token of zero probability reports
_RESERVED_TEMPLATE_KWARGS = frozenset({"messages", "add_generation_prompt", "chat_template", "tools"})


@dataclass
class ServingContext:
    engine: AsyncLLM
    settings: ServerSettings
    chat_template: str | None
    _token_text: dict[int, str] = field(default_factory=dict)

    @property
    def model_name(self) -> str:
        return self.settings.model_names[0]

    def check_model(self, model: str) -> None:
        if model not in self.settings.model_names:
            served = ", ".join(repr(n) for n in self.settings.model_names)
            raise APIError(404, f"the model {model!r} does not exist; this server serves {served}", param="model")

    def check_admitting(self) -> None:
        if self.engine.dead_error is not None:
            raise self.engine.dead_error
        if not self.engine.is_admitting:
            raise ServerDrainingError("no new requests are admitted")

    def token_text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self.engine.tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_text[token_id] = text
        return text


class SSEResponse(StreamingResponse):
    """Server-sent events; ``on_close`` runs however the response ends (done, client gone, cancelled)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _finite(x: float) -> float:
    return x if math.isfinite(x) else _LOGPROB_FLOOR


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _collect(group: RequestGroup, request: Request) -> dict[int, RequestOutput]:
    """Final output per prompt index; aborts the group if the client disconnects first."""
    finals: dict[int, RequestOutput] = {}

    async def consume() -> None:
        async for index, out in group:
            finals[index] = out

    work = asyncio.ensure_future(consume())
    gone = asyncio.ensure_future(_wait_disconnect(request))
    try:
        done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            work.result()
            return finals
        work.cancel()
        raise APIError(499, "the client closed the connection")
    finally:
        gone.cancel()
        group.abort()


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _stream_error(exc: BaseException) -> str:
    e = api_error_from(exc)
    return _sse(error_body(e.status, e.message, e.param))


# ---- /v1/completions -----------------------------------------------------------------------------


def _encode_completion_prompts(ctx: ServingContext, prompts: list[str | list[int]]) -> list[list[int]]:
    out = []
    for p in prompts:
        if isinstance(p, str):
            if len(p) > ctx.settings.max_prompt_chars:
                raise ValidationError("prompt", f"longer than {ctx.settings.max_prompt_chars} characters")
            if not p:
                raise ValidationError("prompt", "must not be empty")
            out.append(ctx.engine.tokenizer.encode(p))
        else:
            if not p:
                raise ValidationError("prompt", "must not be empty")
            out.append(p)
    return out


def _completion_logprobs(ctx: ServingContext, lps: list[Logprobs], offset: int) -> tuple[dict[str, Any], int]:
    tokens, token_logprobs, top, offsets = [], [], [], []
    for lp in lps:
        text = ctx.token_text(lp.token_id)
        tokens.append(text)
        token_logprobs.append(_finite(lp.logprob))
        offsets.append(offset)
        offset += len(text)
        alternatives = {text: _finite(lp.logprob)}
        for tid, value in zip(lp.top_token_ids, lp.top_logprobs):
            alternatives.setdefault(ctx.token_text(tid), _finite(value))
        top.append(alternatives)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}, offset


async def create_completion(ctx: ServingContext, body: CompletionRequest, request: Request) -> Response:
    arrival_s = time.monotonic()
    ctx.check_model(body.model)
    ctx.check_admitting()
    body.check_supported()
    prompts = body.prompts()
    if len(prompts) > ctx.settings.max_batch_prompts:
        raise ValidationError("prompt", f"a batch may hold at most {ctx.settings.max_batch_prompts} prompts")
    token_prompts = await asyncio.to_thread(_encode_completion_prompts, ctx, prompts)
    s, m = ctx.settings, ctx.engine.max_model_len
    params: list[SamplingParams] = []
    for ids in token_prompts:
        max_tokens = body.max_tokens if body.max_tokens is not None else max(m - len(ids), 1)
        sp = body.to_sampling_params(max_tokens, body.logprobs, s.max_n, s.max_logprobs, "logprobs")
        ctx.engine.validate_lengths(len(ids), sp)
        params.append(sp)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    group = await ctx.engine.add_requests(request_id, token_prompts, params, arrival_s)
    n = params[0].n
    echo_texts: list[str] = []
    if body.echo:
        echo_texts = [p if isinstance(p, str) else ctx.engine.tokenizer.decode(p) for p in prompts]
    header = {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": ctx.model_name}
    if body.stream:
        return SSEResponse(_stream_completion(ctx, body, group, header, n, echo_texts), on_close=group.abort)

    finals = await _collect(group, request)
    choices = []
    completion_tokens = 0
    for i in range(len(prompts)):
        for c in sorted(finals[i].outputs, key=lambda c: c.index):
            prefix = echo_texts[i] if body.echo else ""
            logprobs = None
            if c.logprobs is not None and body.logprobs is not None:
                logprobs, _ = _completion_logprobs(ctx, c.logprobs, len(prefix))
            choices.append({"index": i * n + c.index, "text": prefix + c.text, "logprobs": logprobs,
                            "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
            completion_tokens += len(c.token_ids)
    prompt_tokens = sum(len(ids) for ids in token_prompts)
    return JSONResponse({**header, "choices": choices, "usage": _usage(prompt_tokens, completion_tokens)})


async def _stream_completion(
    ctx: ServingContext, body: CompletionRequest, group: RequestGroup, header: dict[str, Any], n: int,
    echo_texts: list[str],
) -> AsyncIterator[str]:
    include_usage = body.include_usage_in_stream
    extra = {"usage": None} if include_usage else {}
    reported_finish: set[tuple[int, int]] = set()
    offsets: dict[tuple[int, int], int] = {}
    prompt_tokens: dict[int, int] = {}
    completion_tokens: dict[tuple[int, int], int] = {}
    try:
        async for i, out in group:
            prompt_tokens[i] = len(out.prompt_token_ids)
            for c in out.outputs:
                key = (i, c.index)
                finishing = c.finish_reason is not None and key not in reported_finish
                first = key not in offsets
                if not (c.delta_token_ids or c.delta_text or finishing or (first and body.echo)):
                    continue
                text = c.delta_text
                if first:
                    offsets[key] = 0
                    if body.echo:
                        text = echo_texts[i] + text
                        offsets[key] = len(echo_texts[i])
                logprobs = None
                if c.delta_logprobs is not None and body.logprobs is not None:
                    logprobs, offsets[key] = _completion_logprobs(ctx, c.delta_logprobs, offsets[key])
                completion_tokens[key] = len(c.token_ids)
                if finishing:
                    reported_finish.add(key)
                choice = {"index": i * n + c.index, "text": text, "logprobs": logprobs,
                          "finish_reason": c.finish_reason if finishing else None,
                          "stop_reason": c.stop_reason if finishing else None}
                yield _sse({**header, "choices": [choice], **extra})
        if include_usage:
            usage = _usage(sum(prompt_tokens.values()), sum(completion_tokens.values()))
            yield _sse({**header, "choices": [], "usage": usage})
    except (ServerDrainingError, EngineDeadError, RequestFailedError) as exc:
        yield _stream_error(exc)
    yield "data: [DONE]\n\n"


# ---- /v1/chat/completions ------------------------------------------------------------------------


def _encode_chat(ctx: ServingContext, body: ChatCompletionRequest) -> list[int]:
    messages = body.template_messages()
    num_chars = sum(len(json.dumps(m.get("content", ""), ensure_ascii=False)) for m in messages)
    if num_chars > ctx.settings.max_prompt_chars:
        raise ValidationError("messages", f"longer than {ctx.settings.max_prompt_chars} characters")
    kwargs = dict(body.chat_template_kwargs or {})
    for key in kwargs:
        if key in _RESERVED_TEMPLATE_KWARGS:
            raise ValidationError("chat_template_kwargs", f"may not set {key!r}")
    tok = ctx.engine.tokenizer
    try:
        text = tok.apply_chat_template(
            messages, add_generation_prompt=bool(body.add_generation_prompt), chat_template=ctx.chat_template,
            tools=body.tools, **kwargs,
        )
    except ValidationError:
        raise
    except Exception as exc:  # a template can fail in many ways on odd input; that is the input's fault
        raise ValidationError("messages", f"the chat template failed on these messages: {exc}") from exc
    ids = tok.encode(text, add_special_tokens=False)
    if not ids:
        raise ValidationError("messages", "the chat template rendered an empty prompt")
    return ids


def _chat_logprobs(ctx: ServingContext, lps: list[Logprobs], top_n: int) -> dict[str, Any]:
    def entry(tid: int, value: float) -> dict[str, Any]:
        text = ctx.token_text(tid)
        return {"token": text, "logprob": _finite(value), "bytes": list(text.encode("utf-8"))}

    content = []
    for lp in lps:
        e = entry(lp.token_id, lp.logprob)
        e["top_logprobs"] = [entry(t, v) for t, v in zip(lp.top_token_ids[:top_n], lp.top_logprobs[:top_n])]
        content.append(e)
    return {"content": content}


async def create_chat_completion(ctx: ServingContext, body: ChatCompletionRequest, request: Request) -> Response:
    arrival_s = time.monotonic()
    ctx.check_model(body.model)
    ctx.check_admitting()
    body.check_supported()
    ids = await asyncio.to_thread(_encode_chat, ctx, body)
    s = ctx.settings
    requested = body.requested_max_tokens()
    max_tokens = requested if requested is not None else max(ctx.engine.max_model_len - len(ids), 1)
    top_n = body.requested_logprobs()
    field_name = "top_logprobs" if body.top_logprobs is not None else "logprobs"
    sp = body.to_sampling_params(max_tokens, top_n, s.max_n, s.max_logprobs, field_name)
    try:
        ctx.engine.validate_lengths(len(ids), sp)
    except ValidationError as exc:
        if exc.field == "max_tokens" and body.max_completion_tokens is not None:
            raise ValidationError("max_completion_tokens", exc.message) from exc
        if exc.field == "prompt":
            raise ValidationError("messages", exc.message) from exc
        raise
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    group = await ctx.engine.add_requests(request_id, [ids], [sp], arrival_s)
    created = int(time.time())
    if body.stream:
        header = {"id": request_id, "object": "chat.completion.chunk", "created": created, "model": ctx.model_name}
        return SSEResponse(_stream_chat(ctx, body, group, header, sp.n, top_n), on_close=group.abort)

    out = (await _collect(group, request))[0]
    choices = []
    for c in sorted(out.outputs, key=lambda c: c.index):
        logprobs = _chat_logprobs(ctx, c.logprobs, top_n) if c.logprobs is not None and top_n is not None else None
        choices.append({"index": c.index, "message": {"role": "assistant", "content": c.text},
                        "logprobs": logprobs, "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
    usage = _usage(len(ids), sum(len(c.token_ids) for c in out.outputs))
    return JSONResponse({"id": request_id, "object": "chat.completion", "created": created, "model": ctx.model_name,
                         "choices": choices, "usage": usage})


async def _stream_chat(
    ctx: ServingContext, body: ChatCompletionRequest, group: RequestGroup, header: dict[str, Any], n: int,
    top_n: int | None,
) -> AsyncIterator[str]:
    include_usage = body.include_usage_in_stream
    extra = {"usage": None} if include_usage else {}
    for j in range(n):
        opening = {"index": j, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        yield _sse({**header, "choices": [opening], **extra})
    reported_finish: set[int] = set()
    last: RequestOutput | None = None
    try:
        async for _, out in group:
            last = out
            for c in out.outputs:
                finishing = c.finish_reason is not None and c.index not in reported_finish
                # a token that completes no character yet has no content to send (unless its logprobs)
                if not (c.delta_text or finishing or (c.delta_token_ids and top_n is not None)):
                    continue
                if finishing:
                    reported_finish.add(c.index)
                yield _sse({**header, "choices": [_chat_delta(ctx, c, finishing, top_n)], **extra})
        if include_usage and last is not None:
            usage = _usage(len(last.prompt_token_ids), sum(len(c.token_ids) for c in last.outputs))
            yield _sse({**header, "choices": [], "usage": usage})
    except (ServerDrainingError, EngineDeadError, RequestFailedError) as exc:
        yield _stream_error(exc)
    yield "data: [DONE]\n\n"


def _chat_delta(ctx: ServingContext, c: CompletionOutput, finishing: bool, top_n: int | None) -> dict[str, Any]:
    logprobs = None
    if c.delta_logprobs is not None and top_n is not None:
        logprobs = _chat_logprobs(ctx, c.delta_logprobs, top_n)
    return {"index": c.index, "delta": {"content": c.delta_text} if c.delta_text else {}, "logprobs": logprobs,
            "finish_reason": c.finish_reason if finishing else None,
            "stop_reason": c.stop_reason if finishing else None}
