"""``GET /health`` bodies.

200 ``{"status": "ok", "instances": [...]}`` while every instance is healthy; 200 ``{"status": "degraded", ...}``
with the dead instances listed (``alive: false``, ``dead_reason``) while at least one instance still serves (the
cluster routes every request to the survivors, so a load balancer should keep sending traffic); 503 with an
OpenAI error body naming the dead instances when none is left. A dead engine thread or a draining server is a
503 too (``app.py``). Each instance: name, role, device (type names), device_ids, emulation, alive, pid,
dead_reason, num_running, num_waiting, kv_cache_usage. A single-device server lists itself as one instance
(name, role, device, alive, pid).
"""

from __future__ import annotations

import os
from typing import Any

from fastapi.responses import JSONResponse

from hetserve.server.async_engine import AsyncLLM
from hetserve.server.errors import error_body


def _single_device(engine: AsyncLLM) -> dict[str, Any]:
    executor = getattr(engine.engine, "executor", None)  # set at construction: safe to read from here
    return {"name": "engine", "role": "mixed", "device": str(getattr(executor, "device", "unknown")),
            "alive": True, "pid": os.getpid()}


def health_response(engine: AsyncLLM) -> JSONResponse:
    statuses = engine.instances
    if not statuses:
        return JSONResponse({"status": "ok", "instances": [_single_device(engine)]})
    rows = [i.as_dict() for i in statuses]
    dead = [i for i in statuses if not i.alive]
    strategy = getattr(engine.engine, "strategy", None)
    down = "; ".join(f"{i.name} ({i.device}, pid {i.pid}) is down: {i.dead_reason}" for i in dead)
    if len(dead) == len(statuses):
        body = {**error_body(503, f"no instance can serve: {down}"), "status": "down", "strategy": strategy,
                "instances": rows}
        return JSONResponse(body, status_code=503)
    body = {"status": "degraded" if dead else "ok", "strategy": strategy, "instances": rows}
    if dead:
        body["message"] = f"serving on {len(statuses) - len(dead)} of {len(statuses)} instances; {down}"
    return JSONResponse(body)
