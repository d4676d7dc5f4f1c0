"""Shared by the runtime tests: the model under test and the single-device reference they compare with.

A test module defines ``PROMPTS``, ``SP`` (SamplingParams) and ``MAX_LEN``; ``reference`` is the greedy output of
the single-process engine (fp32, CPU) for them. A module may override ``model`` (another tiny checkpoint)."""

from __future__ import annotations

import pytest

from hetserve.llm import LLM


def single_device_tokens(model: str, prompts: list, sp: object, max_len: int) -> list[list[int]]:
    llm = LLM(model, max_model_len=max_len, dtype="float32", device="cpu", num_blocks=128)
    return [o.outputs[0].token_ids for o in llm.generate(prompts, sp)]


@pytest.fixture(scope="module")
def model(tiny_llama_dir) -> str:
    return str(tiny_llama_dir)


@pytest.fixture(scope="module")
def reference(request: pytest.FixtureRequest, model: str) -> list[list[int]]:
    m = request.module
    return single_device_tokens(model, m.PROMPTS, m.SP, m.MAX_LEN)
