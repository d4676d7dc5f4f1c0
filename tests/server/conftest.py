"""A live ``hetserve serve`` on 127.0.0.1 (a free port) over a tiny model made for the session."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from hetserve.server.launch import ServerThread
from hetserve.server.settings import ServerSettings

API_KEY = "test-key"
MODEL_NAME = "tiny"
MAX_MODEL_LEN = 256
NUM_BLOCKS = 64  # 63 usable blocks of 16 tokens: room for a few full-length requests at once
BLOCK_SIZE = 16
MAX_N = 4
MAX_LOGPROBS = 5


@dataclass
class LiveServer:
    thread: ServerThread
    model_dir: Path
    api_key: str | None

    @property
    def base_url(self) -> str:
        return self.thread.base_url

    @property
    def engine(self):
        return self.thread.engine.engine

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, headers=self.headers, timeout=60.0, **kwargs)

    def wait_idle(self, timeout_s: float = 10.0) -> None:
        """Until no request is in flight and every KV block is back in the pool."""
        pool = self.engine.scheduler.kv.pool
        deadline = time.monotonic() + timeout_s
        while self.thread.engine.has_work or pool.num_free_blocks != pool.num_usable_blocks:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"not idle after {timeout_s} s: {pool.num_free_blocks}/{pool.num_usable_blocks} blocks free"
                )
            time.sleep(0.01)


@contextmanager
def slow_steps(thread: ServerThread, step_s: float = 0.01) -> Iterator[None]:
    """Make every engine step take at least ``step_s`` (a slower device), so a test can act while requests
    are surely still running, however fast the machine."""
    engine = thread.engine.engine
    real_step = engine.step

    def step():
        time.sleep(step_s)
        return real_step()

    engine.step = step
    try:
        yield
    finally:
        del engine.step


def settings_for(model_dir: Path, **overrides: object) -> ServerSettings:
    values: dict[str, object] = {
        "model": str(model_dir), "host": "127.0.0.1", "port": 0, "served_model_name": (MODEL_NAME,),
        "max_model_len": MAX_MODEL_LEN, "num_blocks": NUM_BLOCKS, "block_size": BLOCK_SIZE, "device": "cpu",
        "max_n": MAX_N, "max_logprobs": MAX_LOGPROBS, "uvicorn_log_level": "warning",
        "max_request_body_bytes": 1_000_000,
    }
    values.update(overrides)
    return ServerSettings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hetserve.tiny.make_tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def live_server(tiny_model_dir: Path) -> Iterator[LiveServer]:
    thread = ServerThread(settings_for(tiny_model_dir, api_key=API_KEY)).start()
    try:
        yield LiveServer(thread, tiny_model_dir, API_KEY)
    finally:
        thread.stop()


@pytest.fixture()
def server(live_server: LiveServer) -> Iterator[LiveServer]:
    """The session server, idle before and after the test."""
    live_server.wait_idle()
    yield live_server
    live_server.wait_idle()
