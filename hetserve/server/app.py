"""The FastAPI application: routes, API-key and body-size guards, error handlers, OpenAPI tidy-up."""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import hetserve
from hetserve.server.async_engine import AsyncLLM
from hetserve.server.errors import APIError, error_body, install_error_handlers
from hetserve.server.health import health_response
from hetserve.server.metrics import CONTENT_TYPE, ServerMetrics
from hetserve.server.protocol import ChatCompletionRequest, CompletionRequest
from hetserve.server.serving import ServingContext, create_chat_completion, create_completion
from hetserve.server.settings import ServerSettings, resolve_chat_template

_UNGUARDED_PATHS = frozenset({"/health"})


async def _send_error(send: Send, status: int, message: str, param: str | None,
                      headers: dict[str, str] | None = None) -> None:
    body = json.dumps(error_body(status, message, param)).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class _APIKeyGuard:
    """401 unless ``Authorization: Bearer <key>`` matches, on every path but /health."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self._expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _UNGUARDED_PATHS:
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        if not hmac.compare_digest(given, self._expected):
            message = "missing API key" if not given else "invalid API key"
            await _send_error(send, 401, f"{message}; send 'Authorization: Bearer <key>'", "authorization",
                              {"WWW-Authenticate": "Bearer"})
            return
        await self.app(scope, receive, send)


class _BodySizeLimit:
    """413 for bodies over the limit, whether or not they declare a Content-Length."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.max_bytes
            except ValueError:
                await _send_error(send, 400, "invalid Content-Length header", "content-length")
                return
            if too_big:
                await _send_error(send, 413, f"the request body exceeds {self.max_bytes} bytes", "body")
                return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise APIError(413, f"the request body exceeds {self.max_bytes} bytes", param="body")
            return message

        await self.app(scope, limited_receive, send)


def _tidy_openapi(app: FastAPI) -> dict[str, Any]:
    """OpenAPI without FastAPI's 422 (we answer 400) and with the error shape we actually send."""
    if app.openapi_schema:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    error_schema = {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "object", "properties": {
            "message": {"type": "string"}, "type": {"type": "string"},
            "param": {"type": ["string", "null"]}, "code": {"type": "integer"}}}},
    }
    schema.setdefault("components", {}).setdefault("schemas", {})["ErrorResponse"] = error_schema
    for name in ("HTTPValidationError", "ValidationError"):
        schema["components"]["schemas"].pop(name, None)
    ref = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
    for path in schema.get("paths", {}).values():
        for op in path.values():
            responses = op.setdefault("responses", {})
            if responses.pop("422", None) is not None:
                responses["400"] = {"description": "invalid request", **ref}
    app.openapi_schema = schema
    return schema


def build_app(engine: AsyncLLM, settings: ServerSettings) -> FastAPI:
    """The server's application over a (started or not) AsyncLLM. The app's lifespan starts the engine and
    shuts it down when the app stops."""
    if engine.metrics is None:
        engine.metrics = ServerMetrics(settings.model_names[0])
    metrics = engine.metrics
    ctx = ServingContext(engine, settings, resolve_chat_template(settings.chat_template))
    started_unix_s = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await asyncio.to_thread(engine.shutdown)

    app = FastAPI(title="hetserve", version=hetserve.__version__, lifespan=lifespan,
                  description="OpenAI-compatible LLM server (hetserve).")
    app.state.serving = ctx
    install_error_handlers(app, settings.retry_after_s)
    app.add_middleware(_BodySizeLimit, max_bytes=settings.max_request_body_bytes)
    if settings.api_key:
        app.add_middleware(_APIKeyGuard, api_key=settings.api_key)
    app.openapi = lambda: _tidy_openapi(app)  # type: ignore[method-assign]

    @app.get("/health", summary="200 while the engine can serve (status ok or degraded), else 503")
    async def health() -> Response:
        if not engine.is_alive:
            err = engine.dead_error
            raise APIError(503, f"the engine is not running: {err}" if err else "the engine is not running")
        if not engine.is_admitting:
            raise APIError(503, "the server is shutting down", headers={"Retry-After": str(settings.retry_after_s)})
        return health_response(engine)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": hetserve.__version__}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        data = [{"id": name, "object": "model", "created": started_unix_s, "owned_by": "hetserve",
                 "root": settings.model, "parent": None, "max_model_len": engine.max_model_len}
                for name in settings.model_names]
        return {"object": "list", "data": data}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await create_completion(ctx, body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await create_chat_completion(ctx, body, request)

    return app
