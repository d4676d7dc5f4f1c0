"""Property-based requests generated from the server's own /openapi.json (schemathesis): no input, valid or not,
may produce a 5xx. A bounded number of examples per operation keeps it well under two minutes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

from hetserve.server.launch import ServerThread
from tests.server.conftest import API_KEY, MODEL_NAME, settings_for

MAX_EXAMPLES = 40


@pytest.fixture(scope="module")
def fuzz_server(tiny_model_dir: Path) -> Iterator[ServerThread]:
    # short contexts, small batches: every generated request that is valid finishes in milliseconds
    srv = ServerThread(settings_for(tiny_model_dir, api_key=API_KEY, max_model_len=64, max_n=2,
                                    max_batch_prompts=4, max_request_body_bytes=64_000)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def api_schema(fuzz_server: ServerThread) -> Any:
    schema = schemathesis.openapi.from_url(f"{fuzz_server.base_url}/openapi.json",
                                           headers={"Authorization": f"Bearer {API_KEY}"})
    schema.config.generation.update(max_examples=MAX_EXAMPLES, modes=["positive", "negative"])
    return schema


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_input_yields_a_server_error(case: Any, fuzz_server: ServerThread) -> None:
    # a random model name is a 404 before anything else is looked at: name the served model instead, so the
    # generated bodies reach tokenisation, validation and generation
    body = case.body
    if isinstance(body, dict) and isinstance(body.get("model"), str):
        body["model"] = MODEL_NAME
        # two cross-field rules the schema cannot state; steer past them so chat bodies reach generation
        if body.get("top_logprobs") is not None and body.get("logprobs") in (None, False):
            body["logprobs"] = True
        for m in body.get("messages") or []:
            if isinstance(m, dict) and m.get("content") is None:
                m["content"] = "hi"
    case.call_and_validate(base_url=fuzz_server.base_url, headers={"Authorization": f"Bearer {API_KEY}"},
                           checks=[not_a_server_error], timeout=60)
