"""The OpenAI-compatible HTTP server: ``hetserve serve`` (FastAPI + uvicorn over one engine loop thread).

Modules: ``settings`` (flags and config files), ``async_engine`` (AsyncLLM: the engine loop beside the event
loop), ``protocol`` (request bodies), ``serving`` (the generation endpoints), ``app`` (the application),
``errors`` (OpenAI error JSON), ``metrics`` (Prometheus), ``launch`` (uvicorn in the foreground or a thread).
Nothing heavy is imported here.
"""

from __future__ import annotations
