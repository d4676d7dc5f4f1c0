"""Hetis over real processes: a main worker keeps some KV heads, attention workers (``attn_worker.py``, on the
host CPU) hold the rest; heads are re-dispatched between steps.

The reference is the single-process engine's greedy output (``LLM(model, device="cpu", dtype="float32")``).
The model has 8 query heads over 4 KV heads (GQA group 2), so "some", "all" and "none" offloaded and moves
between two workers are all possible.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest
import torch

from hetserve.core.cluster import load_cluster
from hetserve.core.model_config import ModelConfig
from hetserve.core.sampling_params import SamplingParams
from hetserve.engine.attention import AttentionMetadata, TorchRefBackend
from hetserve.engine.attention.head_split import HeadSplitBackend, LocalHeads, head_ranges
from hetserve.kernels import HAS_TRITON
from hetserve.llm import LLM
from hetserve.runtime.hetis_main import AttnWorkerClient
from hetserve.runtime.hetis_messages import AttnSpec, AttnWorkerConf, HetisSpec
from hetserve.runtime.hetis_wire import AttnLinkError, FrameSocket
from hetserve.runtime.worker import WorkerSpec, decode_cmd, encode_msg
from tests.runtime.helpers import process_alive

MAX_LEN = 256
PROMPTS = [[1 + (i * 7 + j) % 500 for j in range(5 + i * 9)] for i in range(4)]
SP = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
TRIO = {"name": "cpu-trio", "nodes": [{"name": "host", "devices": [{"type": "cpu", "cores": 1, "memory_gb": 4,
                                                                     "count": 3}]}]}


@pytest.fixture(scope="module")
def model(tiny_model_factory) -> str:
    return str(tiny_model_factory("llama", num_heads=8, num_kv_heads=4))


def _hetis(model: str, cluster, workers: list[dict], extra: list[dict] | None = None, **kw) -> LLM:
    insts = [{"name": "main0", "role": "main", "devices": ["host:0"], "workers": workers}, *(extra or [])]
    return LLM(model, cluster=cluster, strategy="hetis", instances=insts, max_model_len=MAX_LEN, num_kv_blocks=64,
               deployment_params=kw.pop("deployment_params", {"redispatch_every_steps": 0}), **kw)


@pytest.fixture(scope="module")
def one_worker(model: str):
    llm = _hetis(model, "cpu-pair", [{"device": "host:1", "kv_heads": 2}])
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def two_workers(model: str):
    llm = _hetis(model, TRIO, [{"device": "host:1", "kv_heads": 1}, {"device": "host:2", "kv_heads": 2}])
    yield llm
    llm.shutdown()


def _tokens(llm: LLM) -> list[list[int]]:
    outs = llm.generate(PROMPTS, SP)
    assert all(o.outputs[0].finish_reason == "length" for o in outs), [o.outputs[0].stop_reason for o in outs]
    return [o.outputs[0].token_ids for o in outs]


def _check_split(llm: LLM, assignment: tuple[int, ...], num_kv_heads: int = 4) -> None:
    """The worker reports the split, its local cache holds the kept heads only, nothing leaks."""
    eng = llm.engine
    info = eng.hetis.info["main0"]
    kept, ranges = head_ranges(num_kv_heads, assignment)
    assert tuple(info.assignment) == assignment and info.num_kept_heads == kept
    assert info.local_cache_shape[3] == kept
    assert info.local_kv_bytes_per_token * num_kv_heads == info.full_kv_bytes_per_token * kept
    assert [tuple(h) for h in info.worker_heads] == [(s, n) for s, n in ranges]
    for name, (free, usable) in eng.free_blocks().items():
        assert free == usable, f"{name} leaks {usable - free} blocks"


def _force_now(llm: LLM, *plan: tuple[int, tuple[int, ...]]) -> None:
    h = llm.engine.hetis
    for after, a in plan:
        h.force("main0", h.steps["main0"] + after, a)


# ---- the backend alone -------------------------------------------------------------------------------


def _meta(before: list[int], new: list[int], tables: list[list[int]], bs: int) -> AttentionMetadata:
    pos, slots, qsl = [], [], [0]
    for s, (b, n) in enumerate(zip(before, new)):
        for p in range(b, b + n):
            pos.append(p)
            slots.append(tables[s][p // bs] * bs + p % bs)
        qsl.append(qsl[-1] + n)
    seq = [b + n for b, n in zip(before, new)]
    return AttentionMetadata(
        num_tokens=len(pos), num_seqs=len(seq), positions=torch.tensor(pos), slot_mapping=torch.tensor(slots),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32), seq_lens=torch.tensor(seq, dtype=torch.int32),
        block_tables=torch.tensor(tables, dtype=torch.int32), max_query_len=max(new), max_seq_len=max(seq),
        query_start_loc_cpu=qsl, seq_lens_cpu=seq)


@pytest.mark.parametrize("assignment", [(0,), (1,), (4,), (1, 2), (2, 2), (0, 3)])
@pytest.mark.parametrize("window", [None, 3])
def test_head_split_backend_equals_plain_backend(assignment: tuple[int, ...], window: int | None) -> None:
    torch.manual_seed(0)
    H, K, D, bs, nb, L = 8, 4, 8, 4, 16, 2
    plain = TorchRefBackend("cpu")
    kept, ranges = head_ranges(K, assignment)
    full = [torch.zeros(2, nb, bs, K, D) for _ in range(L)]
    local = [torch.zeros(2, nb, bs, kept, D) for _ in range(L)]
    holders = [LocalHeads(TorchRefBackend("cpu"), [torch.zeros(2, nb, bs, n, D) for _ in range(L)], s)
               for s, n in ranges]
    split = HeadSplitBackend(plain, H, K, local, holders)
    tables, lens = [[1, 2, 3, 4], [5, 6, 7, 8]], [0, 0]
    for new in ([5, 9], [1, 1], [3, 1], [1, 1]):  # prefill, decode, a chunk beside a decode, decode
        meta = _meta(lens, new, tables, bs)
        for layer in range(L):
            q, k, v = (torch.randn(meta.num_tokens, n, D) for n in (H, K, K))
            want = plain.forward(q, k, v, full[layer], meta, 0.35, window)
            got = split.forward(q, k, v, local[layer], meta, 0.35, window)
            assert got.shape == want.shape and (got - want).abs().max().item() < 1e-5
        lens = [a + b for a, b in zip(lens, new)]
    for layer in range(L):  # each holder's cache is exactly its heads' slice of the full cache
        assert local[layer].shape[3] == kept and torch.equal(local[layer], full[layer][:, :, :, :kept])
        for h in holders:
            assert torch.equal(h.caches[layer], full[layer][:, :, :, h.head_start : h.head_start + h.num_heads])


@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_head_split_over_the_triton_backend() -> None:
    """The GPU backend (interpreted on CPU tensors) as the inner backend and on the holders."""
    from hetserve.engine.attention import TritonAttentionBackend

    torch.manual_seed(1)
    H, K, D, bs, nb = 8, 4, 16, 4, 16
    kept, ranges = head_ranges(K, (1, 2))
    full, local = torch.zeros(2, nb, bs, K, D), torch.zeros(2, nb, bs, kept, D)
    holders = [LocalHeads(TritonAttentionBackend("cpu"), [torch.zeros(2, nb, bs, n, D)], s) for s, n in ranges]
    split = HeadSplitBackend(TritonAttentionBackend("cpu"), H, K, [local], holders)
    lens = [0, 0]
    for new in ([5, 9], [1, 1]):
        meta = _meta(lens, new, [[1, 2, 3, 4], [5, 6, 7, 8]], bs)
        q, k, v = (torch.randn(meta.num_tokens, n, D) for n in (H, K, K))
        want = TorchRefBackend("cpu").forward(q, k, v, full, meta, 0.3, None)
        assert (split.forward(q, k, v, local, meta, 0.3, None) - want).abs().max().item() < 1e-5
        lens = [a + b for a, b in zip(lens, new)]


def test_head_split_rejects_a_split_that_does_not_tile_the_heads() -> None:
    local = [torch.zeros(2, 4, 4, 1, 8)]
    gap = LocalHeads(TorchRefBackend("cpu"), [torch.zeros(2, 4, 4, 2, 8)], head_start=2)
    with pytest.raises(ValueError, match="tile"):
        HeadSplitBackend(TorchRefBackend("cpu"), 8, 4, local, [gap])
    with pytest.raises(ValueError, match="does not fit"):
        head_ranges(4, [3, 2])
    with pytest.raises(ValueError, match="not one of its local caches"):
        HeadSplitBackend(TorchRefBackend("cpu"), 8, 4, [torch.zeros(2, 4, 4, 4, 8)], []).forward(
            *(torch.zeros(1, n, 8) for n in (8, 4, 4)), torch.zeros(2, 4, 4, 4, 8), _meta([0], [1], [[1]], 4), 1.0,
            None)


def test_hetis_commands_round_trip_without_pickle() -> None:
    spec = WorkerSpec(name="m", model="x", hetis=HetisSpec(workers=[AttnWorkerConf("host:1")], assignment=[2]))
    data = encode_msg(spec)
    assert b"\x80\x04" not in data[:2]  # not a pickle stream
    from hetserve.runtime.hetis_messages import Redispatch

    assert decode_cmd(encode_msg(Redispatch(seq=3, assignment=[1], block_ids=[4, 5]))).block_ids == [4, 5]


def test_silent_attention_worker_times_out() -> None:
    """A worker that stops answering makes the main side raise after recv_timeout_s, never hang."""
    spec = AttnSpec(name="t", num_layers=1, num_heads=8, num_kv_heads=4, head_dim=8, num_blocks=4, block_size=4,
                    dtype="float32", head_start=0, num_heads_held=4)
    c = AttnWorkerClient(AttnWorkerConf("host:1"), spec, recv_timeout_s=0.5)
    try:
        c.wait_ready(60.0)
        os.kill(c.pid, signal.SIGSTOP)
        c.start_step(_meta([0], [1], [[1]], 4))
        c.send_layer(0, torch.zeros(1, 8, 8), torch.zeros(1, 4, 8), torch.zeros(1, 4, 8), 1.0, None)
        t0 = time.monotonic()
        with pytest.raises(AttnLinkError, match="did not answer"):
            c.recv_layer()
        assert time.monotonic() - t0 < 5.0
        os.kill(c.pid, signal.SIGCONT)
        c.link.close()  # the main side vanishing (killed main worker): the attention worker exits by itself
        assert c.popen.wait(10.0) is not None
    finally:
        if c.popen.poll() is None:
            os.kill(c.pid, signal.SIGCONT)
        c.stop()


def test_frame_socket_reports_a_closed_peer() -> None:
    a, b = socket.socketpair()
    fa = FrameSocket(a, 1.0, "peer")
    b.close()
    with pytest.raises(AttnLinkError, match="closed"):
        fa.recv()
    fa.close()


# ---- planner / builder: the host CPU as an attention device ----------------------------------------------


def test_builder_and_planner_take_a_cpu_attention_worker(tiny_llama_dir: Path) -> None:
    from hetserve.bench.metrics import Slo
    from hetserve.planner.candidates import enumerate_candidates
    from hetserve.planner.profile import load_profile
    from hetserve.strategies.build import build_deployment

    root = Path(__file__).resolve().parents[2]
    mc = ModelConfig.from_path(tiny_llama_dir)
    cl = load_cluster({"name": "h100-host", "nodes": [{"name": "n0", "devices": [
        {"type": "H100-SXM"}, {"type": "cpu", "cores": 2, "memory_gb": 4}]}]})
    prof = load_profile(root / "profiles" / "cpu-tiny-llama.json")
    assert cl.device("n0:1").spec.name == prof.device_name == "cpu-2c"
    cfg = {"strategy": "hetis", "dtype": "float32", "max_model_len": 256,
           "instances": [{"name": "m0", "role": "main", "devices": ["n0:0"], "workers": [{"device": "n0:1",
                                                                                        "kv_heads": 1}]}]}
    dep = build_deployment(cl, mc, cfg, {"cpu-2c": prof})
    d = dep.dispatchers["m0"]
    w = d.workers[0]
    assert w.cost.device.vendor == "cpu" and w.cost.profile is prof and d.assignment == (1,)
    assert dep.plans["m0"].attention_kv_heads == mc.num_key_value_heads - 1
    big = ModelConfig.from_path(root / "examples" / "models" / "llama-3.1-8b")
    host = load_cluster({"name": "h100-cpuhost", "nodes": [{"name": "n0", "devices": [
        {"type": "H100-SXM"}, {"type": "cpu-host"}]}]})
    cands, _ = enumerate_candidates(host, big, {"mean_prompt_tokens": 1000, "p90_prompt_tokens": 2000,
                                                "mean_output_tokens": 200}, Slo(ttft_ms=2000, tpot_ms=100),
                                    strategies=("hetis",))
    workers = [w for c in cands for i in c.config["instances"] for w in i.get("workers", [])]
    assert [w["device"] for w in workers] == ["n0:1"] and isinstance(workers[0]["kv_heads"], int)


# ---- real processes ------------------------------------------------------------------------------------


def test_one_worker_some_all_none_offloaded(one_worker: LLM, reference: list[list[int]]) -> None:
    llm = one_worker
    _check_split(llm, (2,))
    assert _tokens(llm) == reference
    assert llm.engine.hetis.info["main0"].full_kv_bytes_per_token == 2 * 2 * 4 * 8 * 4  # K+V, layers, heads, dim
    for a in [(4,), (0,)]:
        _force_now(llm, (1, a))
        assert _tokens(llm) == reference
        _check_split(llm, a)


def test_one_worker_redispatch_mid_generation_both_ways(one_worker: LLM, reference: list[list[int]]) -> None:
    llm = one_worker
    log = llm.engine.hetis.log
    n = len(log)
    _force_now(llm, (3, (3,)), (6, (1,)))  # heads main -> worker, then worker -> main, while decoding
    assert _tokens(llm) == reference
    _check_split(llm, (1,))
    moves = log[n:]
    assert [m["to"] for m in moves] == [[3], [1]] and all(m["forced"] for m in moves)
    assert all(m["num_blocks"] > 0 and m["moved_bytes"] > 0 for m in moves)


def test_dispatcher_decision_is_carried_out(one_worker: LLM, reference: list[list[int]]) -> None:
    """All heads on the half-speed worker: the strategy's own rebalance (every 2 steps) brings heads back."""
    llm = one_worker
    dep, log = llm.engine.deployment, llm.engine.hetis.log
    d = dep.dispatchers["main0"]
    _force_now(llm, (1, (4,)))
    n, n_sim = len(log), len(dep.redispatch_log)
    dep.redispatch_every_steps = 2
    try:
        assert _tokens(llm) == reference
    finally:
        dep.redispatch_every_steps = 0
    auto = [m for m in log[n:] if not m["forced"]]
    assert auto and auto[0]["from"] == [4] and len(dep.redispatch_log) - n_sim == len(auto)
    _check_split(llm, tuple(d.assignment))


def test_two_workers(two_workers: LLM, reference: list[list[int]]) -> None:
    llm = two_workers
    _check_split(llm, (1, 2))
    assert _tokens(llm) == reference
    for a in [(2, 2), (0, 0)]:  # all offloaded, then none
        _force_now(llm, (1, a))
        assert _tokens(llm) == reference
        _check_split(llm, a)
    # mid-generation: main -> worker 1; worker 1 -> worker 0 and main -> worker 0; worker 0 -> main
    _force_now(llm, (2, (0, 3)), (4, (3, 1)), (7, (1, 1)))
    assert _tokens(llm) == reference
    _check_split(llm, (1, 1))
    assert [m["to"] for m in llm.engine.hetis.log[-3:]] == [[0, 3], [3, 1], [1, 1]]


def test_llm_cluster_hetis_default_instances(model: str, reference: list[list[int]]) -> None:
    llm = LLM(model, cluster="cpu-pair", strategy="hetis", max_model_len=MAX_LEN, num_kv_blocks=64)
    try:
        assert list(llm.engine.instances) == ["main0"]
        d = llm.engine.deployment.dispatchers["main0"]
        assert [w.name for w in d.workers] == ["host:1"]
        assert _tokens(llm) == reference
        _check_split(llm, tuple(d.assignment))
        pids = [*llm.engine.worker_pids().values(), *llm.engine.hetis.info["main0"].worker_pids]
    finally:
        llm.shutdown()
    t0 = time.monotonic()
    while any(process_alive(p) for p in pids) and time.monotonic() - t0 < 10:
        time.sleep(0.1)
    assert not any(process_alive(p) for p in pids), "a worker outlived shutdown"



def _step(llm: LLM, done: dict[str, object]) -> None:
    for o in llm.engine.step():
        if o.finished:
            done[o.request_id] = o


def _run_until(llm: LLM, ids: list[str], done: dict[str, object], timeout_s: float) -> dict[str, object]:
    t0 = time.monotonic()
    while len(done) < len(ids):
        assert time.monotonic() - t0 < timeout_s, "requests hang after an attention worker died"
        _step(llm, done)
    return done


def _kill_when_decoding(llm: LLM) -> tuple[list[str], dict[str, object]]:
    """Start the prompts; once a request on main0 has a token, SIGKILL main0's first attention worker."""
    eng = llm.engine
    ids = [eng.add_request(None, p, SP) for p in PROMPTS]
    done: dict[str, object] = {}
    t0 = time.monotonic()
    while not any(eng._where.get(r) == "main0" and eng._reqs[r].token_ids for r in ids):
        assert time.monotonic() - t0 < 30 and len(done) < len(ids), "no request decoded on main0"
        _step(llm, done)
    os.kill(eng.hetis.info["main0"].worker_pids[0], signal.SIGKILL)
    return ids, done


def test_killed_attention_worker_retries_on_a_replica(model: str, reference: list[list[int]]) -> None:
    llm = _hetis(model, TRIO, [{"device": "host:1", "kv_heads": 2}],
                 extra=[{"name": "r0", "role": "mixed", "devices": ["host:2"]}])
    try:
        ids, done = _kill_when_decoding(llm)
        _run_until(llm, ids, done, 30.0)
        assert [done[i].outputs[0].token_ids for i in ids] == reference
        assert llm.engine.num_retries > 0 and not llm.engine.instances["main0"].alive
        assert "attention worker" in llm.engine.instances["main0"].worker.dead_reason
    finally:
        llm.shutdown()


def test_killed_attention_worker_fails_requests_explicitly(one_worker: LLM) -> None:
    """Last on the shared engine: with no other instance the requests end with an error, promptly."""
    llm = one_worker
    _force_now(llm, (1, (2,)))  # the worker holds heads (a worker holding none is never asked anything)
    llm.generate(PROMPTS[:1], SamplingParams(max_tokens=3))
    assert llm.engine.hetis.info["main0"].assignment == [2]
    ids, done = _kill_when_decoding(llm)
    _run_until(llm, ids, done, 30.0)
    assert all(done[i].outputs[0].finish_reason == "error" for i in ids)
    assert all("attention worker" in str(done[i].outputs[0].stop_reason) for i in ids)
