"""The scheduler's incremental figures against brute-force recomputation over randomized runs of the real
``Scheduler``: the waiting queue's prefill tokens (routing's O(1) figure), the views strategies route by (the
simulator's cached one included), and the KV books, through admissions, chunked prefill, preemptions under a tiny
block pool, aborts, remote-KV receivers (landed or failed) and KV senders (PD prefill, Cronus heads)."""

from __future__ import annotations

import copy
import random
from collections import deque

import pytest

from hetserve.core.config import CacheConfig, SchedulerConfig
from hetserve.core.request import KVTransferParams, Request, RequestStatus
from hetserve.core.sampling_params import SamplingParams
from hetserve.engine.sched.scheduler import Scheduler, WaitingQueue
from hetserve.sim.simulator import SimExecutor, _CachedView
from hetserve.strategies.base import InstancePlan, InstanceView

BLOCK_SIZE = 4


def brute_waiting(s: Scheduler) -> int:
    return sum(r.num_target_tokens - r.num_computed_tokens for r in s.waiting)


def brute_pending(s: Scheduler) -> int:
    return brute_waiting(s) + sum(max(0, len(r.prompt_token_ids) - r.num_computed_tokens) for r in s.running)


class _Run:
    """One randomized run; ``check()`` after every operation compares the books with brute force."""

    def __init__(self, seed: int, async_: bool, caching: bool) -> None:
        self.rng = random.Random(seed)
        num_blocks = self.rng.randint(10, 16)  # 9-15 usable blocks of 4 tokens: preemptions are common
        self.s = Scheduler(
            SchedulerConfig(
                max_num_batched_tokens=self.rng.choice([6, 16, 32]),
                max_num_seqs=self.rng.randint(2, 6),
                long_prefill_token_threshold=self.rng.choice([0, 5]),
            ),
            CacheConfig(block_size=BLOCK_SIZE, num_blocks=num_blocks, enable_prefix_caching=caching),
            num_blocks,
            256,
            emit_token_ids=self.rng.random() < 0.5,
        )
        self.s.async_scheduling = async_
        self.async_ = async_
        self.ex = SimExecutor(num_blocks)
        self.in_flight: deque = deque()
        plan = InstancePlan("i", ("d",), "mixed", (), num_blocks, BLOCK_SIZE)
        self.views = [InstanceView(plan, self.s), _CachedView(plan, self.s)]
        self.n = 0
        self.seen = {
            "preempted": 0,
            "aborted_waiting": 0,
            "aborted_running": 0,
            "aborted_receiving": 0,
            "landed": 0,
            "failed": 0,
            "sent": 0,
        }

    def check(self) -> None:
        s = self.s
        assert s.num_waiting_prefill_tokens == brute_waiting(s)
        for v in self.views:
            assert v.pending_prefill_tokens() == brute_pending(s)
        s.kv.check_invariants()

    def add(self) -> None:
        rng = self.rng
        prompt = [rng.randrange(3) for _ in range(rng.randint(1, 24))]  # a tiny vocabulary: prefix hits
        sp = SamplingParams(max_tokens=rng.randint(1, 12), seed=rng.choice([None, 1]))
        kind = rng.random()
        out: list[int] = []
        kt = None
        if kind < 0.2:  # a sender: computes a head of the prompt (Cronus) or all of it and samples one (PD)
            kt = KVTransferParams(compute_limit=rng.choice([None, rng.randint(1, len(prompt))]), send=True)
        elif kind < 0.45 and len(prompt) > 1:  # a receiver: its first tokens' KV comes from elsewhere
            if rng.random() < 0.5:
                out = [1]
            kt = KVTransferParams(num_remote_tokens=rng.randint(1, len(prompt) + len(out) - 1), remote_instance="p")
        self.n += 1
        self.s.add_request(Request(f"r{self.n}", prompt, sp, output_token_ids=out, kv_transfer=kt))

    def abort(self) -> None:
        s = self.s
        live = list(s.requests.values())
        if not live:
            return
        req = self.rng.choice(live)
        key = {RequestStatus.RUNNING: "aborted_running", RequestStatus.WAITING_FOR_REMOTE_KV: "aborted_receiving"}
        self.seen[key.get(req.status, "aborted_waiting")] += 1
        assert s.finish_requests([req.request_id], RequestStatus.FINISHED_ABORTED) == [req]

    def land(self) -> None:
        if self.s.receiving:
            rid = self.rng.choice(sorted(self.s.receiving))
            ok = self.rng.random() < 0.7
            self.seen["landed" if ok else "failed"] += 1
            self.s.finish_remote_kv(rid, success=ok)

    def release(self) -> None:
        if self.s.pinned:
            self.seen["sent"] += 1
            self.s.release_remote(self.rng.choice(sorted(self.s.pinned)))

    def step(self) -> None:
        s = self.s
        before = s.num_preemptions
        so = s.schedule()
        self.seen["preempted"] += s.num_preemptions - before
        self.check()
        self.in_flight.append((so, self.ex.execute(so)))
        # async: one step stays in flight, as the engine loop and the simulator keep it
        while len(self.in_flight) > (1 if self.async_ else 0):
            s.update_from_output(*self.in_flight.popleft())
            self.check()

    def go(self, num_ops: int) -> None:
        ops = [self.add] * 3 + [self.step] * 6 + [self.abort, self.land, self.land, self.release, self.s.start_kv_loads]
        for _ in range(num_ops):
            self.rng.choice(ops)()
            self.check()
        while self.in_flight:  # drain: everything finishes, nothing is left behind
            self.s.update_from_output(*self.in_flight.popleft())
        for i in range(2000):
            if not (self.s.has_unfinished() or self.s.pinned or self.in_flight):
                break
            self.land()
            self.release()
            self.step()
        while self.in_flight:
            self.s.update_from_output(*self.in_flight.popleft())
        assert not self.s.has_unfinished() and not self.s.pinned
        assert self.s.num_waiting_prefill_tokens == 0
        assert self.s.kv.pool.num_free_blocks == self.s.kv.pool.num_usable_blocks


@pytest.mark.parametrize("async_", [False, True])
@pytest.mark.parametrize("caching", [False, True])
def test_waiting_prefill_tokens_match_brute_force(async_: bool, caching: bool) -> None:
    seen: dict[str, int] = {}
    for seed in range(12):
        run = _Run(seed, async_, caching)
        run.go(400)
        for k, v in run.seen.items():
            seen[k] = seen.get(k, 0) + v
    # every path that moves requests in or out of the waiting queue was taken
    assert all(v > 0 for v in seen.values()), seen


def test_waiting_queue_refuses_mutations_that_bypass_its_books() -> None:
    q = WaitingQueue()
    a = Request("a", [1, 2, 3], SamplingParams())
    b = Request("b", [1] * 5, SamplingParams(), kv_transfer=KVTransferParams(compute_limit=2, send=True))
    q.append(a)
    q.appendleft(b)
    assert q.num_prefill_tokens == 3 + 2 and [r.request_id for r in q] == ["b", "a"] and q[0] is b
    for bad in (
        lambda: q.pop(),
        lambda: q.extend([a]),
        lambda: q.extendleft([a]),
        lambda: q.insert(0, a),
        lambda: q.rotate(1),
        lambda: q.clear(),
        lambda: q.__setitem__(0, a),
        lambda: q.__delitem__(0),
    ):
        with pytest.raises(NotImplementedError):
            bad()
    assert q.num_prefill_tokens == 5 and len(q) == 2
    q.remove(a)
    assert q.popleft() is b and q.num_prefill_tokens == 0 and not q
    assert WaitingQueue([a, b]).num_prefill_tokens == 5
    q = WaitingQueue([a, b])
    for c in (copy.copy(q), copy.deepcopy(q)):
        assert type(c) is WaitingQueue and c.num_prefill_tokens == 5 and [r.request_id for r in c] == ["a", "b"]


def _may_run_ahead_reference(req: Request) -> bool:
    """The rule as the docstring states it, evaluated from scratch."""
    sp, kt = req.sampling_params, req.kv_transfer
    if kt is not None and (kt.send or kt.compute_limit is not None or kt.num_remote_tokens > 0):
        return False
    if sp.min_tokens > 0 or sp.seed is not None or sp.repetition_penalty != 1.0:
        return False
    if sp.presence_penalty != 0.0 or sp.frequency_penalty != 0.0:
        return False
    ahead = req.num_pending_tokens + 1
    if sp.max_tokens is not None and len(req.output_token_ids) + ahead > sp.max_tokens:
        return False
    return (
        req.max_model_len is None or len(req.prompt_token_ids) + len(req.output_token_ids) + ahead <= req.max_model_len
    )


def test_may_run_ahead_matches_its_rule() -> None:
    rng = random.Random(0)
    for _ in range(3000):
        max_tokens = rng.choice([None, 1, 3, 8])
        sp = SamplingParams(
            max_tokens=max_tokens,
            min_tokens=rng.choice([0, 0, 0, 1]) if max_tokens != 0 else 0,
            seed=rng.choice([None, None, 7]),
            repetition_penalty=rng.choice([1.0, 1.0, 1.1]),
            presence_penalty=rng.choice([0.0, 0.0, 0.5]),
            frequency_penalty=rng.choice([0.0, 0.0, -0.5]),
        )
        kt = rng.choice(
            [
                None,
                None,
                KVTransferParams(send=True),
                KVTransferParams(compute_limit=4),
                KVTransferParams(num_remote_tokens=3),
                KVTransferParams(num_remote_tokens=0),
            ]
        )
        req = Request(
            "r",
            [1] * rng.randint(1, 6),
            sp,
            output_token_ids=[2] * rng.randint(0, 5),
            kv_transfer=kt,
            max_model_len=rng.choice([None, 6, 10]),
        )
        for _ in range(rng.randint(0, 3)):
            req.append_output(2)
        req.num_pending_tokens = rng.randint(0, 2)
        assert req.num_tokens == len(req.prompt_token_ids) + len(req.output_token_ids)
        assert req.may_run_ahead == _may_run_ahead_reference(req)
