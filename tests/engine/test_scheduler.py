from __future__ import annotations

import random

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hetserve.core.config import CacheConfig, SchedulerConfig
from hetserve.core.request import Request, RequestStatus
from hetserve.core.sampling_params import SamplingParams
from hetserve.engine.core import EngineCore
from hetserve.engine.sched.scheduler import Scheduler

from .fake_executor import AsyncShadowExecutor, ShadowExecutor, brute_force


def make(num_blocks=64, block_size=4, budget=32, max_seqs=8, caching=True, max_len=256, async_=False):
    sched = Scheduler(
        SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=max_seqs),
        CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=caching),
        num_blocks,
        max_len,
    )
    ex = AsyncShadowExecutor(num_blocks, block_size) if async_ else ShadowExecutor(num_blocks, block_size)
    return sched, ex, EngineCore(sched, ex, async_scheduling=async_)


def run_to_end(sched, core, outputs, max_steps=10_000):
    for _ in range(max_steps):
        if not sched.has_unfinished() and not core.has_step_in_flight:
            return
        for o in core.step():
            outputs.setdefault(o.req_id, []).extend(o.new_token_ids)
        sched.kv.check_invariants()
    raise AssertionError("did not finish")


def step(core, outputs):
    for o in core.step():
        outputs.setdefault(o.req_id, []).extend(o.new_token_ids)


def add(sched, rid, prompt, max_tokens, **kw):
    r = Request(rid, list(prompt), SamplingParams(max_tokens=max_tokens, **kw))
    sched.add_request(r)
    return r


def check_step_limits(ex, budget, max_seqs):
    for so in ex.steps:
        assert so.total_num_scheduled_tokens == sum(s.num_tokens for s in so.scheduled) <= budget
        assert len(so.scheduled) <= max_seqs


def test_matches_brute_force_with_chunking_and_batching():
    rng = random.Random(0)
    sched, ex, core = make(num_blocks=256, budget=7, max_seqs=4)
    prompts = {f"r{i}": [rng.randrange(97) for _ in range(rng.randint(1, 30))] for i in range(10)}
    for rid, p in prompts.items():
        add(sched, rid, p, 12)
    outs: dict[str, list[int]] = {}
    run_to_end(sched, core, outs)
    for rid, p in prompts.items():
        assert outs[rid] == brute_force(p, 12)
    check_step_limits(ex, 7, 4)
    assert any(len(so.scheduled) > 1 for so in ex.steps)  # requests were batched
    assert sched.kv.pool.num_free_blocks == sched.kv.pool.num_usable_blocks


def test_preemption_newest_first_and_recompute_is_exact():
    rng = random.Random(1)
    # 13 usable blocks of 4 tokens: three requests growing to 40 tokens cannot all fit
    sched, ex, core = make(num_blocks=14, block_size=4, budget=64, max_seqs=8, max_len=48)
    prompts = {f"r{i}": [rng.randrange(97) for _ in range(10)] for i in range(3)}
    for rid, p in prompts.items():
        add(sched, rid, p, 30)
    outs: dict[str, list[int]] = {}
    preempted_order = []
    for _ in range(1000):
        if not sched.has_unfinished():
            break
        for o in core.step():
            outs.setdefault(o.req_id, []).extend(o.new_token_ids)
        preempted_order.extend(sorted(ex.steps[-1].preempted_req_ids))
        sched.kv.check_invariants()
    assert sched.num_preemptions > 0
    # the newest request (r2) is the first victim
    assert ex.steps and preempted_order[0] == "r2"
    for rid, p in prompts.items():
        assert outs[rid] == brute_force(p, 30)


def test_running_requests_scheduled_before_waiting():
    sched, ex, core = make(num_blocks=256, budget=8, max_seqs=8)
    add(sched, "a", list(range(20)), 5)
    core.step()  # a takes the whole budget with a chunk of 8
    add(sched, "b", list(range(30, 50)), 5)
    core.step()
    so = ex.steps[-1]
    assert so.scheduled[0].req_id == "a" and so.scheduled[0].num_tokens == 8


def test_prefix_cache_hit_shares_blocks_and_stays_exact():
    sched, ex, core = make(num_blocks=128, block_size=4, budget=64)
    prefix = list(range(1, 17))  # 4 full blocks
    add(sched, "a", prefix + [50, 51], 4)
    outs: dict[str, list[int]] = {}
    run_to_end(sched, core, outs)
    b = add(sched, "b", prefix + [60, 61, 62], 4)
    step(core, outs)
    assert b.num_cached_tokens == 16
    first = ex.steps[-1].scheduled[0]
    assert first.num_computed_tokens == 16 and first.token_ids == [60, 61, 62]
    run_to_end(sched, core, outs)
    assert outs["b"] == brute_force(prefix + [60, 61, 62], 4)


def test_full_prompt_hit_still_computes_last_token():
    sched, ex, core = make(num_blocks=64, block_size=4, budget=64)
    prompt = list(range(1, 9))  # exactly 2 blocks
    add(sched, "a", prompt, 3)
    outs: dict[str, list[int]] = {}
    run_to_end(sched, core, outs)
    add(sched, "b", prompt, 3)
    step(core, outs)
    s = ex.steps[-1].scheduled[0]
    assert s.num_computed_tokens == 4 and s.num_tokens == 4  # one block hit, the last block recomputed
    run_to_end(sched, core, outs)
    assert outs["a"] == outs["b"] == brute_force(prompt, 3)


def test_abort_frees_blocks_at_any_point():
    sched, ex, core = make(num_blocks=64, block_size=4, budget=5)
    add(sched, "a", list(range(1, 20)), 10)
    add(sched, "b", list(range(1, 20)), 10)
    core.step()  # a mid-prefill
    sched.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    sched.kv.check_invariants()
    sched.finish_requests(["b"], RequestStatus.FINISHED_ABORTED)  # still waiting
    sched.kv.check_invariants()
    assert sched.kv.pool.num_free_blocks == sched.kv.pool.num_usable_blocks
    assert not sched.has_unfinished()
    core.step()
    assert ex.steps[-1].finished_req_ids == {"a"}


def test_stop_conditions():
    sched, ex, core = make()
    p = [5, 6, 7]
    ref = brute_force(p, 20)
    eos = ref[3]
    r = Request("e", p, SamplingParams(max_tokens=20), eos_token_ids=frozenset({eos}))
    sched.add_request(r)
    add(sched, "m", p, 20, min_tokens=8, stop_token_ids=[eos])
    add(sched, "i", p, 6, ignore_eos=True)
    outs: dict[str, list[int]] = {}
    run_to_end(sched, core, outs)
    assert outs["e"] == ref[: ref.index(eos) + 1]
    first_after_min = next(i for i in range(8, 20) if ref[i] == eos) if eos in ref[8:] else 19
    assert outs["m"] == ref[: first_after_min + 1]
    assert outs["i"] == ref[:6]


# ---- property test: any interleaving of add / step / abort keeps the books straight ----------------
op = st.one_of(
    st.tuples(st.just("add"), st.integers(1, 24), st.integers(1, 12), st.integers(0, 3)),
    st.tuples(st.just("step"), st.integers(1, 4)),
    st.tuples(st.just("abort"), st.integers(0, 50)),
)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, min_size=1, max_size=40), num_blocks=st.integers(12, 40), budget=st.integers(1, 24),
       block_size=st.sampled_from([1, 2, 4]), caching=st.booleans(), async_=st.booleans())
def test_property_no_leaks_and_exact(ops, num_blocks, budget, block_size, caching, async_):
    """Random adds, steps and aborts, with and without async scheduling (one step in flight, decodes on
    placeholders): no leaked block, every context slot right, outputs equal a brute-force generation."""
    max_len = (num_blocks - 1) * block_size
    sched, ex, core = make(num_blocks=num_blocks, block_size=block_size, budget=budget, max_seqs=4,
                           caching=caching, max_len=max_len, async_=async_)
    prefixes = [[1, 2, 3, 4, 5, 6, 7, 8], [9, 9, 9, 9], [3, 1, 4, 1, 5, 9, 2, 6], []]
    prompts: dict[str, list[int]] = {}
    limits: dict[str, int] = {}
    aborted: set[str] = set()
    outs: dict[str, list[int]] = {}
    n = 0
    for o in ops:
        if o[0] == "add":
            _, plen, mt, pi = o
            prompt = (prefixes[pi] + [(n * 7 + k) % 97 for k in range(plen)])[: max(1, max_len - mt)]
            if len(prompt) + mt > max_len:
                continue
            rid = f"q{n}"
            n += 1
            prompts[rid], limits[rid] = prompt, mt
            add(sched, rid, prompt, mt)
        elif o[0] == "step":
            for _ in range(o[1]):
                for out in core.step():
                    outs.setdefault(out.req_id, []).extend(out.new_token_ids)
        else:
            if prompts:
                rid = sorted(prompts)[o[1] % len(prompts)]
                if sched.finish_requests([rid], RequestStatus.FINISHED_ABORTED):
                    aborted.add(rid)
        sched.kv.check_invariants()
    run_to_end(sched, core, outs)
    assert sched.kv.pool.num_free_blocks == sched.kv.pool.num_usable_blocks
    assert not sched.kv.req_to_blocks
    check_step_limits(ex, budget, 4)
    for rid, p in prompts.items():
        ref = brute_force(p, limits[rid])
        got = outs.get(rid, [])
        if rid in aborted:
            assert got == ref[: len(got)]
        else:
            assert got == ref


def test_two_steps_in_flight_pipeline_style():
    """Pipeline parallelism keeps several steps in flight; results apply in order and stay exact."""
    rng = random.Random(5)
    sched, ex, core = make(num_blocks=128, block_size=4, budget=6, max_seqs=4)
    prompts = {f"p{i}": [rng.randrange(97) for _ in range(rng.randint(3, 20))] for i in range(6)}
    for rid, p in prompts.items():
        add(sched, rid, p, 8)
    outs: dict[str, list[int]] = {}
    in_flight = []
    for _ in range(2000):
        if not sched.has_unfinished() and not in_flight:
            break
        in_flight.append(sched.schedule())
        if len(in_flight) == 2 or in_flight[-1].is_empty:
            so = in_flight.pop(0)
            for o in sched.update_from_output(so, ex.execute(so)):
                outs.setdefault(o.req_id, []).extend(o.new_token_ids)
            sched.kv.check_invariants()
    for rid, p in prompts.items():
        assert outs[rid] == brute_force(p, 8)


def test_pipelined_steps_with_preemption_apply_no_stale_output():
    """Three steps in flight and pools small enough to preempt: a step scheduled before a request was preempted
    and re-admitted must not add its (stale) token to the re-admitted request (the shadow executor also checks
    every step's tokens against what it has seen)."""
    preempted = 0
    for seed in range(40):
        rng = random.Random(seed)
        sched, ex, _ = make(num_blocks=rng.randint(8, 16), block_size=4, budget=rng.choice([4, 8, 16]), max_seqs=4,
                            caching=False)
        prompts = {f"q{i}": [rng.randrange(97) for _ in range(rng.randint(3, 12))] for i in range(8)}
        for rid, p in prompts.items():
            add(sched, rid, p, 10)
        outs: dict[str, list[int]] = {}
        in_flight = []
        for _ in range(5000):
            if not sched.has_unfinished() and not in_flight:
                break
            so = sched.schedule()
            in_flight.append((so, ex.execute(so)))  # executed in order, as a pipeline's last stage answers
            if len(in_flight) == 3 or so.is_empty:
                done, ro = in_flight.pop(0)
                for o in sched.update_from_output(done, ro):
                    outs.setdefault(o.req_id, []).extend(o.new_token_ids)
                sched.kv.check_invariants()
        preempted += sched.num_preemptions
        for rid, p in prompts.items():
            assert outs[rid] == brute_force(p, 10), (seed, rid)
    assert preempted > 0, "the case needs preemption to mean anything"


# ---- async scheduling: one step in flight, decodes on placeholders ----------------------------------------


def _sampling_steps(ex, rid):
    return sum(1 for so in ex.steps for s in so.scheduled if s.req_id == rid and s.sample)


def test_async_scheduling_runs_decodes_ahead_and_stays_exact():
    rng = random.Random(3)
    sched, ex, core = make(num_blocks=256, budget=9, max_seqs=4, async_=True)
    prompts = {f"r{i}": [rng.randrange(97) for _ in range(rng.randint(1, 30))] for i in range(10)}
    limits = {rid: rng.randint(1, 14) for rid in prompts}
    for rid, p in prompts.items():
        add(sched, rid, p, limits[rid])
    outs: dict[str, list[int]] = {}
    run_to_end(sched, core, outs)
    for rid, p in prompts.items():
        assert outs[rid] == brute_force(p, limits[rid])
        # never a sampling step past max_tokens (the scheduler counts the tokens in flight)
        assert _sampling_steps(ex, rid) == limits[rid]
    assert ex.num_placeholders > 0
    check_step_limits(ex, 9, 4)
    assert sched.kv.pool.num_free_blocks == sched.kv.pool.num_usable_blocks


def test_async_scheduling_waits_for_requests_whose_sampling_needs_the_last_token():
    """Penalties, a seed or min_tokens need the previous token on the host: such requests skip a step instead of
    running on a placeholder; plain ones in the same batch still run ahead."""
    sched, ex, core = make(num_blocks=256, budget=64, max_seqs=8, async_=True)
    kinds = {"plain": {}, "pen": {"repetition_penalty": 1.2}, "seed": {"seed": 7, "temperature": 0.8},
             "minlen": {"min_tokens": 3}}
    for rid, kw in kinds.items():
        add(sched, rid, [1, 2, 3, 4, 5], 6, **kw)
    outs: dict[str, list[int]] = {}
    run_to_end(sched, core, outs)
    ph = {rid: sum(1 for so in ex.steps for s in so.scheduled if s.req_id == rid and s.placeholder) for rid in kinds}
    assert ph["plain"] > 0
    assert ph["pen"] == ph["seed"] == ph["minlen"] == 0
    for rid in kinds:
        assert len(outs[rid]) == 6


def test_async_scheduling_with_preemption_is_exact():
    preempted = 0
    for seed in range(20):
        rng = random.Random(seed)
        sched, _, core = make(num_blocks=rng.randint(8, 16), block_size=4, budget=rng.choice([4, 8, 16]),
                               max_seqs=4, caching=False, async_=True)
        prompts = {f"q{i}": [rng.randrange(97) for _ in range(rng.randint(3, 12))] for i in range(8)}
        for rid, p in prompts.items():
            add(sched, rid, p, 10)
        outs: dict[str, list[int]] = {}
        run_to_end(sched, core, outs)
        preempted += sched.num_preemptions
        for rid, p in prompts.items():
            assert outs[rid] == brute_force(p, 10), (seed, rid)
        assert sched.kv.pool.num_free_blocks == sched.kv.pool.num_usable_blocks
    assert preempted > 0, "the case needs preemption to mean anything"


def test_async_scheduling_stop_in_flight_drops_the_extra_token():
    """A request that stops on a token (EOS-like stop_token_ids) in step N was already scheduled into step N+1 on a
    placeholder; that step's token for it is dropped, the output ends at the stop token."""
    prompt = [4, 8, 15, 16, 23]
    ref = brute_force(prompt, 20)
    stop_at = ref[5]
    sched, ex, core = make(num_blocks=64, budget=32, max_seqs=4, async_=True)
    add(sched, "s", prompt, 20, stop_token_ids=[stop_at])
    outs: dict[str, list[int]] = {}
    run_to_end(sched, core, outs)
    want = ref[: ref.index(stop_at) + 1]
    assert outs["s"] == want
    assert _sampling_steps(ex, "s") == len(want) + 1  # the one wasted run-ahead step
    assert sched.kv.pool.num_free_blocks == sched.kv.pool.num_usable_blocks
