"""The official ``openai`` SDK against a live server; greedy output must equal the offline API's on the same model."""

from __future__ import annotations

import math
from collections.abc import Iterator

import openai
import pytest

from hetserve import LLM, SamplingParams
from tests.server.conftest import BLOCK_SIZE, MAX_MODEL_LEN, MODEL_NAME, NUM_BLOCKS, LiveServer

PROMPTS = ["The quick brown fox", "Once upon a time", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def offline(live_server: LiveServer) -> Iterator[LLM]:
    yield LLM(str(live_server.model_dir), max_model_len=MAX_MODEL_LEN, num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE,
              device="cpu")


@pytest.fixture()
def client(server: LiveServer) -> Iterator[openai.OpenAI]:
    c = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=server.api_key, max_retries=0, timeout=60)
    yield c
    c.close()


def greedy(max_tokens: int, **kw: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)  # type: ignore[arg-type]


def test_models_lists_the_served_name(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_NAME]


def test_greedy_completion_equals_offline(client: openai.OpenAI, offline: LLM) -> None:
    ref = offline.generate(PROMPTS[0], greedy(12))[0]
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=12, temperature=0.0)
    c = r.choices[0]
    assert c.text == ref.outputs[0].text
    assert c.finish_reason == ref.outputs[0].finish_reason
    assert r.usage is not None
    assert r.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert r.usage.completion_tokens == len(ref.outputs[0].token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_greedy_chat_equals_offline(client: openai.OpenAI, offline: LLM) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    ref = offline.chat(messages, greedy(10))[0]
    r = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=10, temperature=0.0)
    assert r.object == "chat.completion"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == ref.outputs[0].text
    assert r.usage is not None and r.usage.prompt_tokens == len(ref.prompt_token_ids)
    # max_completion_tokens is the newer spelling of the same limit
    r2 = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_completion_tokens=10, temperature=0)
    assert r2.choices[0].message.content == ref.outputs[0].text


def test_batch_of_prompts_and_token_ids(client: openai.OpenAI, offline: LLM) -> None:
    refs = offline.generate(PROMPTS, greedy(6, n=1))
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPTS, max_tokens=6, temperature=0.0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [o.outputs[0].text for o in refs]
    # the same prompts as token ids give the same text
    ids = [o.prompt_token_ids for o in refs]
    r_ids = client.completions.create(model=MODEL_NAME, prompt=ids, max_tokens=6, temperature=0.0)
    assert [c.text for c in r_ids.choices] == [c.text for c in r.choices]
    r_one = client.completions.create(model=MODEL_NAME, prompt=ids[1], max_tokens=6, temperature=0.0)
    assert r_one.choices[0].text == refs[1].outputs[0].text


def test_streaming_completion_with_usage(client: openai.OpenAI, offline: LLM) -> None:
    ref = offline.generate(PROMPTS[1], greedy(20, ignore_eos=True))[0]
    stream = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[1], max_tokens=20, temperature=0.0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    chunks = list(stream)
    text_chunks = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in text_chunks) == ref.outputs[0].text
    assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
    assert all(c.choices[0].finish_reason is None for c in text_chunks[:-1])
    usage = chunks[-1].usage
    assert not chunks[-1].choices and usage is not None
    assert usage.completion_tokens == 20 and usage.prompt_tokens == len(ref.prompt_token_ids)
    assert all(c.usage is None for c in chunks[:-1])


def test_streaming_chat_with_usage(client: openai.OpenAI, offline: LLM) -> None:
    messages = [{"role": "user", "content": "Tell me a story"}]
    ref = offline.chat(messages, greedy(16, ignore_eos=True))[0]
    stream = client.chat.completions.create(model=MODEL_NAME, messages=messages, max_tokens=16, temperature=0.0,
                                            stream=True, stream_options={"include_usage": True},
                                            extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.outputs[0].text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 16


def test_stop_string_truncates_like_the_greedy_text(client: openai.OpenAI) -> None:
    full = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[2], max_tokens=24, temperature=0.0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    # a stop string taken from the middle of the greedy text: the answer must end right before it
    cut = next(i for i in range(len(full) // 3, len(full) - 2) if full[i : i + 2].isascii() and full[i : i + 2].isalnum())
    stop = full[cut : cut + 2]
    first = full.find(stop)
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[2], max_tokens=24, temperature=0.0, stop=[stop],
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[:first]
    assert r.choices[0].finish_reason == "stop"
    kept = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[2], max_tokens=24, temperature=0.0, stop=stop,
                                     extra_body={"ignore_eos": True, "include_stop_str_in_output": True})
    assert kept.choices[0].text == full[: first + len(stop)]


def test_n_2_gives_two_indexed_choices(client: openai.OpenAI) -> None:
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[:2], max_tokens=8, temperature=1.0, n=2, seed=3,
                                  extra_body={"ignore_eos": True})
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert r.usage is not None and r.usage.completion_tokens == 4 * 8
    chat = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], n=2,
                                          max_tokens=8, temperature=1.0, seed=5)
    assert [c.index for c in chat.choices] == [0, 1]
    # distinct seeds per sample: the two samples are (almost surely) different
    assert chat.choices[0].message.content != chat.choices[1].message.content


def test_seed_reproducibility(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        return client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=16, temperature=1.0,
                                         seed=seed, extra_body={"ignore_eos": True}).choices[0].text

    a, b, c = sample(1234), sample(1234), sample(99)
    assert a == b
    assert a != c


def test_completion_logprobs(client: openai.OpenAI, offline: LLM) -> None:
    ref = offline.generate(PROMPTS[0], greedy(6, logprobs=3, ignore_eos=True))[0].outputs[0]
    r = client.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=6, temperature=0.0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert lp is not None and lp.tokens is not None and lp.token_logprobs is not None and lp.top_logprobs is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    assert ref.logprobs is not None
    for i, (value, top) in enumerate(zip(lp.token_logprobs, lp.top_logprobs)):
        assert math.isclose(value, ref.logprobs[i].logprob, abs_tol=1e-5)
        # greedy: the chosen token is the most likely one
        assert value == pytest.approx(max(top.values()), abs=1e-6)
        assert 1 <= len(top) <= 4
        assert sum(math.exp(v) for v in top.values()) <= 1.0 + 1e-6


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                       temperature=0.0, logprobs=True, top_logprobs=2,
                                       extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == 5
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-6)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
        assert entry.bytes == list(entry.token.encode("utf-8"))


def test_echo_and_extra_sampling_fields(client: openai.OpenAI, offline: LLM) -> None:
    ref = offline.generate(PROMPTS[0], greedy(8, min_tokens=8, repetition_penalty=1.3, top_k=5))[0]
    r = client.completions.create(
        model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=8, temperature=0.0, echo=True,
        extra_body={"min_tokens": 8, "repetition_penalty": 1.3, "top_k": 5, "unknown_field_is_ignored": 1},
    )
    assert r.choices[0].text == PROMPTS[0] + ref.outputs[0].text
