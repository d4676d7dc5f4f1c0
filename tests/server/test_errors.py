"""Bad requests: each gets the right status and an OpenAI error object whose ``param`` names the field at fault."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.server.conftest import API_KEY, MAX_LOGPROBS, MAX_MODEL_LEN, MAX_N, MODEL_NAME, LiveServer

C, CHAT = "/v1/completions", "/v1/chat/completions"
OK_COMPLETION = {"model": MODEL_NAME, "prompt": "hello", "max_tokens": 2}
OK_CHAT = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def completion(**changes: Any) -> dict[str, Any]:
    body = {**OK_COMPLETION, **changes}
    return {k: v for k, v in body.items() if v is not _DROP}


def chat(**changes: Any) -> dict[str, Any]:
    body = {**OK_CHAT, **changes}
    return {k: v for k, v in body.items() if v is not _DROP}


_DROP = object()

# (id, path, body (dict -> JSON, str/bytes -> raw), headers override, status, param)
CASES: list[tuple[str, str, Any, dict[str, str] | None, int, str | None]] = [
    ("malformed-json", C, '{"model": "tiny", "prompt": ', None, 400, "body"),
    ("body-not-object", C, "[1, 2, 3]", None, 400, "body"),
    ("empty-body", C, "", None, 400, "body"),
    ("missing-model", C, completion(model=_DROP), None, 400, "model"),
    ("missing-prompt", C, completion(prompt=_DROP), None, 400, "prompt"),
    ("missing-messages", CHAT, chat(messages=_DROP), None, 400, "messages"),
    ("model-wrong-type", C, completion(model=7), None, 400, "model"),
    ("max-tokens-string", C, completion(max_tokens="5"), None, 400, "max_tokens"),
    ("max-tokens-negative", C, completion(max_tokens=-3), None, 400, "max_tokens"),
    ("max-tokens-zero-chat", CHAT, chat(max_tokens=0), None, 400, "max_tokens"),
    ("max-tokens-huge", C, completion(max_tokens=10**9), None, 400, "max_tokens"),
    ("max-completion-tokens-huge", CHAT, chat(max_completion_tokens=MAX_MODEL_LEN), None, 400,
     "max_completion_tokens"),
    ("prompt-over-max-model-len", C, completion(prompt=[5] * (MAX_MODEL_LEN + 10)), None, 400, "prompt"),
    ("prompt-text-over-max-model-len", C, completion(prompt="word " * (2 * MAX_MODEL_LEN)), None, 400, "prompt"),
    ("chat-over-max-model-len", CHAT, chat(messages=[{"role": "user", "content": "x " * MAX_MODEL_LEN}]), None, 400,
     "messages"),
    ("empty-prompt", C, completion(prompt=""), None, 400, "prompt"),
    ("empty-prompt-list", C, completion(prompt=[]), None, 400, "prompt"),
    ("token-id-out-of-vocab", C, completion(prompt=[1, 2, 10**7]), None, 400, "prompt"),
    ("prompt-wrong-type", C, completion(prompt={"text": "hi"}), None, 400, "prompt"),
    ("temperature-too-high", C, completion(temperature=3.5), None, 400, "temperature"),
    ("temperature-negative", CHAT, chat(temperature=-0.5), None, 400, "temperature"),
    ("temperature-nan", C, '{"model": "tiny", "prompt": "a", "temperature": NaN}', None, 400, "temperature"),
    ("top-p-zero", C, completion(top_p=0.0), None, 400, "top_p"),
    ("top-k-below-minus-one", C, completion(top_k=-2), None, 400, "top_k"),
    ("min-p-above-one", C, completion(min_p=1.5), None, 400, "min_p"),
    ("presence-penalty-range", CHAT, chat(presence_penalty=2.5), None, 400, "presence_penalty"),
    ("repetition-penalty-zero", C, completion(repetition_penalty=0.0), None, 400, "repetition_penalty"),
    ("n-zero", C, completion(n=0), None, 400, "n"),
    ("n-over-cap", C, completion(n=MAX_N + 1), None, 400, "n"),
    ("logprobs-over-cap", C, completion(logprobs=MAX_LOGPROBS + 1), None, 400, "logprobs"),
    ("top-logprobs-over-cap", CHAT, chat(logprobs=True, top_logprobs=MAX_LOGPROBS + 1), None, 400, "top_logprobs"),
    ("top-logprobs-without-logprobs", CHAT, chat(top_logprobs=2), None, 400, "top_logprobs"),
    ("min-tokens-over-max-tokens", C, completion(min_tokens=5, max_tokens=2), None, 400, "min_tokens"),
    ("empty-stop-string", C, completion(stop=[""]), None, 400, "stop"),
    ("stop-wrong-type", C, completion(stop=3), None, 400, "stop"),
    ("stream-not-bool", C, completion(stream="yes"), None, 400, "stream"),
    ("stream-options-without-stream", C, completion(stream_options={"include_usage": True}), None, 400,
     "stream_options"),
    ("logit-bias-unsupported", C, completion(logit_bias={"5": 1.0}), None, 400, "logit_bias"),
    ("unknown-model", C, completion(model="gpt-4"), None, 404, "model"),
    ("unknown-model-chat", CHAT, chat(model="nope"), None, 404, "model"),
    ("empty-messages", CHAT, chat(messages=[]), None, 400, "messages"),
    ("invalid-role", CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), None, 400, "messages[0].role"),
    ("message-not-object", CHAT, chat(messages=["hi"]), None, 400, "messages[0]"),
    ("message-missing-content", CHAT, chat(messages=[{"role": "user"}]), None, 400, "messages[0].content"),
    ("image-content-part", CHAT,
     chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]), None, 400,
     "messages[0].content[0]"),
    ("per-request-chat-template", CHAT, chat(chat_template="{{ 1 }}"), None, 400, "chat_template"),
    ("bad-api-key", C, completion(), {"Authorization": "Bearer wrong"}, 401, "authorization"),
    ("missing-api-key", C, completion(), {}, 401, "authorization"),
    ("unknown-route", "/v1/embeddings", completion(), None, 404, None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_request_gets_openai_error(server: LiveServer, case: tuple[Any, ...]) -> None:
    _, path, body, headers, status, param = case
    hdrs = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    if headers is not None:
        hdrs = {"Content-Type": "application/json", **headers}
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    r = httpx.post(server.base_url + path, content=content, headers=hdrs, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param, err
    assert err["code"] == status
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in r.text


def test_oversized_body_gets_413(server: LiveServer) -> None:
    big = json.dumps(completion(prompt="a" * 2_000_000))
    r = httpx.post(server.base_url + C, content=big, headers={**server.headers, "Content-Type": "application/json"})
    assert r.status_code == 413
    assert r.json()["error"]["param"] == "body"

    def chunks():  # no Content-Length: the limit must hold while reading
        for _ in range(40):
            yield b" " * 50_000
        yield json.dumps(completion()).encode()

    r = httpx.post(server.base_url + C, content=chunks(), headers={**server.headers, "Content-Type": "application/json"})
    assert r.status_code in (400, 413)
    assert r.json()["error"]["param"] == "body"


def test_health_is_open_and_other_routes_need_the_key(server: LiveServer) -> None:
    assert httpx.get(server.base_url + "/health").status_code == 200
    for path in ("/v1/models", "/metrics", "/version", "/openapi.json"):
        assert httpx.get(server.base_url + path).status_code == 401, path
        assert httpx.get(server.base_url + path, headers=server.headers).status_code == 200, path


def test_a_valid_request_after_the_bad_ones_still_works(server: LiveServer) -> None:
    with server.client() as c:
        r = c.post(C, json=completion(extra_unknown_field={"ignored": True}))
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")


# ---- settings: flags and --config files name the key at fault ----------------------------------------------

def _parse(argv: list[str]):
    import argparse

    from hetserve.server.settings import add_settings_arguments, settings_from_args

    p = argparse.ArgumentParser()
    add_settings_arguments(p)
    return settings_from_args(p.parse_args(argv))


def test_async_scheduling_flag_reaches_the_engine_config(tiny_llama_dir) -> None:
    auto = _parse([str(tiny_llama_dir)]).engine_config()
    on = _parse([str(tiny_llama_dir), "--async-scheduling"]).engine_config()
    off = _parse([str(tiny_llama_dir), "--no-async-scheduling"]).engine_config()
    assert (auto.scheduler.async_scheduling, on.scheduler.async_scheduling, off.scheduler.async_scheduling) == (
        None, True, False)
    g = _parse([str(tiny_llama_dir), "--enforce-eager", "--cuda-graph-max-batch", "64",
                "--piecewise-graph-max-tokens", "0"]).engine_config().device
    assert (g.enforce_eager, g.cuda_graph_max_batch, g.piecewise_graph_max_tokens) == (True, 64, 0)
    assert (on.device.cuda_graph_max_batch, on.device.piecewise_graph_max_tokens) == (512, 1024)


def test_config_file_then_flags(tmp_path) -> None:
    cfg = tmp_path / "s.yaml"
    cfg.write_text("max_num_seqs: 8\nport: 9001\nserved_model_name: [a, b]\nenable_prefix_caching: false\n")
    s = _parse(["MODEL", "--config", str(cfg), "--port", "9002"])
    assert (s.model, s.max_num_seqs, s.port, s.model_names, s.enable_prefix_caching) == ("MODEL", 8, 9002, ("a", "b"),
                                                                                          False)
    cfg_json = tmp_path / "s.json"
    cfg_json.write_text(json.dumps({"max_model_len": 128, "api_key": "k"}))
    s = _parse(["--config", str(cfg_json)])
    assert (s.model, s.max_model_len, s.api_key, s.model_names) == (None, 128, "k", ("tiny-llama",))
    assert _parse([]).host == "127.0.0.1"


@pytest.mark.parametrize(
    "text, key",
    [
        ("max_num_seqs: 8\nmax_num_sequences: 4\n", "max_num_sequences"),
        ("max-num-seqs: 8\n", "max-num-seqs"),
        ("max_num_seqs: eight\n", "max_num_seqs"),
        ("max_num_seqs: 0\n", "max_num_seqs"),
        ("port: 70000\n", "port"),
        ("enable_prefix_caching: 1\n", "enable_prefix_caching"),
        ("served_model_name: [a, 3]\n", "served_model_name"),
        ("dtype: float8\n", "dtype"),
        ("- just\n- a list\n", "config"),
        ("max_num_seqs: [\n", "config"),
    ],
)
def test_bad_config_files_name_the_key(tmp_path, text: str, key: str) -> None:
    from hetserve.core.errors import ValidationError

    cfg = tmp_path / "bad.yaml"
    cfg.write_text(text)
    with pytest.raises(ValidationError) as info:
        _parse(["--config", str(cfg)])
    assert info.value.field == key


def test_chat_template_flag_reads_a_file_or_takes_inline_jinja(tmp_path) -> None:
    from hetserve.core.errors import ValidationError
    from hetserve.server.settings import resolve_chat_template

    f = tmp_path / "t.jinja"
    f.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert resolve_chat_template(str(f)) == f.read_text()
    assert resolve_chat_template("{{ messages[0].content }}") == "{{ messages[0].content }}"
    assert resolve_chat_template("tool_use") == "tool_use"  # a template name of the model
    with pytest.raises(ValidationError) as info:
        resolve_chat_template(str(tmp_path / "missing.jinja"))
    assert info.value.field == "chat_template"


def test_flags_reach_the_engine_config() -> None:
    s = _parse(["/m", "--max-model-len", "512", "--max-num-seqs", "3", "--max-num-batched-tokens", "64",
                "--max-queued-requests", "5", "--block-size", "32", "--num-blocks", "40", "--device", "cpu",
                "--dtype", "float32", "--seed", "9", "--served-model-name", "x", "--no-enable-prefix-caching",
                "--chat-template", "{{ messages }}"])
    c = s.engine_config()
    assert c.model == "/m" and c.served_model_name == "x" and c.chat_template == "{{ messages }}"
    assert (c.scheduler.max_model_len, c.scheduler.max_num_seqs, c.scheduler.max_num_batched_tokens,
            c.scheduler.max_queued_requests) == (512, 3, 64, 5)
    assert (c.cache.block_size, c.cache.num_blocks, c.cache.enable_prefix_caching) == (32, 40, False)
    assert (c.device.device, c.device.dtype, c.device.seed) == ("cpu", "float32", 9)
