"""KV that moves between two instances (PD, Cronus) through the scheduler's pin / receive books."""

from __future__ import annotations

import random

import pytest

from hetserve.core.config import CacheConfig, SchedulerConfig
from hetserve.core.request import KVTransferParams, Request, RequestStatus
from hetserve.core.sampling_params import SamplingParams
from hetserve.engine.core import EngineCore
from hetserve.engine.sched.scheduler import Scheduler

from .fake_executor import ShadowExecutor, brute_force


def instance(num_blocks, block_size, budget=16):
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=8),
                  CacheConfig(block_size=block_size, num_blocks=num_blocks), num_blocks, 512)
    ex = ShadowExecutor(num_blocks, block_size)
    return s, ex, EngineCore(s, ex)


def copy_kv(src_ex, src_ids, dst_ex, dst_ids, num_tokens, dst_req):
    """What a transport does: the first num_tokens tokens' KV from src blocks into dst blocks."""
    sb, db = src_ex.block_size, dst_ex.block_size
    for p in range(num_tokens):
        s_slot = src_ids[p // sb] * sb + p % sb
        d_slot = dst_ids[p // db] * db + p % db
        _, pos, tok = src_ex.slots[s_slot]
        dst_ex.slots[d_slot] = (dst_req, pos, tok)


@pytest.mark.parametrize("k", [1, 4, 8, 10, 23, None])  # None: the whole prompt, first token sampled on P
@pytest.mark.parametrize("fail", [False, True])
def test_partial_prefill_handoff_is_exact(k, fail):
    rng = random.Random(k or 99)
    prompt = [rng.randrange(97) for _ in range(23)]
    P, pex, pcore = instance(64, 4)
    D, dex, dcore = instance(64, 8)  # another block size on the receiving side
    P.add_request(Request("r", prompt, SamplingParams(max_tokens=10),
                          kv_transfer=KVTransferParams(compute_limit=k, send=True)))
    handed = None
    for _ in range(50):
        for o in pcore.step():
            assert o.finish_reason == "remote"
            handed = o
        if handed:
            break
    assert handed is not None and "r" in P.pinned
    first_tokens = handed.new_token_ids
    whole = k is None or k >= len(prompt)  # a limit at the prompt's end samples the first token, as PD does
    n_remote = len(prompt) if whole else k
    assert first_tokens == (brute_force(prompt, 1) if whole else [])
    D.add_request(Request("r", prompt, SamplingParams(max_tokens=10), output_token_ids=list(first_tokens),
                          kv_transfer=KVTransferParams(num_remote_tokens=n_remote)))
    so = D.schedule()  # admission: blocks reserved, no compute
    assert so.is_empty and len(so.kv_loads) == 1 and so.kv_loads[0].num_tokens == n_remote
    load = so.kv_loads[0]
    if not fail:
        copy_kv(pex, P.kv.get_block_ids("r"), dex, load.block_ids, n_remote, "r")
    D.finish_remote_kv("r", success=not fail)
    P.release_remote("r")
    P.kv.check_invariants()
    assert P.kv.pool.num_free_blocks == P.kv.pool.num_usable_blocks
    outs = list(first_tokens)
    for _ in range(200):
        if not D.has_unfinished():
            break
        for o in dcore.step():
            outs.extend(o.new_token_ids)
        D.kv.check_invariants()
    assert outs == brute_force(prompt, 10)
    # without a failure, D computed only from the handed-off position on
    first_step = next(st for st in dex.steps if st.scheduled)
    assert first_step.scheduled[0].num_computed_tokens == (0 if fail else n_remote)
    assert D.kv.pool.num_free_blocks == D.kv.pool.num_usable_blocks


def test_abort_while_receiving_frees_blocks():
    D, dex, dcore = instance(32, 4)
    D.add_request(Request("r", list(range(12)), SamplingParams(max_tokens=3),
                          kv_transfer=KVTransferParams(num_remote_tokens=12)))
    D.schedule()
    assert "r" in D.receiving and D.kv.pool.num_free_blocks < D.kv.pool.num_usable_blocks
    from hetserve.core.request import RequestStatus

    D.finish_requests(["r"], RequestStatus.FINISHED_ABORTED)
    D.kv.check_invariants()
    assert D.kv.pool.num_free_blocks == D.kv.pool.num_usable_blocks and not D.has_unfinished()


def test_start_kv_loads_between_steps_keeps_fcfs_seqs_and_a_block_per_runner() -> None:
    """``start_kv_loads`` (called at hand-off time, a step possibly in flight) admits only what ``schedule()``
    would admit first: remote-KV requests at the head of the queue, within max_num_seqs, leaving one free block
    per running request; a request that needs compute stops it. The reserved blocks are the request's own."""
    D, _, dcore = instance(12, 4)  # blocks of 4 tokens
    D.add_request(Request("run", list(range(7)), SamplingParams(max_tokens=20)))
    dcore.step()  # "run" is running on 2 blocks
    assert [r.request_id for r in D.running] == ["run"]
    free0 = D.kv.pool.num_free_blocks
    assert free0 == D.kv.pool.num_usable_blocks - 2

    def remote(rid: str, n: int) -> Request:
        return Request(rid, list(range(n)), SamplingParams(max_tokens=4),
                       kv_transfer=KVTransferParams(num_remote_tokens=n))

    D.add_request(remote("a", 16))  # 4 blocks
    D.add_request(remote("b", 12))  # 3 blocks
    D.add_request(Request("c", list(range(5)), SamplingParams(max_tokens=2)))  # needs compute: stops the loads
    D.add_request(remote("d", 4))  # 1 block
    loads = D.start_kv_loads()
    assert [ld.req_id for ld in loads] == ["a", "b"]
    assert [(len(ld.block_ids), ld.num_tokens) for ld in loads] == [(4, 16), (3, 12)]
    assert loads[0].block_ids == D.kv.get_block_ids("a") and not set(loads[0].block_ids) & set(loads[1].block_ids)
    assert set(D.receiving) == {"a", "b"} and [r.request_id for r in D.waiting] == ["c", "d"]
    assert D.kv.pool.num_free_blocks == free0 - 7
    assert D.start_kv_loads() == []  # "c" heads the queue
    D.kv.check_invariants()
    D.finish_requests(["c"], RequestStatus.FINISHED_ABORTED)
    # "d" needs its block plus one kept for "run" (2 of the 2 free): admitted; then "e" (1 + 1 of 1) is not
    assert D.kv.pool.num_free_blocks == 2, "the arithmetic below assumes 11 usable blocks"
    assert [ld.req_id for ld in D.start_kv_loads()] == ["d"]
    D.add_request(remote("e", 4))
    assert D.start_kv_loads() == [] and D.kv.pool.num_free_blocks == 1  # the running request's next block
    D.kv.check_invariants()


def test_start_kv_loads_respects_max_num_seqs() -> None:
    s = Scheduler(SchedulerConfig(max_num_batched_tokens=16, max_num_seqs=2),
                  CacheConfig(block_size=4, num_blocks=64), 64, 512)
    for i in range(3):
        s.add_request(Request(f"r{i}", list(range(8)), SamplingParams(max_tokens=2),
                              kv_transfer=KVTransferParams(num_remote_tokens=8)))
    assert [ld.req_id for ld in s.start_kv_loads()] == ["r0", "r1"]
    assert len(s.receiving) == 2 and [r.request_id for r in s.waiting] == ["r2"]
