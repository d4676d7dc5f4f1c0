"""Pipeline-parallel and tensor-parallel instances over real worker processes (cpu-trio: two full-speed CPU
workers and one paced at half speed, emulated), against the single-process engine's greedy tokens.

The model is a 5-layer tiny llama (GQA 4 query / 2 kv heads), so a 3-stage pipeline and a TP-2 group both split
it for real: stages hold disjoint layers (hidden states go stage to stage over their own sockets), TP ranks hold
one kv head each (row-parallel o_proj / down_proj summed with gloo all_reduce).
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from pathlib import Path

import pytest

from hetserve.core.cluster import load_cluster
from hetserve.core.errors import ValidationError
from hetserve.core.model_config import ModelConfig
from hetserve.core.sampling_params import SamplingParams
from hetserve.engine.model.parallel import ParallelSpec
from hetserve.llm import LLM
from hetserve.planner.costmodel import CostModel
from hetserve.runtime.cluster_engine import ClusterEngine, InstanceOptions
from hetserve.runtime.kv_layout import KVDescriptor
from hetserve.strategies.build import build_deployment
from tests.runtime.helpers import assert_no_leaks, process_alive

MAX_LEN = 256
PROMPTS = [[1 + (i * 7 + j) % 500 for j in range(5 + i * 9)] for i in range(6)]  # 5 .. 50 tokens
SP = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
TRIO = Path(__file__).resolve().parents[2] / "examples" / "clusters" / "cpu-trio.yaml"


@pytest.fixture(scope="module")
def model(tiny_model_factory) -> str:
    return str(tiny_model_factory("llama", num_layers=5))


def _ref(model: str, dtype: str) -> list[list[int]]:
    llm = LLM(model, max_model_len=MAX_LEN, dtype=dtype, device="cpu", num_blocks=128)
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, SP)]


@pytest.fixture(scope="module")
def reference(model: str) -> list[list[int]]:
    return _ref(model, "float32")



def _tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, SP)]


def test_three_stage_pipeline_matches_one_device(model: str, reference: list[list[int]]) -> None:
    # layers "auto": choose_layer_split from the devices' speed and memory; chunks of 16 tokens
    inst = [{"name": "pp0", "devices": ["host:0", "host:1", "host:2"], "layers": "auto", "max_num_batched_tokens": 16}]
    llm = LLM(model, cluster="cpu-trio", strategy="pp", instances=inst, max_model_len=MAX_LEN, num_kv_blocks=128)
    eng = llm.engine
    try:
        pp = eng.instances["pp0"]
        ranges = [pp.layer_range(i) for i in range(3)]
        sizes = [b - a for a, b in ranges]
        assert ranges[0][0] == 0 and ranges[-1][1] == 5 and len(set(sizes)) > 1, ranges
        assert sizes[2] == min(sizes), f"the half-speed stage should hold the fewest layers: {ranges}"
        assert _tokens(llm) == reference
        assert pp.max_in_flight_seen > 1, "the pipeline never had two steps in flight"
        assert pp.max_in_flight_seen <= 3
        assert_no_leaks(eng)
    finally:
        llm.shutdown()


def test_default_pipeline_on_cpu_pair(model: str, reference: list[list[int]]) -> None:
    """``strategy="pp"`` with no instances: one pipeline over both devices, layers split by speed and memory."""
    llm = LLM(model, cluster="cpu-pair", strategy="pp", max_model_len=MAX_LEN, num_kv_blocks=128)
    try:
        (pp,) = llm.engine.instances.values()
        assert pp.num_stages == 2 and pp.layer_range(0)[1] == pp.layer_range(1)[0]
        assert _tokens(llm) == reference
        assert_no_leaks(llm.engine)
    finally:
        llm.shutdown()


def test_tp_shards_follow_the_kv_descriptor(model: str) -> None:
    """The model's TP split of kv heads (replicated when ranks outnumber them) is the one KV transfers assume;
    a ``tp`` that does not divide the kv heads is refused naming ``tp``."""
    mc = ModelConfig.from_path(model)  # 4 query heads, 2 kv heads
    for tp in (1, 2, 4):
        desc = KVDescriptor(num_layers=5, num_kv_heads=2, head_dim=mc.head_dim, block_size=16, tp_size=tp)
        assert [ParallelSpec(tp_rank=r, tp_size=tp).kv_heads(mc) for r in range(tp)] == [
            desc.heads_of_rank(r) for r in range(tp)
        ]
    odd = dataclasses.replace(mc, num_attention_heads=6, num_key_value_heads=3)  # 3 kv heads over 2 ranks
    with pytest.raises(ValidationError, match="kv heads") as err:
        ParallelSpec(tp_rank=0, tp_size=2, all_reduce=lambda t: None).validate(odd)
    assert err.value.field == "tp"


def test_tp2_instance_matches_tp1(model: str, reference: list[list[int]]) -> None:
    inst = [{"name": "tp0", "devices": ["host:0", "host:1"], "tp": 2}]
    llm = LLM(model, cluster="cpu-trio", strategy="dp", instances=inst, max_model_len=MAX_LEN, num_kv_blocks=128)
    try:
        tp = llm.engine.instances["tp0"]
        assert [d.head_range for d in tp.descs] == [(0, 1), (1, 2)]  # each rank's cache holds its kv head
        # greedy tokens; fp32 row-parallel sums differ from TP 1 only in reduction order
        assert _tokens(llm) == reference
        assert_no_leaks(llm.engine)
    finally:
        llm.shutdown()


PD_TP = [
    {"name": "prefill0", "role": "prefill", "devices": ["host:0", "host:1"], "tp": 2},
    {"name": "decode0", "role": "decode", "devices": ["host:2"]},
]
PD_CONVERT = {"block_sizes": {"decode0": 32}, "kv_layouts": {"decode0": "HND"}}


def test_pd_prefill_tp2_bf16_to_decode_tp1_fp32(model: str) -> None:
    """The issue's case: prefill TP 2, bf16, NHD, block 16 -> decode TP 1, fp32, HND, block 32.

    What is compared: bf16 prefill changes the KV (and so later tokens) against an fp32 reference, so this
    checks that every hand-off succeeds, nothing leaks, every request runs to max_tokens, and the first token
    (sampled by the bf16 TP-2 prefill) equals the single-process bf16 engine's. Exact tokens for the same
    path in fp32 are checked by ``test_pd_prefill_tp2_fp32_exact``."""
    first_bf16 = [t[0] for t in _ref(model, "bfloat16")]
    llm = LLM(
        model,
        cluster="cpu-trio",
        strategy="pd",
        instances=PD_TP,
        max_model_len=MAX_LEN,
        num_kv_blocks=128,
        dtypes={"prefill0": "bfloat16"},
        **PD_CONVERT,
    )
    eng = llm.engine
    try:
        p, d = eng.instances["prefill0"], eng.instances["decode0"]
        assert (p.desc.dtype, p.desc.tp_size, p.desc.layout, p.scheduler.block_size) == ("bfloat16", 2, "NHD", 16)
        assert (d.desc.dtype, d.desc.tp_size, d.declared.layout, d.scheduler.block_size) == ("float32", 1, "HND", 32)
        got = _tokens(llm)
        assert all(len(t) == SP.max_tokens for t in got)
        assert [t[0] for t in got] == first_bf16
        assert eng.num_transfers_ok == len(PROMPTS) and eng.num_transfers_failed == 0
        assert_no_leaks(eng)
    finally:
        llm.shutdown()


def test_pd_prefill_tp2_fp32_exact(model: str, reference: list[list[int]]) -> None:
    llm = LLM(
        model,
        cluster="cpu-trio",
        strategy="pd",
        instances=PD_TP,
        max_model_len=MAX_LEN,
        num_kv_blocks=128,
        **PD_CONVERT,
    )
    try:
        assert _tokens(llm) == reference
        assert llm.engine.num_transfers_ok == len(PROMPTS) and llm.engine.num_transfers_failed == 0
        assert_no_leaks(llm.engine)
    finally:
        llm.shutdown()


def _drive(eng: ClusterEngine, sp: SamplingParams, limit_s: float = 60.0, on_output=None) -> dict[str, object]:
    for i, p in enumerate(PROMPTS):
        eng.add_request(str(i), p, sp)
    done: dict[str, object] = {}
    t0 = time.monotonic()
    while eng.has_unfinished_requests():
        assert time.monotonic() - t0 < limit_s, "the cluster hung"
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
            elif on_output is not None:
                on_output(o)
    return done


def test_pd_from_pipeline_to_tp2(model: str, reference: list[list[int]]) -> None:
    """KV from a 2-stage pipeline (each stage extracts its layers) into a TP-2 group (each rank its head), with
    block 16 -> 32 and NHD -> HND on the wire. Built around the config path, which keeps PD instances
    single-stage (``instances[i].layers`` is refused there)."""
    cl, mc = load_cluster(TRIO), ModelConfig.from_path(model)
    dep = build_deployment(
        cl,
        mc,
        {
            "strategy": "pd",
            "dtype": "float32",
            "max_model_len": MAX_LEN,
            "instances": [
                {"name": "prefill0", "role": "prefill", "devices": ["host:2"]},
                {"name": "decode0", "role": "decode", "devices": ["host:0", "host:1"], "tp": 2},
            ],
        },
    )
    pf = dep.plans["prefill0"]
    stages = tuple(CostModel(mc, pf.cost.device, "float32", layers=r) for r in ((0, 3), (3, 5)))
    dep.plans["prefill0"] = dataclasses.replace(pf, stage_costs=stages, device_ids=("host:2", "host:2"))
    dep.plans["decode0"] = dataclasses.replace(dep.plans["decode0"], block_size=32)
    eng = ClusterEngine(
        model, dep, {"decode0": InstanceOptions(kv_layout="HND")}, max_model_len=MAX_LEN, num_kv_blocks=128
    )
    try:
        assert eng.instances["prefill0"].num_stages == 2 and eng.instances["decode0"].tp == 2
        done = _drive(eng, SP)
        assert [done[str(i)].outputs[0].token_ids for i in range(len(PROMPTS))] == reference  # type: ignore[attr-defined]
        assert eng.num_transfers_ok == len(PROMPTS) and eng.num_transfers_failed == 0
        assert_no_leaks(eng)
    finally:
        eng.shutdown()



def test_kill_pipeline_stage_mid_run(model: str, reference: list[list[int]]) -> None:
    """SIGKILL the first stage (a worker that never answers the coordinator itself) of a 2-stage pipeline while
    requests decode: the instance is dropped, its requests finish on the healthy single-device instance with
    the reference tokens (or fail with an error naming the pipeline), and nothing hangs."""
    inst = [
        {"name": "pp0", "devices": ["host:0", "host:1"], "layers": [[0, 2], [2, 5]]},
        {"name": "i1", "devices": ["host:2"]},
    ]
    llm = LLM(
        model,
        cluster="cpu-trio",
        strategy="pp",
        instances=inst,
        max_model_len=MAX_LEN,
        num_kv_blocks=128,
        step_timeout_s=10.0,
    )
    eng = llm.engine
    pids = eng.all_worker_pids()["pp0"]
    killed: list[bool] = []

    def kill_once(o) -> None:
        if not killed and o.request_id in eng.instances["pp0"].scheduler.requests and len(o.outputs[0].token_ids) >= 2:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(True)

    try:
        done = _drive(eng, SP, on_output=kill_once)
        assert killed, "no request decoded on the pipeline"
        assert set(done) == {str(i) for i in range(len(PROMPTS))}
        for rid, o in done.items():
            c = o.outputs[0]  # type: ignore[attr-defined]
            if c.finish_reason == "error":
                assert isinstance(c.stop_reason, str) and "pp0" in c.stop_reason
            else:
                assert c.token_ids == reference[int(rid)]
        assert eng.num_retries >= 1
        assert not eng.instances["pp0"].alive and "pp0" in (eng.instances["pp0"].worker.dead_reason or "")
        assert_no_leaks(eng)
    finally:
        llm.shutdown()
    assert not any(process_alive(p) for p in pids)
