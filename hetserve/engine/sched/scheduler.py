"""The scheduler, vLLM v1 style: one token budget per step, no prefill or decode modes.

Each step catches requests up by some tokens: running requests first (a decode is one token, a long prompt
advances by a chunk), then waiting ones while the budget, ``max_num_seqs`` and the KV pool allow. When the
pool runs dry the newest running request is preempted (its KV is dropped and recomputed later).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable

from hetserve.core.config import CacheConfig, SchedulerConfig
from hetserve.core.outputs import (
    EngineCoreOutput,
    KVLoad,
    ModelRunnerOutput,
    NewRequestInfo,
    ScheduledRequest,
    SchedulerOutput,
)
from hetserve.core.request import Request, RequestStatus
from hetserve.engine.kv.kv_cache_manager import KVCacheManager


class WaitingQueue(deque[Request]):
    """The waiting requests, in admission order, and the tokens they still need computed here
    (``num_target_tokens - num_computed_tokens`` each, summed): routing asks for that figure on every arrival,
    and a sum over the queue then costs O(queue) each time. A request's share is recorded when it joins and
    taken off when it leaves (a waiting request does not change: it computes nothing and samples nothing).
    Only the mutations the scheduler uses are offered; the others raise, so none can bypass the books."""

    def __init__(self, requests: Iterable[Request] = ()) -> None:
        super().__init__()
        self.num_prefill_tokens = 0
        self._shares: dict[str, int] = {}
        for req in requests:
            self.append(req)

    def _join(self, req: Request) -> None:
        n = req.num_target_tokens - req.num_computed_tokens
        self._shares[req.request_id] = n
        self.num_prefill_tokens += n

    def _leave(self, req: Request) -> None:
        self.num_prefill_tokens -= self._shares.pop(req.request_id)

    def append(self, req: Request) -> None:
        super().append(req)
        self._join(req)

    def appendleft(self, req: Request) -> None:
        super().appendleft(req)
        self._join(req)

    def popleft(self) -> Request:
        req = super().popleft()
        self._leave(req)
        return req

    def remove(self, req: Request) -> None:
        super().remove(req)
        self._leave(req)

    def __reduce__(self) -> tuple[type[WaitingQueue], tuple[list[Request]]]:  # type: ignore[override]
        # a copy rebuilds its books from the requests
        return type(self), (list(self),)

    def _unsupported(self, *args: object, **kwargs: object) -> None:
        raise NotImplementedError("WaitingQueue keeps books: use append, appendleft, popleft or remove")

    pop = extend = extendleft = insert = rotate = clear = _unsupported  # type: ignore[assignment]
    __setitem__ = __delitem__ = __iadd__ = __imul__ = _unsupported  # type: ignore[assignment]


class Scheduler:
    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        cache_config: CacheConfig,
        num_blocks: int,
        max_model_len: int,
        emit_token_ids: bool = True,
    ) -> None:
        self.config = scheduler_config
        self.emit_token_ids = emit_token_ids
        self.block_size = cache_config.block_size
        self.max_model_len = max_model_len
        self.kv = KVCacheManager(num_blocks, cache_config.block_size, cache_config.enable_prefix_caching)
        self.requests: dict[str, Request] = {}
        self.waiting = WaitingQueue()
        self.running: list[Request] = []
        # KV in flight from another instance, blocks allocated (receiving side)
        self.receiving: dict[str, Request] = {}
        # finished here, KV pinned until another instance has taken it (sending side)
        self.pinned: dict[str, Request] = {}
        # requests the executor holds state for; everything else is sent in full
        self._known_to_executor: set[str] = set()
        self._finished_since_last_step: set[str] = set()
        self._preempted_since_last_step: set[str] = set()
        self._step_id = 0
        self.num_preemptions = 0
        # set by the engine loop when it schedules step N+1 before step N's tokens are back (one step in flight,
        # an executor that keeps sampled tokens on the device): a decode may then be scheduled on a placeholder
        self.async_scheduling = False

    # ---- admission and removal -------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        if req.max_model_len is None:
            req.max_model_len = self.max_model_len
        self.requests[req.request_id] = req
        self.waiting.append(req)

    def finish_requests(self, req_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """Finish requests from outside the step (abort, a stop string, an error). Unknown ids are ignored."""
        done = []
        for rid in req_ids:
            req = self.requests.get(rid)
            if req is None or req.is_finished:
                continue
            if req.status == RequestStatus.RUNNING:
                self.running.remove(req)
            elif req.status == RequestStatus.WAITING_FOR_REMOTE_KV:
                del self.receiving[rid]
            else:
                self.waiting.remove(req)
            self._finish(req, status)
            done.append(req)
        return done

    def release_remote(self, req_id: str) -> None:
        """The KV of a FINISHED_REMOTE request has been taken (or given up on): free its blocks."""
        req = self.pinned.pop(req_id, None)
        if req is not None:
            self.kv.free(req)

    def finish_remote_kv(self, req_id: str, success: bool) -> None:
        """The KV a receiving request waited for has landed in its blocks, or will not (then the request
        is computed here from scratch)."""
        req = self.receiving.pop(req_id, None)
        if req is None:
            return
        assert req.kv_transfer is not None
        if success:
            req.num_computed_tokens = req.kv_transfer.num_remote_tokens
            self.kv.cache_blocks(req, req.num_computed_tokens)
            req.kv_transfer.num_remote_tokens = 0
            req.status = RequestStatus.WAITING
            self.waiting.appendleft(req)  # it holds blocks: it goes first (``_requeue_front``)
            return
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.kv_transfer.num_remote_tokens = 0
        req.status = RequestStatus.WAITING
        self._requeue_front(req)

    def _requeue_front(self, req: Request) -> None:
        """Put a request that holds no blocks at the head of the waiting queue, behind the requests whose KV
        landed (they hold their blocks while they wait: behind a request that cannot get blocks, a pool full of
        theirs would never be freed). Waiting requests with computed tokens are exactly those."""
        landed = []
        while self.waiting and self.waiting[0].num_computed_tokens > 0:
            landed.append(self.waiting.popleft())
        self.waiting.appendleft(req)
        for r in reversed(landed):
            self.waiting.appendleft(r)

    def _release_landed(self, head: Request) -> bool:
        """Nothing runs and the landed request at the head cannot get the blocks it still needs, the pool full
        of landed requests' blocks: the last of them gives its blocks up (it will be computed here from scratch).
        False when ``head`` is the only one."""
        landed = []
        for r in self.waiting:
            if r.num_computed_tokens <= 0:
                break
            landed.append(r)
        if len(landed) < 2 or landed[0] is not head:
            return False
        victim = landed[-1]
        self.waiting.remove(victim)
        self.kv.free(victim)
        victim.num_computed_tokens = 0
        self.num_preemptions += 1
        self._requeue_front(victim)
        return True

    def _finish(self, req: Request, status: RequestStatus) -> None:
        req.status = status
        req.num_pending_tokens = 0
        if status == RequestStatus.FINISHED_REMOTE:
            self.pinned[req.request_id] = req
        else:
            self.kv.free(req)
        del self.requests[req.request_id]
        if req.request_id in self._known_to_executor:
            self._known_to_executor.discard(req.request_id)
            self._finished_since_last_step.add(req.request_id)

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.status = RequestStatus.PREEMPTED
        req.num_computed_tokens = 0
        req.num_pending_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        self._requeue_front(req)
        if req.request_id in self._known_to_executor:
            self._known_to_executor.discard(req.request_id)
            self._preempted_since_last_step.add(req.request_id)

    # ---- the step -------------------------------------------------------------------------
    def _chunk(self, req: Request, num_tokens: int, budget: int) -> int:
        n = min(num_tokens, budget)
        if self.config.long_prefill_token_threshold:
            n = min(n, self.config.long_prefill_token_threshold)
        return n

    def _start_receiving(self, req: Request, num_tokens: int) -> KVLoad | None:
        """Blocks for ``req``'s remote KV (the head of the waiting queue); None when they do not fit."""
        if self.kv.allocate_slots(req, num_tokens) is None:
            return None
        self.waiting.popleft()
        req.status = RequestStatus.WAITING_FOR_REMOTE_KV
        self.receiving[req.request_id] = req
        return KVLoad(req.request_id, self.kv.get_block_ids(req.request_id), num_tokens)

    def start_kv_loads(self) -> list[KVLoad]:
        """Reserve blocks now, between two ``schedule()`` calls (a step may be in flight), for the requests at the
        head of the queue whose KV another instance computed: their transfers then start at hand-off time
        instead of at this instance's next step boundary (the sender is between steps right then, so its copy
        does not wait behind its next step either). What ``schedule()`` would admit first still goes first:
        it stops at a request that needs compute, keeps ``max_num_seqs``, and leaves one free block per running
        request for their next step."""
        loads: list[KVLoad] = []
        while self.waiting and len(self.running) + len(self.receiving) < self.config.max_num_seqs:
            req = self.waiting[0]
            kt = req.kv_transfer
            if kt is None or kt.num_remote_tokens <= 0:
                break
            need = -(-kt.num_remote_tokens // self.block_size)
            if not self.kv.can_fit(need + len(self.running)):
                break
            load = self._start_receiving(req, kt.num_remote_tokens)
            if load is None:
                break
            loads.append(load)
        return loads

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted_now = False
        threshold = self.config.long_prefill_token_threshold
        allocate_slots = self.kv.allocate_slots
        run_ahead = self.async_scheduling
        known = self._known_to_executor
        emit_token_ids = self.emit_token_ids

        i = 0
        running = self.running
        while i < len(running) and budget > 0:
            req = running[i]
            kt = req.kv_transfer
            target = req.num_tokens if kt is None or kt.compute_limit is None else req.num_target_tokens
            pending = req.num_pending_tokens
            if pending:
                # a step that samples it is in flight: schedule the next position on a placeholder, or wait
                if not (run_ahead and req.may_run_ahead):
                    i += 1
                    continue
                target += pending
            n = target - req.num_computed_tokens
            if n <= 0:
                i += 1
                continue
            if n > budget:  # noqa: PLR1730 - no builtin call: once per running request per step
                n = budget
            if threshold and n > threshold:
                n = threshold
            new_blocks = allocate_slots(req, n)
            while new_blocks is None:
                victim = running.pop()  # newest first; always at or after index i
                self._preempt(victim)
                preempted_now = True
                if victim is req:
                    break
                new_blocks = allocate_slots(req, n)
            if new_blocks is None:
                break
            new_block_ids = [b.block_id for b in new_blocks] if new_blocks else []
            if req.request_id not in known:
                scheduled.append(self._scheduled(req, n, new_block_ids))
            else:  # _scheduled written out for a request the executor knows (the hot path: every running request)
                start = req.num_computed_tokens
                num_tokens = req.num_tokens
                end = start + n
                sample = end == num_tokens + pending and (
                    kt is None or kt.compute_limit is None or kt.compute_limit >= num_tokens)
                req.num_computed_tokens = end
                if sample:
                    req.num_pending_tokens = pending + 1
                token_ids = req.token_ids_slice(start, min(end, num_tokens)) if emit_token_ids else []
                scheduled.append(ScheduledRequest(req.request_id, token_ids, start, n, new_block_ids, sample, None,
                                                  req.num_preemptions, end > num_tokens))
            budget -= n
            i += 1

        kv_loads: list[KVLoad] = []
        waiting = self.waiting
        max_num_seqs = self.config.max_num_seqs
        # waiting requests join only if nobody had to be preempted this step
        while not preempted_now and waiting and budget > 0 and len(running) + len(self.receiving) < max_num_seqs:
            req = waiting[0]
            kt = req.kv_transfer
            if kt is not None and kt.num_remote_tokens > 0:
                # reserve blocks for KV that another instance computed; no compute this step
                load = self._start_receiving(req, kt.num_remote_tokens)
                if load is None:
                    break
                kv_loads.append(load)
                continue
            if req.num_computed_tokens > 0:
                hit_blocks, num_hit = [], req.num_computed_tokens  # KV already here (it arrived from elsewhere)
            else:
                hit_blocks, num_hit = self.kv.get_computed_blocks(req)
            n = self._chunk(req, req.num_target_tokens - num_hit, budget)
            if n <= 0:
                break
            new_blocks = allocate_slots(req, n, hit_blocks)
            if new_blocks is None:
                if not running and not scheduled and num_hit and self._release_landed(req):
                    continue
                break
            waiting.popleft()
            if req.num_cached_tokens < 0:
                req.num_cached_tokens = num_hit
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.monotonic()
            req.num_computed_tokens = num_hit
            req.status = RequestStatus.RUNNING
            running.append(req)
            scheduled.append(self._scheduled(req, n, None))
            budget -= n

        out = SchedulerOutput(
            scheduled=scheduled,
            total_num_scheduled_tokens=self.config.max_num_batched_tokens - budget,
            finished_req_ids=self._finished_since_last_step,
            preempted_req_ids=self._preempted_since_last_step,
            kv_loads=kv_loads,
            step_id=self._step_id,
        )
        self._finished_since_last_step = set()
        self._preempted_since_last_step = set()
        self._step_id += 1
        return out

    def _scheduled(self, req: Request, n: int, new_block_ids: list[int] | None) -> ScheduledRequest:
        """``req``'s share of the step, its progress booked at once: at schedule time, so the next schedule()
        may run before this step's results (a request scheduled here is never preempted later in the step:
        victims are taken from the end of the running list, past the requests scheduled so far).
        ``new_block_ids``: None for all of the request's blocks."""
        start = req.num_computed_tokens
        num_tokens = req.num_tokens
        end = start + n
        pending = req.num_pending_tokens
        kt = req.kv_transfer
        sample = end == num_tokens + pending and (
            kt is None or kt.compute_limit is None or kt.compute_limit >= num_tokens)
        rid = req.request_id
        new = None
        if rid not in self._known_to_executor:
            self._known_to_executor.add(rid)
            new = NewRequestInfo(
                prompt_token_ids=req.prompt_token_ids,
                output_token_ids=list(req.output_token_ids),
                sampling_params=req.sampling_params,
                eos_token_ids=sorted(req.eos_token_ids),
            )
            new_block_ids = None
        if new_block_ids is None:
            new_block_ids = self.kv.get_block_ids(rid)
        req.num_computed_tokens = end
        if sample:
            req.num_pending_tokens = pending + 1
        return ScheduledRequest(
            rid,
            req.token_ids_slice(start, min(end, num_tokens)) if self.emit_token_ids else [],
            start,
            n,
            new_block_ids,
            sample,
            new,
            req.num_preemptions,
            # past the known tokens only by the one placeholder (a pending token) a run-ahead decode computes
            end > num_tokens,
        )

    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        outputs: list[EngineCoreOutput] = []
        logprobs = runner_output.logprobs
        sampled_token_ids = runner_output.sampled_token_ids
        kv = self.kv
        caching = kv.enable_caching
        requests = self.requests
        running_status = RequestStatus.RUNNING
        # the executor answers in the step's order; several steps may be in flight (pipeline parallel),
        # so the position a step reached comes from the step itself, not from the request's counter
        for idx, sr in enumerate(scheduler_output.scheduled):
            rid = sr.req_id
            req = requests.get(rid)
            if req is None or req.status != running_status or sr.epoch != req.num_preemptions:
                continue  # finished or preempted while the step ran (maybe re-admitted since: stale)
            if sr.sample and req.num_pending_tokens > 0:
                req.num_pending_tokens -= 1
            if caching:
                kv.cache_blocks(req, sr.num_computed_tokens + sr.num_tokens)
            new_ids = sampled_token_ids[idx]
            kt = req.kv_transfer
            if not new_ids:
                if kt is not None and kt.send and sr.num_computed_tokens + sr.num_tokens >= req.num_target_tokens:
                    # a head-of-prompt prefill (Cronus) is done: hand the KV on, no token
                    self.running.remove(req)
                    self._finish(req, RequestStatus.FINISHED_REMOTE)
                    outputs.append(EngineCoreOutput(rid, [], None, "remote"))
                continue
            status = None
            for t in new_ids:
                req.append_output(t)
                status = req.check_stop(t)
                if status is not None:
                    break
            lp = logprobs[idx] if logprobs is not None else None
            num_cached = req.num_cached_tokens
            out = EngineCoreOutput(rid, new_ids, [lp] if lp is not None else None, None, None,
                                   num_cached if num_cached > 0 else 0)  # noqa: FURB136 - no builtin call (hot)
            if status is None and kt is not None and kt.send:
                status = RequestStatus.FINISHED_REMOTE  # PD prefill: first token sampled, decode elsewhere
            if status is not None:
                self.running.remove(req)
                self._finish(req, status)
                out.finish_reason = status.finish_reason
                out.stop_reason = req.stop_reason
            outputs.append(out)
        return outputs

    # ---- figures --------------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_waiting_prefill_tokens(self) -> int:
        """Tokens the waiting requests still need computed here before they sample or hand on (O(1))."""
        return self.waiting.num_prefill_tokens

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def kv_cache_usage(self) -> float:
        return self.kv.usage

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.receiving)
