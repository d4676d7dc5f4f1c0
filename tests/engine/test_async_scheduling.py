"""Async scheduling through the real runner (CPU, tiny model): the engine schedules and prepares step N+1 before
step N's tokens are back, decodes run on placeholders filled from the runner's device-side last tokens. Every
output must equal the plain loop's: greedy with logprobs, seeded sampling, penalties, stop strings, n > 1,
chunked prefill and preemption; aborts in flight leave no blocks behind."""

from __future__ import annotations

import random

import pytest

from hetserve import LLM, SamplingParams
from hetserve.core.config import EngineConfig
from hetserve.engine.llm_engine import LLMEngine


def _params(vocab: int) -> list[SamplingParams]:
    return [
        SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.9, top_p=0.9, seed=11, max_tokens=20, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=18, repetition_penalty=1.3, presence_penalty=0.2),
        SamplingParams(temperature=0.0, max_tokens=30, stop=[" the", "e"], ignore_eos=True),
        SamplingParams(temperature=0.7, seed=5, n=2, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=16, min_tokens=4, stop_token_ids=[7, 9, 11]),
        SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True),
    ]


def _outputs(llm: LLM, prompts, params):
    outs = llm.generate(prompts, params)
    return [
        [(c.token_ids, c.text, c.finish_reason, [lp.logprob for lp in c.logprobs] if c.logprobs else None)
         for c in o.outputs]
        for o in outs
    ]


@pytest.mark.parametrize("engine_kw", [
    {},
    {"max_num_batched_tokens": 9},
    {"num_blocks": 34, "block_size": 4, "max_num_batched_tokens": 64},  # preempts
], ids=["batched", "chunk9", "preempt"])
def test_async_equals_sync(tiny_llama_dir, engine_kw):
    rng = random.Random(1)
    prompts = [[rng.randrange(4, 500) for _ in range(rng.randint(2, 40))] for _ in range(7)]
    params = _params(512)
    common = {"device": "cpu", "dtype": "float32", "max_model_len": 128, **engine_kw}
    sync = _outputs(LLM(str(tiny_llama_dir), async_scheduling=False, **common), prompts, params)
    llm = LLM(str(tiny_llama_dir), async_scheduling=True, **common)
    ran_ahead = {"n": 0}
    sched = llm.engine.scheduler
    orig = sched.schedule

    def counting():
        so = orig()
        ran_ahead["n"] += sum(s.placeholder for s in so.scheduled)
        return so

    sched.schedule = counting
    assert llm.engine.core.async_scheduling
    got = _outputs(llm, prompts, params)
    # tokens, text and finish reasons exactly; logprobs to float noise (batch mates differ between the loops)
    assert [[c[:3] for c in o] for o in got] == [[c[:3] for c in o] for o in sync]
    for o, r in zip(got, sync, strict=True):
        for c, rc in zip(o, r, strict=True):
            assert (c[3] is None) == (rc[3] is None)
            if c[3] is not None:
                assert c[3] == pytest.approx(rc[3], abs=1e-4)
    assert ran_ahead["n"] > 0
    if "num_blocks" in engine_kw:
        assert sched.num_preemptions > 0
    assert sched.kv.pool.num_free_blocks == sched.kv.pool.num_usable_blocks


def test_auto_is_off_on_a_cpu_runner(tiny_llama_dir):
    """On a CPU the runner computes on the host, so scheduling ahead would only delay outputs: auto is off."""
    eng = LLMEngine(EngineConfig.from_kwargs(str(tiny_llama_dir), device="cpu", dtype="float32", max_model_len=128))
    assert eng.config.scheduler.async_scheduling is None
    assert not eng.executor.overlaps_host and not eng.core.async_scheduling


def test_abort_with_a_step_in_flight_frees_everything(tiny_llama_dir):
    eng = LLMEngine(EngineConfig.from_kwargs(str(tiny_llama_dir), device="cpu", dtype="float32", max_model_len=128,
                                             async_scheduling=True))
    assert eng.core.async_scheduling
    for i in range(4):
        eng.add_request(f"r{i}", [5 + i, 6, 7, 8], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True))
    for _ in range(5):
        eng.step()
    assert eng.core.has_step_in_flight
    eng.abort_request(["r1", "r3"])
    seen: dict[str, int] = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            assert out.request_id in ("r0", "r2"), "an aborted request produced output"
            seen[out.request_id] = len(out.outputs[0].token_ids)
    assert seen == {"r0": 40, "r2": 40}
    for _ in range(3):  # drain: the step in flight, then one that tells the runner to forget the finished
        eng.step()
    assert not eng.core.has_step_in_flight
    kv = eng.scheduler.kv
    assert kv.pool.num_free_blocks == kv.pool.num_usable_blocks and not kv.req_to_blocks
    assert not eng.executor.states
