"""OpenAI-style error responses: ``{"error": {"message", "type", "param", "code"}}``, and the handlers that make
every failure one of them (validation -> 400 naming the field, never 422 and never a traceback)."""

from __future__ import annotations

import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hetserve.core.errors import EngineDeadError, HetserveError, ModelLoadError, QueueFullError, ValidationError

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "internal_server_error",
    503: "service_unavailable",
}
# pydantic's tags for union members and validator wrappers; they are not field names
_LOC_TAG = re.compile(r"^(str|int|float|bool|list|dict|none|tuple)$|[\[\]\-]")


class ServerDrainingError(HetserveError):
    """The server is shutting down (or was told to stop admitting) and takes no new requests."""


class RequestFailedError(HetserveError):
    """The engine gave up on a request (a cluster's worker died and no healthy instance could take it over)."""


class APIError(Exception):
    """An error the HTTP layer answers with ``status`` and an OpenAI error body."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers or {}


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": status}}


def error_response(status: int, message: str, param: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def api_error_from(exc: BaseException, retry_after_s: int = 1) -> APIError:
    """Map an exception from the engine side to the HTTP error a client gets."""
    retry = {"Retry-After": str(retry_after_s)}
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValidationError):
        return APIError(400, exc.message, param=exc.field)
    if isinstance(exc, QueueFullError):
        return APIError(503, f"the server is at capacity: {exc}; retry later", headers=retry)
    if isinstance(exc, ServerDrainingError):
        return APIError(503, f"the server is shutting down: {exc}", headers=retry)
    if isinstance(exc, RequestFailedError):
        return APIError(503, f"the request failed: {exc}; retry later", headers=retry)
    if isinstance(exc, EngineDeadError):
        return APIError(503, f"the engine is not running: {exc}")
    if isinstance(exc, ModelLoadError):
        return APIError(500, f"model error: {exc}")
    logger.error("internal error", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}")


def loc_to_param(loc: tuple[Any, ...] | list[Any]) -> str | None:
    """``("body", "messages", 0, "role")`` -> ``"messages[0].role"``; pydantic's union tags are dropped."""
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path", "header"):
        parts = parts[1:]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif isinstance(p, str) and not _LOC_TAG.search(p):
            out += f".{p}" if out else p
    return out or None


def _validation_message(err: dict[str, Any], param: str | None) -> str:
    if err.get("type") == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return f"malformed JSON body: {detail}".rstrip(": ")
    if err.get("type") == "missing":
        return f"'{param}' is a required field" if param else "the request body is missing"
    msg = str(err.get("msg", "invalid value"))
    if param is None:
        if err.get("type") == "model_attributes_type":
            return "the request body must be a JSON object"
        return f"invalid request body: {msg}"
    return f"'{param}': {msg}"


def _first_error(errors: list[dict[str, Any]]) -> dict[str, Any]:
    # a union reports one error per member; a "missing" field is the most useful of several
    for e in errors:
        if e.get("type") == "missing":
            return e
    return errors[0] if errors else {"msg": "invalid request"}


def install_error_handlers(app: FastAPI, retry_after_s: int) -> None:
    async def on_api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return error_response(exc.status, exc.message, exc.param, exc.headers)

    async def on_request_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        err = _first_error(list(exc.errors()))
        param = None if err.get("type") == "json_invalid" else loc_to_param(err.get("loc", ()))
        return error_response(400, _validation_message(err, param), param or "body")

    async def on_hetserve_error(_: Request, exc: Exception) -> JSONResponse:
        e = api_error_from(exc, retry_after_s)
        return error_response(e.status, e.message, e.param, e.headers)

    async def on_http_exception(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        status = exc.status_code
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if status == 404 and message == "Not Found":
            message = "no such route"
        if status == 400 and "parsing the body" in message:
            message = "the request body could not be read as JSON"
        return error_response(status, message, "body" if status in (400, 413) else None,
                              dict(exc.headers or {}))

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error", exc_info=exc)
        return error_response(500, f"internal error: {type(exc).__name__}")

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_request_validation)
    app.add_exception_handler(HetserveError, on_hetserve_error)
    app.add_exception_handler(StarletteHTTPException, on_http_exception)
    app.add_exception_handler(Exception, on_unexpected)
