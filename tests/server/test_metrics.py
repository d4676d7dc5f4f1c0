"""/metrics: vLLM's metric names under ``hetserve:``, labelled with the model name, moving by the expected amounts."""

from __future__ import annotations

import json

import httpx
from prometheus_client.parser import text_string_to_metric_families

from hetserve.server.metrics import ServerMetrics
from tests.server.conftest import MODEL_NAME, LiveServer

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

EXPECTED_FAMILIES = {
    "hetserve:time_to_first_token_seconds", "hetserve:inter_token_latency_seconds",
    "hetserve:e2e_request_latency_seconds", "hetserve:request_queue_time_seconds", "hetserve:num_requests_running",
    "hetserve:num_requests_waiting", "hetserve:kv_cache_usage_perc", "hetserve:prompt_tokens",
    "hetserve:generation_tokens", "hetserve:request_success",
}


def scrape(server: LiveServer) -> Samples:
    r = httpx.get(server.base_url + "/metrics", headers=server.headers)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted({"model_name": MODEL_NAME, **labels}.items()))), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


def test_every_metric_is_exposed_with_the_model_label(server: LiveServer) -> None:
    text = httpx.get(server.base_url + "/metrics", headers=server.headers).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert EXPECTED_FAMILIES <= set(families)
    for name in EXPECTED_FAMILIES:
        assert all(s.labels.get("model_name") == MODEL_NAME for s in families[name].samples), name


def test_counters_and_histograms_move_by_the_expected_amounts(server: LiveServer) -> None:
    before = scrape(server)
    prompt = list(range(20, 27))
    with server.client() as c:
        r1 = c.post("/v1/completions", json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": 5, "n": 2,
                                             "ignore_eos": True})
        assert r1.status_code == 200
        with c.stream("POST", "/v1/chat/completions", json={
            "model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True},
        }) as r2:
            events = [ln[6:] for ln in r2.iter_lines() if ln.startswith("data: ")]
        chat_prompt_tokens = json.loads(events[-2])["usage"]["prompt_tokens"]
        # every token id is a stop token: the request stops at its first token
        r3 = c.post("/v1/completions", json={"model": MODEL_NAME, "prompt": prompt, "max_tokens": 5,
                                             "stop_token_ids": list(range(server.engine.model_config.vocab_size))})
        assert r3.json()["choices"][0]["finish_reason"] == "stop"
    server.wait_idle()
    after = scrape(server)

    assert delta(before, after, "hetserve:prompt_tokens_total") == len(prompt) + chat_prompt_tokens + len(prompt)
    assert delta(before, after, "hetserve:generation_tokens_total") == 2 * 5 + 3 + 1
    assert delta(before, after, "hetserve:request_success_total", finished_reason="length") == 3
    assert delta(before, after, "hetserve:request_success_total", finished_reason="stop") == 1
    assert delta(before, after, "hetserve:request_success_total", finished_reason="abort") == 0
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds"):
        assert delta(before, after, f"hetserve:{name}_count") == 3, name
    # one gap per token after a sequence's first: 2 x (5 - 1) + (3 - 1) + 0
    assert delta(before, after, "hetserve:inter_token_latency_seconds_count") == 10
    ttft_sum = delta(before, after, "hetserve:time_to_first_token_seconds_sum")
    e2e_sum = delta(before, after, "hetserve:e2e_request_latency_seconds_sum")
    assert 0 < ttft_sum <= e2e_sum
    # idle again: nothing running or waiting, no block held
    assert value(after, "hetserve:num_requests_running") == 0
    assert value(after, "hetserve:num_requests_waiting") == 0
    assert value(after, "hetserve:kv_cache_usage_perc") == 0


def test_registries_are_per_server() -> None:
    a, b = ServerMetrics("a"), ServerMetrics("b")  # the same names twice: no clash
    a.generation_tokens.inc(3)
    assert b'hetserve:generation_tokens_total{model_name="a"} 3.0' in a.render()
    assert b'model_name="a"' not in b.render()
