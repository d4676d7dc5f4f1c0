"""``hetserve serve --cluster cpu-pair``: the OpenAI server over worker processes (one paced at half speed,
emulated), through the ``openai`` SDK. The reference is the single-process engine's greedy output; a strategy
the runtime cannot run yet (``server.cluster.runtime_support``) is skipped with the runtime's reason, and runs
as soon as the runtime supports it. Tests that start workers are ``slow`` (each server start spawns 2-3 Python
processes); the config checks are not.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import yaml

from hetserve import LLM, SamplingParams
from hetserve.core.errors import ValidationError
from hetserve.server.cluster import attention_devices, runtime_support
from hetserve.server.launch import ServerThread, create_engine
from hetserve.server.settings import ServerSettings, add_settings_arguments, settings_from_args
from tests.server.conftest import MAX_MODEL_LEN, MODEL_NAME, LiveServer, settings_for

PROMPTS = ["The quick brown fox", "Once upon a time", "def fibonacci(n):"]
CHAT = [{"role": "user", "content": "Name a colour."}]
STRATEGIES = ("dp", "pp", "pd", "cronus", "hetis")
CPU_PAIR = Path(__file__).resolve().parents[2] / "examples" / "clusters" / "cpu-pair.yaml"


def greedy(max_tokens: int, **kw: object) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def model(tiny_llama_dir: Path) -> Path:
    return tiny_llama_dir


@pytest.fixture(scope="module")
def reference(model: Path) -> dict[str, object]:
    llm = LLM(str(model), max_model_len=MAX_MODEL_LEN, num_blocks=64, device="cpu", dtype="float32")
    batch = llm.generate(PROMPTS, greedy(10))
    return {
        "batch": [o.outputs[0].text for o in batch],
        "batch_tokens": [len(o.outputs[0].token_ids) for o in batch],
        "chat": llm.chat(CHAT, greedy(8))[0].outputs[0].text,
        "stream": llm.generate(PROMPTS[1], greedy(20, ignore_eos=True))[0].outputs[0].text,
        "long": llm.generate(PROMPTS[0], greedy(80, ignore_eos=True))[0].outputs[0].text,
        # sampling state that must survive hand-offs between instances: seeds, penalties, min_tokens
        "seeded": llm.generate(PROMPTS[2], SamplingParams(temperature=1.0, seed=11, max_tokens=12))[0].outputs[0].text,
        "penalised": llm.generate(PROMPTS[2], greedy(12, repetition_penalty=1.4, frequency_penalty=0.5,
                                                     min_tokens=12))[0].outputs[0].text,
        # the sampled tokens' logprobs and the top 2 at each position (across hand-offs too)
        "logprobs": llm.generate(PROMPTS[0], greedy(8, logprobs=2))[0].outputs[0].logprobs,
    }


def _start(model: Path, **overrides: object) -> ServerThread:
    return ServerThread(settings_for(model, cluster="cpu-pair", **overrides)).start()


@pytest.fixture(scope="module", params=STRATEGIES)
def cluster_server(request: pytest.FixtureRequest, model: Path) -> Iterator[ServerThread]:
    reason = runtime_support(request.param)
    if reason is not None:
        pytest.skip(f"the runtime cannot run {request.param} yet: {reason}")
    thread = _start(model, strategy=request.param)
    try:
        yield thread
    finally:
        thread.stop()


def _client(thread: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{thread.base_url}/v1", api_key="none", max_retries=0, timeout=60)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


# ---- every strategy: same greedy text as one device, streaming, 400s, /health, /metrics ---------------------


@pytest.mark.slow  # worker processes
def test_greedy_equals_one_device(cluster_server: ServerThread, reference: dict) -> None:
    with _client(cluster_server) as c:
        r = c.completions.create(model=MODEL_NAME, prompt=PROMPTS, max_tokens=10, temperature=0.0)
        assert [ch.text for ch in sorted(r.choices, key=lambda ch: ch.index)] == reference["batch"]
        assert r.usage is not None and r.usage.completion_tokens == sum(reference["batch_tokens"])
        chat = c.chat.completions.create(model=MODEL_NAME, messages=CHAT, max_tokens=8, temperature=0.0)
        assert chat.choices[0].message.content == reference["chat"]
        seeded = c.completions.create(model=MODEL_NAME, prompt=PROMPTS[2], max_tokens=12, temperature=1.0, seed=11)
        assert seeded.choices[0].text == reference["seeded"]
        pen = c.completions.create(model=MODEL_NAME, prompt=PROMPTS[2], max_tokens=12, temperature=0.0,
                                   frequency_penalty=0.5, extra_body={"repetition_penalty": 1.4, "min_tokens": 12})
        assert pen.choices[0].text == reference["penalised"]
        lp = c.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=8, temperature=0.0, logprobs=2)
        got = lp.choices[0].logprobs
        want = reference["logprobs"]
        assert got is not None and len(got.token_logprobs) == len(want)
        for g, w, top in zip(got.token_logprobs, want, got.top_logprobs, strict=True):
            assert g == pytest.approx(w.logprob, abs=1e-4)
            assert sorted(top.values(), reverse=True) == pytest.approx(w.top_logprobs, abs=1e-4)


@pytest.mark.slow  # worker processes
def test_streaming(cluster_server: ServerThread, reference: dict) -> None:
    with _client(cluster_server) as c:
        stream = c.completions.create(model=MODEL_NAME, prompt=PROMPTS[1], max_tokens=20, temperature=0.0,
                                      stream=True, stream_options={"include_usage": True},
                                      extra_body={"ignore_eos": True})
        chunks = list(stream)
    text_chunks = [ch for ch in chunks if ch.choices]
    assert len(text_chunks) > 1  # the text arrives in pieces, not at the end
    assert "".join(ch.choices[0].text for ch in text_chunks) == reference["stream"]
    assert text_chunks[-1].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 20

    # a client that goes away mid-stream: its request is aborted on whichever instance holds it, no block leaks
    body = {"model": MODEL_NAME, "prompt": PROMPTS[0], "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=cluster_server.base_url, timeout=30) as h, h.stream("POST", "/v1/completions",
                                                                                  json=body) as r:
        next(_sse(r))
    eng = cluster_server.engine.engine.cluster_engine
    deadline = time.monotonic() + 10
    while cluster_server.engine.has_work or any(f != u for f, u in eng.free_blocks().values()):
        assert time.monotonic() < deadline, f"not idle: {eng.free_blocks()}"
        time.sleep(0.02)


@pytest.mark.slow  # worker processes
def test_unsupported_features_are_400_naming_the_field(cluster_server: ServerThread) -> None:
    base = {"model": MODEL_NAME, "prompt": PROMPTS[0], "max_tokens": 4}
    cases = [
        ("/v1/completions", {**base, "n": 2}, "n"),
        ("/v1/completions", {**base, "n": 2, "best_of": 2}, "n"),
        ("/v1/completions", {**base, "prompt": [1, 2, 10**6]}, "prompt"),  # would crash a worker's embedding
    ]
    with httpx.Client(base_url=cluster_server.base_url, timeout=30) as h:
        for path, body, param in cases:
            r = h.post(path, json=body)
            assert r.status_code == 400, (body, r.text)
            err = r.json()["error"]
            assert err["param"] == param and err["type"] == "invalid_request_error" and err["code"] == 400
        assert h.get("/health").json()["status"] == "ok"  # none of it reached (or hurt) a worker
    with _client(cluster_server) as c, pytest.raises(openai.BadRequestError, match="n=1"):
        c.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=4, n=3)


@pytest.mark.slow  # worker processes
def test_health_and_metrics_list_the_instances(cluster_server: ServerThread) -> None:
    dep = cluster_server.engine.engine.cluster_engine.deployment
    with httpx.Client(base_url=cluster_server.base_url, timeout=30) as h:
        done = h.post("/v1/completions", json={"model": MODEL_NAME, "prompt": PROMPTS[0], "max_tokens": 3,
                                               "ignore_eos": True})
        assert done.status_code == 200
        r = h.get("/health")
        metrics = h.get("/metrics").text
    samples = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in metrics.splitlines() if ln[:1] != "#"}
    # the server-wide series are kept as on one device
    assert samples['hetserve:time_to_first_token_seconds_count{model_name="tiny"}'] >= 1
    assert samples['hetserve:request_success_total{finished_reason="length",model_name="tiny"}'] >= 1
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["strategy"] == cluster_server.settings.strategy
    assert [i["name"] for i in body["instances"]] == list(dep.plans)
    for inst in body["instances"]:
        plan = dep.plans[inst["name"]]
        attention = attention_devices(cluster_server.engine.engine.cluster_engine, inst["name"])  # Hetis
        assert inst["role"] == plan.role and inst["device_ids"] == [*plan.device_ids, *attention]
        assert inst["alive"] is True and inst["dead_reason"] is None
        assert all(_alive(p) for p in inst["pids"]) and inst["pid"] in inst["pids"]
        assert "paced to" in inst["emulation"]  # cpu-pair's partitions are declared emulated
        line = f'hetserve:instance_alive{{device="{inst["device"]}",instance="{inst["name"]}"'
        assert any(ln.startswith(line) and ln.endswith(" 1.0") for ln in metrics.splitlines()), line


# ---- faults --------------------------------------------------------------------------------------------------


def _sse(r: httpx.Response) -> Iterator[str]:
    for ln in r.iter_lines():
        if ln.startswith("data: "):
            yield ln[len("data: "):]


def _wait_health(h: httpx.Client, ok: object, timeout_s: float = 10.0) -> httpx.Response:
    deadline = time.monotonic() + timeout_s
    while True:
        r = h.get("/health")
        if ok(r) or time.monotonic() > deadline:  # type: ignore[operator]
            return r
        time.sleep(0.05)


@pytest.mark.slow  # worker processes
def test_killed_worker_is_reported_and_survivors_serve(model: Path, reference: dict) -> None:
    thread = _start(model, strategy="pd")
    try:
        with httpx.Client(base_url=thread.base_url, timeout=60) as h:
            pids = {i["name"]: i["pid"] for i in h.get("/health").json()["instances"]}
            body = {"model": MODEL_NAME, "prompt": PROMPTS[0], "max_tokens": 80, "temperature": 0.0,
                    "ignore_eos": True, "stream": True}
            # the decode worker dies under a streamed request: it completes (retried on the survivor, from the
            # tokens already sent) or ends with an explicit error event, never a wrong or truncated answer
            with h.stream("POST", "/v1/completions", json=body) as r:
                events = _sse(r)
                first = json.loads(next(events))
                os.kill(pids["decode0"], signal.SIGKILL)
                rest = list(events)
            assert rest[-1] == "[DONE]"
            payloads = [first] + [json.loads(e) for e in rest[:-1]]
            if "error" in payloads[-1]:
                assert payloads[-1]["error"]["code"] == 503 and "decode0" in payloads[-1]["error"]["message"]
            else:
                assert "".join(p["choices"][0]["text"] for p in payloads) == reference["long"]
                assert payloads[-1]["choices"][0]["finish_reason"] == "length"

            r = _wait_health(h, lambda r: not {i["name"]: i for i in r.json()["instances"]}["decode0"]["alive"])
            assert r.status_code == 200
            health = r.json()
            assert health["status"] == "degraded" and "decode0" in health["message"]
            dead = {i["name"]: i for i in health["instances"]}["decode0"]
            assert dead["alive"] is False and dead["pid"] == pids["decode0"] and "decode0" in dead["dead_reason"]
            assert 'instance="decode0",model_name="tiny",role="decode"} 0.0' in h.get("/metrics").text

            # new requests are served whole by the surviving prefill instance
            ok = h.post("/v1/completions", json={**body, "stream": False, "max_tokens": 10, "ignore_eos": False})
            assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == reference["batch"][0]

            os.kill(pids["prefill0"], signal.SIGKILL)
            r = _wait_health(h, lambda r: r.status_code == 503)
            assert r.status_code == 503
            err = r.json()["error"]
            assert err["code"] == 503 and "prefill0" in err["message"] and "decode0" in err["message"]
            failed = h.post("/v1/completions", json={**body, "stream": False, "max_tokens": 4})
            assert failed.status_code == 503 and "no healthy instance" in failed.json()["error"]["message"]
    finally:
        thread.stop()
    assert not any(_alive(p) for p in pids.values())


# ---- config files: what hetserve plan writes, and errors naming the key --------------------------------------


def _parse(argv: list[str]) -> ServerSettings:
    p = argparse.ArgumentParser()
    add_settings_arguments(p)
    return settings_from_args(p.parse_args(argv))


@pytest.mark.slow  # worker processes
def test_serve_the_plan_file(tmp_path: Path, model: Path, reference: dict) -> None:
    from hetserve.cli.main import main

    # a small memory keeps the planner's simulated KV pools small (the simulator builds every block)
    cluster = yaml.safe_load(CPU_PAIR.read_text())
    cluster["emulation"]["of"]["memory_gb"] = 1.2  # a CPU device reserves 1 GiB for activations and runtime
    (tmp_path / "clusters").mkdir()
    (tmp_path / "clusters" / "pair.yaml").write_text(yaml.safe_dump(cluster))
    plan = tmp_path / "out" / "plan.yaml"
    plan.parent.mkdir()
    code = main(["plan", "--cluster", str(tmp_path / "clusters" / "pair.yaml"), "--model", str(model),
                 "--workload", "fixed:input=24,output=8", "--slo", "ttft_ms=2000,tpot_ms=200", "--strategies", "pd",
                 "--per-strategy", "1", "--workers", "1", "--window-s", "1", "--max-requests", "8",
                 "--max-model-len", "256", "--dtype", "float32", "--output", str(plan)])
    assert code == 0
    written = yaml.safe_load(plan.read_text())
    assert written["strategy"] == "pd" and not Path(written["model"]).is_absolute()  # relative to the plan file

    # the file as hetserve plan wrote it; only where to listen and what to call the model come as flags
    s = _parse(["--config", str(plan), "--port", "0", "--served-model-name", MODEL_NAME,
                "--uvicorn-log-level", "warning"])
    assert (s.strategy, s.instances, s.max_model_len, s.dtype) == ("pd", written["instances"], 256, "float32")
    assert s.cluster == str(tmp_path / "clusters" / "pair.yaml") and s.predicted == written["predicted"]
    assert Path(s.model).resolve() == model.resolve()
    with ServerThread(s) as thread, _client(thread) as c:
        names = [i["name"] for i in httpx.get(thread.base_url + "/health").json()["instances"]]
        assert names == [i["name"] for i in written["instances"]]
        r = c.completions.create(model=MODEL_NAME, prompt=PROMPTS[0], max_tokens=10, temperature=0.0)
        assert r.choices[0].text == reference["batch"][0]

    # a plan made for a model's shapes only (a folder holding config.json): refused, naming model and --model,
    # before any worker starts; --model DIR overrides it
    shapes = tmp_path / "shapes"
    shapes.mkdir()
    (shapes / "config.json").write_text((model / "config.json").read_text())
    for spec in (str(shapes), str(shapes / "config.json")):
        shaped = plan.with_name(f"plan-{Path(spec).name}.yaml")
        shaped.write_text(yaml.safe_dump({**written, "model": spec}))
        with pytest.raises(ValidationError) as e:
            create_engine(_parse(["--config", str(shaped)]))
        assert e.value.field == "model" and "--model DIR" in e.value.message
        assert _parse(["--config", str(shaped), "--model", str(model)]).model == str(model)


@pytest.mark.parametrize("text,key", [
    ("cluster: cpu-pair\nbogus: 1\n", "bogus"),
    ("cluster: cpu-pair\nstrategy: tp\n", "strategy"),
    ("strategy: pd\n", "strategy"),
    ("instances: [{name: a, devices: ['host:0']}]\n", "instances"),
    ("cluster: cpu-pair\ninstances: oops\n", "instances"),
    ("cluster: cpu-pair\nstrategy: cronus\ntbt_slo_ms: -5\n", "tbt_slo_ms"),
    ("cluster: cpu-pair\nmodel: {hidden_size: 64}\n", "model"),
    ("cluster: [1, 2]\n", "cluster"),
])
def test_config_errors_name_the_key(tmp_path: Path, text: str, key: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(ValidationError) as e:
        _parse(["--config", str(cfg)])
    assert e.value.field == key


@pytest.mark.parametrize("text,key", [
    ("cluster: no-such-cluster\n", "cluster"),
    ("cluster: cpu-pair\nstrategy: pd\ninstances: [{name: a, role: prefill, devices: ['host:9']}]\n",
     "instances[0].devices"),
    ("cluster: cpu-pair\nstrategy: pd\ninstances: [{name: a, role: mixed, devices: ['host:0']}]\n",
     "instances[0].role"),
    ("cluster: cpu-pair\nstrategy: pd\ninstances: [{name: a, role: prefill, devices: ['host:0'], gpus: 2}]\n",
     "instances[0].gpus"),
])
def test_deployment_errors_name_the_key_before_workers_start(tmp_path: Path, model: Path, text: str,
                                                             key: str) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(ValidationError) as e:
        create_engine(_parse([str(model), "--config", str(cfg)]))
    assert e.value.field == key


def test_cluster_keys_from_a_settings_file(tmp_path: Path) -> None:
    cfg = tmp_path / "s.yaml"
    cfg.write_text("cluster: cpu-pair\nstrategy: cronus\nsplit_policy: {kind: fixed, k: 16}\nmax_num_seqs: 8\n")
    s = _parse(["M", "--config", str(cfg), "--strategy", "pd"])  # the flag wins over the file
    assert (s.cluster, s.strategy, s.split_policy, s.max_num_seqs) == ("cpu-pair", "pd", {"kind": "fixed", "k": 16}, 8)
    assert s.deployment_params() == {"split_policy": {"kind": "fixed", "k": 16}}
    with pytest.raises(ValidationError, match="give it once") as e:
        _parse(["A", "--model", "B"])
    assert e.value.field == "model"


def test_single_device_health_lists_itself(server: LiveServer) -> None:
    r = httpx.get(server.base_url + "/health")  # no API key: /health stays open
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "instances": [{"name": "engine", "role": "mixed", "device": "cpu",
                                                        "alive": True, "pid": os.getpid()}]}


def test_settings_with_a_deployment_round_trip_as_a_config_file(tmp_path: Path) -> None:
    s = ServerSettings(model="M", cluster="cpu-pair", strategy="cronus", split_policy={"kind": "fixed", "k": 8},
                       instances=[{"name": "main0", "role": "main", "devices": ["host:0"]}], tbt_slo_ms=50)
    cfg = tmp_path / "s.json"
    cfg.write_text(json.dumps(dataclasses.asdict(s)))  # what hetserve demo writes next to its results
    assert _parse(["--config", str(cfg)]) == s


# ---- the demo table --------------------------------------------------------------------------------------------


@pytest.mark.slow  # worker processes
def test_demo_table_names_emulation_and_what_is_missing(model: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from hetserve.cli import demo_cluster
    from hetserve.server import cluster as server_cluster

    # two strategies keep it short; a third is reported missing, as a runtime without it would be
    monkeypatch.setattr(demo_cluster, "STRATEGIES", ("dp", "pd", "pp"))
    real = server_cluster.runtime_support
    monkeypatch.setattr(server_cluster, "runtime_support", lambda s: "no stages here" if s == "pp" else real(s))
    code = demo_cluster.run_cluster_demo(argparse.Namespace(model=str(model), cluster="cpu-pair", num_prompts=6))
    out = capsys.readouterr().out
    assert code == 0
    rows = {ln.split()[0]: ln for ln in out.splitlines() if ln.split() and ln.split()[0] in ("dp", "pd", "pp")}
    assert "paced at 0.5x, emulated" in rows["dp"] and "decode0 decode cpu-half paced at 0.5x" in rows["pd"]
    assert rows["pp"].split(None, 1)[1] == "not run: no stages here"
    for s in ("dp", "pd"):
        ttft50, ttft99, tpot50, tpot99, tok_s, req_s, goodput, errors = (float(x) for x in rows[s].split()[1:9])
        assert 0 < ttft50 <= ttft99 and 0 < tpot50 <= tpot99 and tok_s > 0 and errors == 0
        assert 0 <= goodput <= req_s  # no more requests/s within the SLO than finished at all
