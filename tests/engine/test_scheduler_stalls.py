"""Two ways a tiny pool or a prefix hit once stalled ``schedule()`` for good (found by the randomized run of
``test_scheduler_books.py``, which now drains every run without aborting anything): each is built here by hand,
and the run must finish."""

from __future__ import annotations

from hetserve.core.config import CacheConfig, SchedulerConfig
from hetserve.core.request import KVTransferParams, Request, RequestStatus
from hetserve.core.sampling_params import SamplingParams
from hetserve.engine.sched.scheduler import Scheduler
from hetserve.sim.simulator import SimExecutor

BS = 4


def _scheduler(num_blocks: int, caching: bool = False) -> Scheduler:
    cfg = SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=4)
    return Scheduler(cfg, CacheConfig(block_size=BS, num_blocks=num_blocks, enable_prefix_caching=caching),
                     num_blocks, 256)


def _drain(s: Scheduler, ex: SimExecutor, steps: int = 200) -> int:
    """Steps until nothing is left; returns how many it took (the test fails if it never ends)."""
    for i in range(steps):
        if not s.has_unfinished():
            return i
        so = s.schedule()
        s.update_from_output(so, ex.execute(so))
    raise AssertionError(f"still unfinished after {steps} steps: waiting {[r.request_id for r in s.waiting]}")


def test_a_preempted_request_goes_behind_requests_whose_kv_landed() -> None:
    """A running request grows until the pool is full and is preempted while a request whose remote KV landed
    waits with its blocks: the landed one is admitted first (it needs one more block), not the preempted one
    (it needs all of its own, held by the landed one: before, neither ever ran)."""
    s, ex = _scheduler(7), SimExecutor(7)  # 6 usable blocks of 4
    grow = Request("grow", list(range(8)), SamplingParams(max_tokens=12, ignore_eos=True))
    s.add_request(grow)
    so = s.schedule()
    s.update_from_output(so, ex.execute(so))
    landed = Request("landed", list(range(13)), SamplingParams(max_tokens=2, ignore_eos=True),
                     kv_transfer=KVTransferParams(num_remote_tokens=12, remote_instance="p"))
    s.add_request(landed)
    assert [ld.req_id for ld in s.start_kv_loads()] == ["landed"]  # 3 blocks reserved
    s.finish_remote_kv("landed", success=True)
    while not s.num_preemptions:  # "grow" needs a 4th block while only 3 are free... then a 5th
        so = s.schedule()
        s.update_from_output(so, ex.execute(so))
    assert [r.request_id for r in s.waiting][:2] == ["landed", "grow"]
    _drain(s, ex)
    assert s.kv.pool.num_free_blocks == s.kv.pool.num_usable_blocks


def test_landed_requests_that_fill_the_pool_give_blocks_up() -> None:
    """Two landed requests hold every block and each needs one more: the last gives its blocks up (computed
    here from scratch) and both finish."""
    s, ex = _scheduler(5), SimExecutor(5)  # 4 usable blocks
    for rid in ("a", "b"):
        s.add_request(Request(rid, list(range(9)), SamplingParams(max_tokens=1, ignore_eos=True),
                              kv_transfer=KVTransferParams(num_remote_tokens=8, remote_instance="p")))
    assert len(s.start_kv_loads()) == 2
    assert s.kv.pool.num_free_blocks == 0
    s.finish_remote_kv("a", success=True)
    s.finish_remote_kv("b", success=True)
    so = s.schedule()
    assert [x.req_id for x in so.scheduled] == ["b"]  # "a" gave its blocks up and waits to be recomputed
    a = s.requests["a"]
    assert a.num_computed_tokens == 0 and a.status == RequestStatus.WAITING and s.num_preemptions == 1
    s.update_from_output(so, ex.execute(so))
    _drain(s, ex)
    assert s.kv.pool.num_free_blocks == s.kv.pool.num_usable_blocks


def test_a_head_request_whose_whole_head_is_cached_still_runs() -> None:
    """Cronus' head request computes only its first tokens; a cached prefix reaching past them once left it
    nothing to compute, at the head of the queue, for ever."""
    s, ex = _scheduler(32, caching=True), SimExecutor(32)
    prompt = list(range(19))
    s.add_request(Request("warm", prompt, SamplingParams(max_tokens=1, ignore_eos=True)))
    _drain(s, ex)  # its blocks are cached now
    head = Request("head", prompt, SamplingParams(max_tokens=4, ignore_eos=True),
                   kv_transfer=KVTransferParams(compute_limit=5, send=True))
    s.add_request(head)
    behind = Request("behind", [7, 7, 7], SamplingParams(max_tokens=1, ignore_eos=True))
    s.add_request(behind)
    so = s.schedule()
    got = {x.req_id: x for x in so.scheduled}
    assert set(got) == {"head", "behind"}  # it no longer blocks the queue either
    # one cached block of its five tokens: it computes the fifth (a hit may not reach its limit)
    assert (got["head"].num_computed_tokens, got["head"].num_tokens) == (4, 1)
    s.update_from_output(so, ex.execute(so))
    assert head.num_computed_tokens == 5 and "head" in s.pinned  # handed on: its KV is pinned for the sender
