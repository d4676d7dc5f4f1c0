"""DP and PD over real worker processes (cpu-pair: one worker paced at half speed) against one device.

The reference is the single-process engine's greedy output; PD moves KV from a prefill worker (block 16, NHD)
to a decode worker declared as block 32, HND (converted on the wire, back to the runner's NHD on arrival).
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from hetserve.core.sampling_params import SamplingParams
from hetserve.llm import LLM
from tests.runtime.helpers import assert_no_leaks, process_alive

MAX_LEN = 256
PROMPTS = [[1 + (i * 7 + j) % 500 for j in range(5 + i * 9)] for i in range(6)]
SP = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
PD_CONVERT = {"block_sizes": {"decode0": 32}, "kv_layouts": {"decode0": "HND"}}


def _cluster(model: str, strategy: str, **kw):
    llm = LLM(model, cluster="cpu-pair", strategy=strategy, max_model_len=MAX_LEN, num_kv_blocks=128, **kw)
    return llm



@pytest.mark.parametrize("strategy,kw", [("dp", {}), ("pd", PD_CONVERT)], ids=["dp", "pd-convert"])
def test_same_greedy_tokens_as_one_device(model: str, reference: list[list[int]], strategy: str, kw: dict) -> None:
    llm = _cluster(model, strategy, **kw)
    pids = list(llm.engine.worker_pids().values())
    placeholders = {name: 0 for name in llm.engine.instances}
    for name, inst in llm.engine.instances.items():
        def counting(orig=inst.scheduler.schedule, name=name):
            so = orig()
            placeholders[name] += sum(s.placeholder for s in so.scheduled)
            return so

        inst.scheduler.schedule = counting
    try:
        outs = llm.generate(PROMPTS, SP)
        assert [o.outputs[0].token_ids for o in outs] == reference
        assert all(o.outputs[0].text == llm.tokenizer.decode(o.outputs[0].token_ids) or o.outputs[0].text
                   for o in outs)
        if strategy == "pd":
            assert llm.engine.num_transfers_ok == len(PROMPTS) and llm.engine.num_transfers_failed == 0
            d = llm.engine.instances["decode0"]
            assert d.scheduler.block_size == 32 and d.declared.layout == "HND" and d.desc.layout == "NHD"
        else:
            used = {len(i.scheduler.requests) for i in llm.engine.instances.values()}
            assert used == {0}
        # one worker per instance: the coordinator scheduled a step ahead (decodes on placeholders), on the PD
        # decode side too once a request's KV had arrived
        assert all(i.lookahead for i in llm.engine.instances.values())
        assert max(i.max_in_flight_seen for i in llm.engine.instances.values()) == 2
        assert (placeholders["decode0"] if strategy == "pd" else sum(placeholders.values())) > 0, placeholders
        assert_no_leaks(llm.engine)
    finally:
        llm.shutdown()
    assert all(not process_alive(p) for p in pids)


def test_pd_bf16_prefill_to_fp32_decode_completes(model: str) -> None:
    llm = _cluster(model, "pd", dtypes={"prefill0": "bfloat16"}, **PD_CONVERT)
    try:
        assert llm.engine.instances["prefill0"].desc.dtype == "bfloat16"
        outs = llm.generate(PROMPTS, SP)
        assert all(len(o.outputs[0].token_ids) == SP.max_tokens for o in outs)
        assert llm.engine.num_transfers_ok == len(PROMPTS)
        assert_no_leaks(llm.engine)
    finally:
        llm.shutdown()


def test_stalled_transfer_reprefills_locally(model: str, reference: list[list[int]]) -> None:
    llm = _cluster(model, "pd", kv_stall_s={"prefill0": 0.6}, kv_deadline_s=0.2, **PD_CONVERT)
    try:
        outs = llm.generate(PROMPTS[:3], SP)
        assert [o.outputs[0].token_ids for o in outs] == reference[:3]
        assert llm.engine.num_transfers_failed >= 1
        assert_no_leaks(llm.engine)
    finally:
        llm.shutdown()



def test_kill_decode_worker_mid_run(model: str, reference: list[list[int]]) -> None:
    llm = _cluster(model, "pd", step_timeout_s=10.0, **PD_CONVERT)
    eng = llm.engine
    sp = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    decode_pid = eng.worker_pids()["decode0"]
    try:
        for i, p in enumerate(PROMPTS):
            eng.add_request(str(i), p, sp)
        done: dict[str, object] = {}
        killed = False
        t0 = time.monotonic()
        while eng.has_unfinished_requests():
            assert time.monotonic() - t0 < 60, "the cluster hung after a worker died"
            for o in eng.step():
                if o.finished:
                    done[o.request_id] = o
                elif not killed and len(o.outputs[0].token_ids) >= 3:
                    os.kill(decode_pid, signal.SIGKILL)
                    killed = True
        assert killed
        assert set(done) == {str(i) for i in range(len(PROMPTS))}
        for rid, o in done.items():
            c = o.outputs[0]  # type: ignore[attr-defined]
            if c.finish_reason == "error":
                assert isinstance(c.stop_reason, str) and "decode0" in c.stop_reason
            else:
                assert c.token_ids == reference[int(rid)]
        assert not eng.instances["decode0"].alive
        assert_no_leaks(llm.engine)
        # a request after the failure is served by the survivor alone
        out = llm.generate(PROMPTS[0], sp)[0]
        assert out.outputs[0].token_ids == reference[0]
        assert_no_leaks(llm.engine)
    finally:
        llm.shutdown()
    assert not process_alive(decode_pid)
