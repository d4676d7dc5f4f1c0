"""Discrete-event simulation of a deployment: the engine's own schedulers, timed by the cost model.

A heap of timed events; each handler returns nothing and pushes the events it causes. Every instance
runs the real ``hetserve.engine.sched.Scheduler`` with a ``SimExecutor`` in place of a model runner, so
batching, chunking, preemption and KV books are exactly the engine's.
"""

from __future__ import annotations

import gc
import heapq
import itertools
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hetserve.core.config import CacheConfig, SchedulerConfig
from hetserve.core.interfaces import Executor
from hetserve.core.outputs import ModelRunnerOutput, SchedulerOutput
from hetserve.core.request import KVTransferParams, Request, RequestStatus
from hetserve.core.sampling_params import SamplingParams
from hetserve.engine.sched.scheduler import Scheduler
from hetserve.sim.contention import Contention
from hetserve.sim.workload import SimRequest
from hetserve.strategies.base import Deployment, InstancePlan, InstanceView

_TOKEN = 1  # every simulated token; requests ignore EOS and run to max_tokens


class SimExecutor(Executor):
    """Samples a fixed token for every request that asks; time comes from the deployment's cost."""

    def __init__(self, num_blocks: int) -> None:
        self._num_blocks = num_blocks

    @property
    def num_kv_blocks(self) -> int:
        return self._num_blocks

    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        # the scheduler only reads these lists, so two shared ones serve every row
        one, none = _ONE_TOKEN, _NO_TOKEN
        sched = so.scheduled
        return ModelRunnerOutput(
            req_ids=[s.req_id for s in sched],
            sampled_token_ids=[one if s.sample else none for s in sched],
        )


_ONE_TOKEN: list[int] = [_TOKEN]
_NO_TOKEN: list[int] = []


@dataclass(slots=True)
class _Track:
    spec: SimRequest
    index: int
    first_token_s: float | None = None
    last_token_s: float | None = None
    token_times: list[float] = field(default_factory=list)
    done_s: float | None = None
    num_tokens: int = 0
    failed: str = ""


class _CachedView(InstanceView):
    """An InstanceView whose O(batch) figure is computed once per scheduler state: routing asks every instance
    for each arriving request. The running requests' unfinished prompts change only when a step is scheduled
    (the step counter moves) or a running request leaves (between two steps the running list only shrinks),
    so the step counter and the running list's length key them; the waiting part is the scheduler's own O(1)
    figure."""

    def __init__(self, plan: InstancePlan, scheduler: Scheduler) -> None:
        super().__init__(plan, scheduler)
        self._key: tuple[int, int] = (-1, 0)
        self._running_pending = 0

    def running_prefill_tokens(self) -> int:
        s = self.scheduler
        key = (s._step_id, len(s.running))
        if key != self._key:
            self._key = key
            self._running_pending = super().running_prefill_tokens()
        return self._running_pending


class _Instance:
    def __init__(self, plan: InstancePlan) -> None:
        self.plan = plan
        self.scheduler = Scheduler(
            SchedulerConfig(max_num_batched_tokens=plan.max_num_batched_tokens, max_num_seqs=plan.max_num_seqs),
            CacheConfig(block_size=plan.block_size, num_blocks=plan.num_kv_blocks, enable_prefix_caching=False),
            plan.num_kv_blocks,
            plan.max_model_len,
            emit_token_ids=False,
        )
        self.executor = SimExecutor(plan.num_kv_blocks)
        self.stage_free_s = [0.0] * plan.num_stages
        self.in_flight = 0
        self.kick_pending = False
        self.busy_s = 0.0
        self.num_steps = 0
        # a step that starts after the instance sat idle pays the device's measured wake-up cost
        self.idle_since_s = 0.0
        self.wake_s: Callable[[float], float] | None = getattr(plan.cost, "idle_wake_s", None)
        self.async_cost = bool(getattr(plan.cost, "async_scheduling", False))
        # async scheduling (an LLMEngine on a GPU, or a one-worker instance of the cluster runtime): step N+1 is
        # scheduled when step N starts, so one more step is in flight, queued behind the running one; a request
        # that arrives meanwhile joins the step after it, and decodes run ahead on placeholders
        ahead = self.async_cost or bool(getattr(plan.cost, "schedules_ahead", False))
        self.lookahead = ahead and plan.num_stages == 1
        self.scheduler.async_scheduling = self.lookahead
        self.max_in_flight = plan.num_stages + (1 if self.lookahead else 0)


@dataclass
class SimResult:
    records: list[Any]
    duration_s: float
    instances: dict[str, dict[str, Any]]
    num_events: int

    def metrics(self, slo: Any = None) -> dict[str, Any]:
        from hetserve.bench.metrics import compute_metrics

        return compute_metrics(self.records, self.duration_s, slo)


class Simulator:
    def __init__(self, deployment: Deployment, *, max_sim_time_s: float | None = None,
                 contention: dict[str, Contention] | None = None) -> None:
        """``contention``: instances on partitions of one GPU (see ``sim/contention.py``; from
        ``shared_gpu_contention(cluster, deployment)``); none by default."""
        self.deployment = deployment
        self.max_sim_time_s = max_sim_time_s
        self.contention = contention or {}
        self.instances = {name: _Instance(p) for name, p in deployment.plans.items()}
        self.views: dict[str, InstanceView] = {n: _CachedView(i.plan, i.scheduler) for n, i in self.instances.items()}
        self._heap: list[tuple[float, int, Callable[[float], None]]] = []
        self._seq = itertools.count()
        self._tracks: dict[str, _Track] = {}
        self._prompts: dict[int, list[int]] = {}
        self.now_s = 0.0
        self._ttft_limit_s = self._tpot_limit_s = float("inf")
        self._num_bad, self._max_bad, self.stopped_early = 0, 1 << 62, False
        self._count_from_s = 0.0

    def _push(self, t: float, fn: Callable[[float], None]) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), fn))

    def _prompt(self, n: int) -> list[int]:
        p = self._prompts.get(n)
        if p is None:
            p = self._prompts[n] = [_TOKEN] * n  # shared, never mutated
        return p

    # ---- events ---------------------------------------------------------------------------
    def _arrive(self, rid: str, spec: SimRequest) -> Callable[[float], None]:
        def fire(now: float) -> None:
            req = Request(
                rid,
                self._prompt(spec.prompt_len),
                SamplingParams(max_tokens=spec.output_len, ignore_eos=True, detokenize=False),
            )
            name, kt = self.deployment.route(req, self.views, now)
            req.kv_transfer = kt
            self._admit(name, req, now)

        return fire

    def _admit(self, name: str, req: Request, now: float) -> bool:
        inst = self.instances[name]
        sched = inst.scheduler
        if req.num_prompt_tokens + (req.sampling_params.max_tokens or 0) > sched.max_model_len:
            tr = self._tracks[req.request_id]
            tr.failed = f"longer than max_model_len {sched.max_model_len} on {name}"
            tr.done_s = now
            return False
        sched.add_request(req)
        self._kick(name, now)
        return True

    def _kick(self, name: str, now: float) -> None:
        inst = self.instances[name]
        if inst.kick_pending:
            return
        while inst.in_flight < inst.max_in_flight:
            if now < inst.stage_free_s[0] and not inst.lookahead:
                inst.kick_pending = True
                self._push(inst.stage_free_s[0], self._rekick(name))
                return
            so = inst.scheduler.schedule()
            for load in so.kv_loads:
                self._start_transfer(load.req_id, name, load.num_tokens, now)
            if so.is_empty:
                if so.finished_req_ids or so.preempted_req_ids:
                    inst.executor.execute(so)
                return
            # with async scheduling a step overlaps its host work with the step before; after an idle gap there
            # is none, so it pays both in series
            after_gap = inst.in_flight == 0 and now > inst.idle_since_s
            times = self.deployment.stage_times_s(name, so, serial=after_gap)
            c = self.contention.get(name)
            if c is not None and ((c.spans and inst.in_flight > 0) or any(
                o != name and oc.gpu == c.gpu and self.instances[o].in_flight > 0 for o, oc in self.contention.items()
            )):
                # another partition of this GPU is busy: its HBM and L2 are shared
                f = c.memory if so.total_num_scheduled_tokens <= 2 * len(so.scheduled) else c.compute
                times = [t * f for t in times]
            if after_gap and inst.wake_s is not None:
                times = [times[0] + inst.wake_s(now - inst.idle_since_s), *times[1:]]
            t = now
            for i, dt in enumerate(times):
                t = max(t, inst.stage_free_s[i]) + dt
                inst.stage_free_s[i] = t
            inst.busy_s += times[0]
            inst.num_steps += 1
            inst.in_flight += 1
            ro = inst.executor.execute(so)
            self._push(t, self._step_done(name, so, ro))

    def _rekick(self, name: str) -> Callable[[float], None]:
        def fire(now: float) -> None:
            self.instances[name].kick_pending = False
            self._kick(name, now)

        return fire

    def _step_done(self, name: str, so: SchedulerOutput, ro: ModelRunnerOutput) -> Callable[[float], None]:
        def fire(now: float) -> None:
            inst = self.instances[name]
            inst.in_flight -= 1
            if inst.in_flight == 0:
                inst.idle_since_s = now
            outs = inst.scheduler.update_from_output(so, ro)
            tracks = self._tracks
            for o in outs:
                tr = tracks[o.req_id]
                new_ids = o.new_token_ids
                if new_ids:
                    if tr.first_token_s is None:
                        tr.first_token_s = now
                        if now - tr.spec.arrival_s > self._ttft_limit_s:
                            self._count_bad(tr)
                    tr.token_times.append(now)
                    tr.num_tokens += len(new_ids)
                reason = o.finish_reason
                if reason is None:
                    continue
                if reason == "remote":
                    self._handoff(name, o.req_id, now)
                else:
                    tr.done_s = now
                    first = tr.first_token_s
                    # a request already counted for its TTFT is not counted again for its TPOT
                    if (
                        first is not None
                        and tr.num_tokens > 1
                        and first - tr.spec.arrival_s <= self._ttft_limit_s
                        and (now - first) / (tr.num_tokens - 1) > self._tpot_limit_s
                    ):
                        self._count_bad(tr)
            self.deployment.on_step_done(name, self.views, now)
            self._kick(name, now)

        return fire

    def _count_bad(self, tr: _Track) -> None:
        if tr.spec.arrival_s < self._count_from_s:
            return
        self._num_bad += 1
        if self._num_bad >= self._max_bad:
            self.stopped_early = True

    def _handoff(self, src: str, rid: str, now: float) -> None:
        old = self.instances[src].scheduler.pinned[rid]
        target = self.deployment.handoff(src, old, self.views, now)
        assert target is not None, f"{self.deployment.strategy} left request {rid} pinned on {src} with no taker"
        dst, n_remote = target
        req = Request(
            rid,
            old.prompt_token_ids,
            old.sampling_params,
            output_token_ids=list(old.output_token_ids),
            kv_transfer=KVTransferParams(num_remote_tokens=n_remote, remote_instance=src),
        )
        self._pending_src[rid] = src
        if not self._admit(dst, req, now):
            del self._pending_src[rid]
            self.instances[src].scheduler.release_remote(rid)
            return
        # a busy receiver reserves blocks and starts the transfer at once, as the runtime does
        for load in self.instances[dst].scheduler.start_kv_loads():
            self._start_transfer(load.req_id, dst, load.num_tokens, now)

    def _start_transfer(self, rid: str, dst: str, num_tokens: int, now: float) -> None:
        src = self._pending_src.pop(rid)
        dt = self.deployment.transfer_time_s(src, dst, num_tokens)
        # transfers between one pair of instances share the link: first come, first served
        start = max(now, self._link_free_s.get((src, dst), 0.0))
        self._link_free_s[(src, dst)] = start + dt
        dt += start - now

        def fire(t: float) -> None:
            self.instances[src].scheduler.release_remote(rid)
            self.instances[dst].scheduler.finish_remote_kv(rid, success=True)
            self._kick(src, t)
            self._kick(dst, t)

        self._push(now + dt, fire)

    # ---- run ------------------------------------------------------------------------------
    def run(
        self,
        workload: list[SimRequest],
        *,
        stop_after_bad: tuple[float | None, float | None, int] | None = None,
        count_bad_from_s: float = 0.0,
    ) -> SimResult:
        """Simulate ``workload`` to the end (or ``max_sim_time_s``). ``stop_after_bad = (ttft_s, tpot_s, n)``
        stops early once ``n`` requests that arrived at or after ``count_bad_from_s`` have missed a TTFT or
        TPOT limit (None: no limit): the planner's rate search needs only to know that a rate fails, not by
        how much. Unfinished requests then count as failed."""
        from hetserve.bench.records import RequestRecord

        inf = float("inf")
        ttft_lim, tpot_lim, max_bad = stop_after_bad or (None, None, 0)
        self._ttft_limit_s = inf if ttft_lim is None else ttft_lim
        self._tpot_limit_s = inf if tpot_lim is None else tpot_lim
        self._max_bad = max_bad if stop_after_bad else 1 << 62
        self._num_bad = 0
        self._count_from_s = count_bad_from_s
        self.stopped_early = False

        self._pending_src: dict[str, str] = {}
        self._link_free_s: dict[tuple[str, str], float] = {}
        for i, spec in enumerate(workload):
            self._tracks[str(i)] = _Track(spec, i)
        # arrivals stay out of the heap (it then holds only the few events in flight, so a pop is cheap) and are
        # merged in by (time, sequence number) as if they had been pushed first, in workload order
        seq0 = next(self._seq)
        self._seq = itertools.count(seq0 + len(workload))
        order = sorted(range(len(workload)), key=lambda i: workload[i].arrival_s)
        heap = self._heap
        num_arrivals = len(order)
        k = 0
        n_events = 0
        # the loop allocates millions of short-lived objects and makes no reference cycles (refcounting frees them
        # all), so the cyclic collector only walks every live block, request and record for nothing (up to a fifth
        # of a run); it is back on, as it was, before this returns
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            while (heap or k < num_arrivals) and not self.stopped_early:
                if k < num_arrivals:
                    i = order[k]
                    t = workload[i].arrival_s
                    top = heap[0] if heap else None
                    if top is None or t < top[0] or (t == top[0] and seq0 + i < top[1]):
                        fn = self._arrive(str(i), workload[i])
                        k += 1
                    else:
                        t, _, fn = heapq.heappop(heap)
                else:
                    t, _, fn = heapq.heappop(heap)
                if self.max_sim_time_s is not None and t > self.max_sim_time_s:
                    break
                self.now_s = t
                fn(t)
                n_events += 1
        finally:
            if gc_was_enabled:
                gc.enable()
        start = min((s.arrival_s for s in workload), default=0.0)
        records = []
        end = start
        for tr in self._tracks.values():
            a = tr.spec.arrival_s
            ok = tr.done_s is not None and not tr.failed and tr.first_token_s is not None
            rec = RequestRecord(
                index=tr.index,
                prompt_len=tr.spec.prompt_len,
                expected_output_len=tr.spec.output_len,
                scheduled_s=a - start,
            )
            if ok and tr.first_token_s is not None:
                rec.success = True
                rec.output_len = tr.num_tokens
                rec.ttft_s = tr.first_token_s - a
                times = tr.token_times
                rec.itl_s = list(map(operator.sub, times[1:], times))  # gaps between tokens
                rec.e2el_s = times[-1] - a
                rec.start_s, rec.end_s = a - start, times[-1] - start
                end = max(end, times[-1])
            else:
                rec.error = tr.failed or "not finished when the simulation stopped"
            records.append(rec)
        stats = {
            name: {
                "busy_s": i.busy_s,
                "num_steps": i.num_steps,
                "num_preemptions": i.scheduler.num_preemptions,
                "utilization": i.busy_s / max(end - start, 1e-9),
            }
            for name, i in self.instances.items()
        }
        return SimResult(records, end - start, stats, n_events)


def ttft_lower_bounds_s(sim: Simulator, from_s: float = 0.0) -> list[float]:
    """TTFT of every request that arrived in [``from_s``, end of run]; one still waiting for its first token
    counts the time it has waited (a lower bound), so an early stop does not hide the queue."""
    out = []
    for tr in sim._tracks.values():
        a = tr.spec.arrival_s
        if a < from_s:
            continue
        if tr.first_token_s is not None:
            out.append(tr.first_token_s - a)
        elif a <= sim.now_s and not tr.failed:
            out.append(sim.now_s - a)
    return out


def unfinished(sim: Simulator) -> list[str]:
    return [rid for rid, t in sim._tracks.items() if t.done_s is None]


__all__ = ["RequestStatus", "SimExecutor", "SimResult", "Simulator", "ttft_lower_bounds_s", "unfinished"]
