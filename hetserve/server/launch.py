"""Running the app under uvicorn: in the foreground with a graceful SIGINT/SIGTERM, or on a background thread
(the demo and the tests).

Graceful shutdown: the first signal stops admitting (new generation requests and /health get 503), lets the
requests in flight finish for up to ``shutdown_timeout_s``, aborts the rest (each still gets a response: an
error object, or an error event closing its stream), then stops uvicorn. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI

from hetserve.core.errors import ValidationError
from hetserve.server.app import build_app
from hetserve.server.async_engine import AsyncLLM
from hetserve.server.metrics import ServerMetrics
from hetserve.server.settings import ServerSettings

logger = logging.getLogger(__name__)


def resolve_model(settings: ServerSettings) -> ServerSettings:
    """Settings bound to a model directory: the embedded tiny model (made if missing) when none is given."""
    if settings.model is not None:
        return settings
    from hetserve.tiny.make_tiny import default_model_dir

    return settings.with_model(str(default_model_dir()))


def create_engine(settings: ServerSettings) -> AsyncLLM:
    """The engine the settings describe: one device (``LLMEngine``), or with ``cluster`` set, worker processes
    serving a deployment (``server.cluster.ClusterServing`` over ``ClusterEngine``)."""
    settings = resolve_model(settings)
    metrics = ServerMetrics(settings.model_names[0])
    if settings.serves_cluster:
        from hetserve.server.cluster import build_cluster_serving

        return AsyncLLM(build_cluster_serving(settings), metrics)
    return AsyncLLM.from_config(settings.engine_config(), metrics)


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValidationError("port", f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: AsyncLLM, shutdown_timeout_s: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.shutdown_timeout_s = shutdown_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._draining = False
        self.drain_task: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # not recorded in _captured_signals: uvicorn would re-raise it after shutdown and the exit code would
        # be the signal's, not 0
        if self._draining:
            self.should_exit = True
            self.force_exit = True
            return
        self.request_shutdown()

    def request_shutdown(self) -> None:
        """Start the graceful shutdown; safe from any thread or a signal handler."""
        if self._draining:
            return
        self._draining = True
        self.engine.stop_admitting()
        if self._loop is None or self._loop.is_closed():
            self.should_exit = True
            return
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        self.drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            if not await self.engine.wait_idle(self.shutdown_timeout_s):
                logger.warning("aborting the requests still running after %.1f s", self.shutdown_timeout_s)
                self.engine.abort_all("the server is shutting down")
                await self.engine.wait_idle(5.0)
            await asyncio.sleep(0.05)  # let the last responses leave
        finally:
            self.should_exit = True


def make_server(settings: ServerSettings, engine: AsyncLLM | None = None) -> tuple[GracefulServer, FastAPI]:
    settings = resolve_model(settings)
    engine = engine if engine is not None else create_engine(settings)
    app = build_app(engine, settings)
    config = uvicorn.Config(app, log_level=settings.uvicorn_log_level, timeout_graceful_shutdown=5,
                            access_log=settings.uvicorn_log_level in ("debug", "trace", "info"),
                            timeout_keep_alive=5)
    return GracefulServer(config, engine, settings.shutdown_timeout_s), app


class ServerThread:
    """A server on a background thread, listening on ``settings.host:settings.port`` (0 = a free port)."""

    def __init__(self, settings: ServerSettings, engine: AsyncLLM | None = None) -> None:
        self.settings = resolve_model(settings)
        self.server, self.app = make_server(self.settings, engine)
        self.engine = self.server.engine
        self._sock = bind_socket(self.settings.host, self.settings.port)
        self.port: int = self._sock.getsockname()[1]
        self._thread = threading.Thread(target=self._run, name="hetserve-uvicorn", daemon=True)
        self._error: BaseException | None = None

    @property
    def base_url(self) -> str:
        host = self.settings.host
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    def _run(self) -> None:
        try:
            self.server.run(sockets=[self._sock])
        except BaseException as exc:  # noqa: BLE001 - surfaced by start()
            self._error = exc

    def start(self, timeout_s: float = 60.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {self._error!r}")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Graceful stop (as on SIGTERM) and wait for the thread."""
        if self._thread.is_alive():
            self.server.request_shutdown()
            self._thread.join(timeout_s)
        self._sock.close()

    def __enter__(self) -> ServerThread:  # noqa: PYI034 - Self needs python 3.11
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
