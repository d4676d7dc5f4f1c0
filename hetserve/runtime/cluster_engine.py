"""A deployment served by real workers: the coordinator keeps one engine ``Scheduler`` per instance and the
strategy's ``Deployment`` (the very objects the simulator runs), and each instance's steps execute in its
worker process (``worker.py``). Routing, hand-offs and KV books follow ``sim/simulator.py`` event for event:
route -> admit -> schedule -> execute -> update -> (PD) hand off -> KV load -> transfer -> finish_remote_kv.

KV moves prefill worker -> coordinator -> decode worker: the sender converts its cache's blocks into the
wire format (the receiver's declared descriptor, narrowest dtype), the receiver converts the wire format into
its own cache (the ModelRunner holds NHD layer-major only, so a declared HND device is converted on the wire
and back on arrival). Every transfer has a deadline; past it the request is re-prefilled on the decode side
(``finish_remote_kv(success=False)``) and the sender's pinned blocks are released. A worker that dies (pipe
EOF, exit, or silence past ``step_timeout_s`` / the heartbeat) is dropped; its requests are retried once on
a healthy instance (continuing from the tokens already produced) or finish with ``finish_reason="error"``.

An instance is one or more workers (``instances.py``): a pipeline (PP) has one per stage, a TP group one per
rank; every worker gets every step, the last stage's rank 0 answers it, and a pipeline keeps up to
``num_stages`` steps in flight (hidden states go stage to stage directly, ``stage_link.py``). KV hand-offs
involve every worker of both instances (``kv_handoff.py``); any worker dying takes its instance down.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from hetserve.core.errors import ValidationError
from hetserve.core.model_config import ModelConfig
from hetserve.core.outputs import CompletionOutput, EngineCoreOutput, RequestMetrics, RequestOutput
from hetserve.core.request import KVTransferParams, Request, RequestStatus
from hetserve.core.sampling_params import SamplingParams
from hetserve.engine.detokenizer import IncrementalDetokenizer
from hetserve.engine.tokenizer import Tokenizer
from hetserve.runtime.connect import Placement
from hetserve.runtime.hetis_control import HetisControl
from hetserve.runtime.hetis_messages import HetisInfo
from hetserve.runtime.instances import (
    Instance,
    InstanceOptions,
    launch_all,
    stop_workers,
    worker_specs,
)
from hetserve.runtime.kv_handoff import KVHandoffs, KVLink
from hetserve.runtime.kv_messages import KVSent
from hetserve.runtime.worker import (
    Execute,
    Failed,
    KVIn,
    KVOut,
    Ping,
    Pong,
    StepDone,
    WorkerDied,
    WorkerSpec,
    wait_readable,
)
from hetserve.strategies.base import Deployment, InstanceView

__all__ = ["ClusterEngine", "Instance", "InstanceOptions"]


@dataclass
class _ReqState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    detok: IncrementalDetokenizer | None
    metrics: RequestMetrics
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    error: str | None = None
    sent_text_len: int = 0
    sent_tokens: int = 0
    num_retries: int = 0
    # sampled tokens' logprobs (requests that ask for them), as LLMEngine returns them
    logprobs: list[Any] | None = None
    cumulative_logprob: float | None = None


class ClusterEngine:
    """LLMEngine-like (``add_request`` / ``step`` / ``abort_request`` / ``has_unfinished_requests``) over a
    deployment whose instances run in worker processes. Requests take ``n == 1`` only."""

    def __init__(
        self,
        model: str,
        deployment: Deployment,
        options: dict[str, InstanceOptions] | None = None,
        *,
        max_model_len: int = 512,
        num_kv_blocks: int = 256,
        kv_deadline_s: float = 10.0,
        step_timeout_s: float = 60.0,
        heartbeat_s: float = 1.0,
        max_retries: int = 1,
        placement: Placement | None = None,
        attn_speeds: dict[str, float] | None = None,
        attn_envs: dict[str, dict[str, str]] | None = None,
        kv_links: dict[tuple[str, str], KVLink] | None = None,
        kv_direct: bool = True,
        async_scheduling: bool = True,
    ) -> None:
        self.model_config = ModelConfig.from_path(model)
        self.tokenizer = Tokenizer.from_dir(model)
        self.deployment = deployment
        self.max_model_len = min(max_model_len, self.model_config.max_position_embeddings)
        self.kv_deadline_s = kv_deadline_s
        self.step_timeout_s = step_timeout_s
        self.heartbeat_s = heartbeat_s
        self.max_retries = max_retries
        self.placement = placement  # where workers run (connect.py: tcp, ray); None: local socket pairs
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids) | frozenset(self.model_config.eos_token_ids)
        options = options or {}
        self.hetis = HetisControl(deployment, attn_speeds, envs=attn_envs)  # Hetis mains' attention workers, re-dispatch
        self.instances: dict[str, Instance] = {}
        try:
            specs: dict[str, list[WorkerSpec]] = {}  # one worker per (pipeline stage, TP rank)
            # direct KV hand-offs (kv_direct.py): every worker opens an endpoint per transport kind in use
            kv_kinds = tuple(sorted({lk.kind for lk in (kv_links or {}).values()} or {"shm"})) if kv_direct else ()
            for name, plan in list(deployment.plans.items()):
                nb = min(plan.num_kv_blocks, num_kv_blocks)
                plan = dataclasses.replace(plan, num_kv_blocks=nb, max_model_len=self.max_model_len)
                deployment.plans[name] = plan
                specs[name] = worker_specs(plan, str(model), self.model_config, options.get(name, InstanceOptions()),
                                           self.max_model_len, hetis=self.hetis.worker_spec(name),
                                           kv_transports=kv_kinds)
            self.instances = launch_all(deployment.plans, specs, options, self.max_model_len, placement)
            self.hetis.start(self.instances)
        except BaseException:
            for inst in self.instances.values():
                inst.stop(1.0)
            if placement is not None:
                placement.close()
            raise
        for name, inst in self.instances.items():
            # async scheduling where one worker runs the whole instance (its runner fills placeholders)
            if async_scheduling and inst.num_stages == 1 and inst.tp == 1 and self.hetis.worker_spec(name) is None:
                inst.lookahead = True
                inst.scheduler.async_scheduling = True
        self.views = {n: InstanceView(deployment.plans[n], i.scheduler) for n, i in self.instances.items()}
        self._reqs: dict[str, _ReqState] = {}
        self._where: dict[str, str] = {}
        self._pending_src: dict[str, str] = {}
        self.handoffs = KVHandoffs(self.instances, self._pending_src, kv_deadline_s, self._on_dead, kv_links)
        self._by_conn = {w.conn: (i, j) for i in self.instances.values() for j, w in enumerate(i.workers)}
        self._ids = itertools.count()
        self._touched: dict[str, _ReqState] = {}
        self.num_retries = 0

    @property
    def num_transfers_ok(self) -> int:
        return self.handoffs.num_ok

    @property
    def num_transfers_failed(self) -> int:
        return self.handoffs.num_failed

    def kv_stats(self) -> list[dict[str, Any]]:
        """One record per direct KV hand-off: ``num_bytes``, ``wall_s`` (first byte to commit, paced wait
        included), ``delivered_s`` (first byte to the receivers' use: one host), ``declared_s`` (what the declared
        link needs), ``send_convert_s`` / ``recv_convert_s``,
        ``ok`` (None while in flight), ``src`` / ``dst`` / ``kind``."""
        return [dict(r) for r in self.handoffs.stats.values()]

    # ---- requests --------------------------------------------------------------------------------
    def add_request(self, request_id: str | None, prompt: str | list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> str:
        params = params or SamplingParams()
        if params.n != 1:
            raise ValidationError("n", "a cluster engine serves n=1 only")
        rid = request_id if request_id is not None else str(next(self._ids))
        if rid in self._reqs:
            raise ValidationError("request_id", f"{rid!r} is already in use")
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, list(prompt)
        if not ids:
            raise ValidationError("prompt", "must not be empty")
        if len(ids) + (params.max_tokens or 1) > self.max_model_len:
            raise ValidationError("max_tokens", f"prompt {len(ids)} + max_tokens exceeds max_model_len "
                                                f"{self.max_model_len}")
        detok = None
        if params.detokenize:
            detok = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens, params.stop,
                                           params.include_stop_str_in_output)
        now = arrival_time if arrival_time is not None else time.monotonic()
        self._reqs[rid] = st = _ReqState(rid, text, ids, params, detok, RequestMetrics(arrival_time=now))
        if params.logprobs is not None:
            st.logprobs, st.cumulative_logprob = [], 0.0
        alive = {n: v for n, v in self.views.items() if self.instances[n].alive}
        if not alive:
            self._fail(rid, "no healthy instance")
            return rid
        req = self._new_request(rid)
        try:
            name, kt = self.deployment.route(req, alive, time.monotonic())
        except KeyError:  # the strategy's pick of a role is down: any healthy instance serves it whole
            name, kt = min(alive, key=lambda n: alive[n].num_running() + alive[n].num_waiting()), None
        req.kv_transfer = kt
        self._admit(name, req)
        return rid

    def _new_request(self, rid: str) -> Request:
        st = self._reqs[rid]
        return Request(rid, st.prompt_token_ids, st.params, eos_token_ids=self.eos_token_ids,
                       arrival_time=st.metrics.arrival_time, max_model_len=self.max_model_len,
                       output_token_ids=list(st.token_ids))

    def _admit(self, name: str, req: Request) -> None:
        self.instances[name].scheduler.add_request(req)
        self._where[req.request_id] = name

    def abort_request(self, request_ids: str | list[str]) -> None:
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            if self._reqs.pop(rid, None) is None:
                continue
            self._drop_everywhere(rid)

    def _drop_everywhere(self, rid: str) -> None:
        name = self._where.pop(rid, None)
        self._pending_src.pop(rid, None)
        self.handoffs.drop_request(rid)
        for inst in self.instances.values():
            inst.scheduler.release_remote(rid)
        if name is not None:
            self.instances[name].scheduler.finish_requests([rid], RequestStatus.FINISHED_ABORTED)

    def has_unfinished_requests(self) -> bool:
        # a step scheduled ahead may still be in flight after the last request finished: drain it too
        return bool(self._reqs) or any(i.in_flight for i in self.instances.values() if i.alive)

    # ---- the step --------------------------------------------------------------------------------
    def step(self, timeout_s: float = 0.05) -> list[RequestOutput]:
        """Start a step on every idle healthy instance, take the replies that come within ``timeout_s``, check
        deadlines and health; outputs for every request that produced something."""
        for inst in self.instances.values():
            self._kick(inst)
        conns = [w.conn for i in self.instances.values() if i.alive for w in i.workers]
        outstanding = any(i.in_flight or i.ping_sent_s for i in self.instances.values() if i.alive)
        if conns and (outstanding or self.handoffs.transfers):
            for conn in wait_readable(conns, timeout_s):
                inst, idx = self._by_conn[conn]  # type: ignore[index]
                w = inst.workers[idx]
                while inst.alive and w.conn.poll(0):
                    try:
                        reply = w.recv(0.0)
                    except WorkerDied as e:
                        self._on_dead(inst, str(e))
                        break
                    inst.last_reply_s = time.monotonic()
                    self._on_reply(inst, idx, reply)
        elif self._reqs:
            time.sleep(0.002)
        self.handoffs.check_deadlines()
        self._check_health()
        touched, self._touched = self._touched, {}
        outs = []
        now = time.monotonic()
        for rid, st in touched.items():
            outs.append(self._make_output(st, now))
            if st.finish_reason is not None:
                self._reqs.pop(rid, None)
        return outs

    def _kick(self, inst: Instance) -> None:
        """Schedule and send steps until the instance has one in flight per pipeline stage (one without PP; one
        more with async scheduling, queued at the worker behind the running one)."""
        while inst.alive and len(inst.in_flight) < inst.num_stages + inst.lookahead:
            so = inst.scheduler.schedule()
            for load in so.kv_loads:
                self.handoffs.start(load.req_id, inst.name, load.block_ids, load.num_tokens)
            if not (so.scheduled or so.finished_req_ids or so.preempted_req_ids):
                return
            # Cronus' head: the KV of the blocks this step completes leaves for the main layer by layer
            self.handoffs.stream_step(inst, so, getattr(self.deployment, "stream_target", lambda rid: None))
            if not inst.alive:
                return
            try:
                seqs = inst.send_all(lambda seq, so=so: Execute(seq=seq, so=so))
            except WorkerDied as e:
                self._on_dead(inst, str(e))
                return
            inst.in_flight.append((seqs[inst.workers.index(inst.worker)], so, time.monotonic()))
            inst.max_in_flight_seen = max(inst.max_in_flight_seen, len(inst.in_flight))

    def _on_reply(self, inst: Instance, idx: int, reply: Any) -> None:
        if isinstance(reply, Pong):
            inst.pongs_due -= 1
            if inst.pongs_due <= 0:
                inst.ping_sent_s = None
        elif isinstance(reply, StepDone):
            seq, so, _ = inst.in_flight.popleft()
            assert seq == reply.seq, f"{inst.name}: step {reply.seq} answered while {seq} was the oldest"
            for o in inst.scheduler.update_from_output(so, reply.ro):
                self._deliver(inst.name, o)
            self.hetis.on_step_done(inst, self.views, self._on_dead)
        elif isinstance(reply, HetisInfo):
            self.hetis.on_info(inst, reply, self._on_dead)
        elif isinstance(reply, Failed):
            self._on_dead(inst, f"worker {inst.workers[idx].spec.name} of instance {inst.name} failed: "
                                f"{reply.error}")
        elif isinstance(reply, KVOut):
            self.handoffs.on_kv_out(inst, idx, reply)
        elif isinstance(reply, KVIn):
            self.handoffs.on_kv_in(idx, reply)
        elif isinstance(reply, KVSent):
            self.handoffs.on_kv_sent(idx, reply)

    def _deliver(self, name: str, o: EngineCoreOutput) -> None:
        st = self._reqs.get(o.req_id)
        if st is None:
            self.instances[name].scheduler.release_remote(o.req_id)
            return
        now = time.monotonic()
        if o.new_token_ids:
            if st.metrics.first_token_time is None:
                st.metrics.first_token_time = now
            st.metrics.last_token_time = now
            st.token_ids.extend(o.new_token_ids)
            if o.new_logprobs and st.logprobs is not None:
                st.logprobs.extend(o.new_logprobs)
                st.cumulative_logprob = (st.cumulative_logprob or 0.0) + sum(lp.logprob for lp in o.new_logprobs)
        finish, stop_reason = o.finish_reason, o.stop_reason
        if st.detok is not None:
            stop_str = st.detok.update(o.new_token_ids)
            if stop_str is not None:
                if finish is None:
                    self.instances[name].scheduler.finish_requests([o.req_id], RequestStatus.FINISHED_STOPPED)
                elif finish == "remote":
                    self.instances[name].scheduler.release_remote(o.req_id)
                finish, stop_reason = "stop", stop_str
        if finish == "remote":
            self._handoff(name, o.req_id)
        elif finish is not None:
            st.finish_reason, st.stop_reason = finish, stop_reason
            self._where.pop(o.req_id, None)
        self._touched[o.req_id] = st

    def _handoff(self, src: str, rid: str) -> None:
        sched = self.instances[src].scheduler
        old = sched.pinned[rid]
        alive = {n: v for n, v in self.views.items() if self.instances[n].alive}
        target = None
        try:
            target = self.deployment.handoff(src, old, self.views, time.monotonic())
        except (KeyError, NotImplementedError):
            target = None
        req = self._new_request(rid)
        if target is None or target[0] not in alive:
            # no healthy taker: the request continues where it is, recomputing its prompt there
            sched.release_remote(rid)
            self._admit(src, req)
            return
        dst, n_remote = target
        req.kv_transfer = KVTransferParams(num_remote_tokens=n_remote, remote_instance=src)
        self._pending_src[rid] = src
        self._admit(dst, req)
        # start the transfer now: the sender is between steps (its next Execute goes after the SendKV), and
        # the receiver takes the bytes while its own step runs (simulator: the same call)
        for load in self.instances[dst].scheduler.start_kv_loads():
            self.handoffs.start(load.req_id, dst, load.block_ids, load.num_tokens)

    # ---- faults ----------------------------------------------------------------------------------
    def _check_health(self) -> None:
        now = time.monotonic()
        for inst in self.instances.values():
            if not inst.alive:
                continue
            gone = inst.dead_worker()
            if gone is not None:
                self._on_dead(inst, gone if inst.name in gone else f"instance {inst.name}: {gone}")
            elif inst.in_flight and now - inst.in_flight[0][2] > self.step_timeout_s:
                self._on_dead(inst, f"instance {inst.name} did not finish a step within {self.step_timeout_s} s")
            elif inst.ping_sent_s is not None and now - inst.ping_sent_s > self.step_timeout_s:
                self._on_dead(inst, f"instance {inst.name} missed its heartbeat")
            elif inst.ping_sent_s is None and not inst.in_flight and now - inst.last_reply_s > self.heartbeat_s:
                try:
                    inst.send_all(lambda seq: Ping(seq=seq))
                    inst.ping_sent_s, inst.pongs_due = now, len(inst.workers)
                except WorkerDied as e:
                    self._on_dead(inst, str(e))

    def _on_dead(self, inst: Instance, reason: str) -> None:
        if not inst.alive:
            return
        inst.alive = False
        inst.in_flight.clear()
        inst.worker.dead_reason = inst.worker.dead_reason or reason
        inst.stop(0.5)
        # transfers from the dead sender: the receiver re-prefills; to the dead receiver: retried below
        self.handoffs.on_instance_dead(inst.name)
        sched = inst.scheduler
        victims = [r.request_id for r in [*sched.running, *sched.waiting, *sched.receiving.values()]]
        for rid in victims:
            self._pending_src.pop(rid, None)
        for rid in list(self._pending_src):
            if self._pending_src[rid] == inst.name:
                del self._pending_src[rid]  # its KV is lost: the transfer will fail and re-prefill
        for rid in victims:
            self._where.pop(rid, None)
            self._retry(rid, reason)

    def _retry(self, rid: str, reason: str) -> None:
        st = self._reqs.get(rid)
        if st is None:
            return
        alive = [n for n, i in self.instances.items() if i.alive]
        if st.num_retries >= self.max_retries or not alive:
            self._fail(rid, f"{reason}; {'retry limit reached' if alive else 'no healthy instance left'}")
            return
        st.num_retries += 1
        self.num_retries += 1
        req = self._new_request(rid)
        plans = self.deployment.plans
        if st.token_ids:  # decoding already: any healthy instance continues, decode instances first
            name = min(alive, key=lambda n: (plans[n].role == "prefill", self.views[n].num_running()))
        else:
            views = {n: self.views[n] for n in alive}
            try:
                name, req.kv_transfer = self.deployment.route(req, views, time.monotonic())
            except KeyError:
                name = min(alive, key=lambda n: self.views[n].num_running())
        self._admit(name, req)

    def _fail(self, rid: str, error: str) -> None:
        st = self._reqs[rid]
        st.finish_reason, st.stop_reason, st.error = "error", error, error
        self._touched[rid] = st

    # ---- outputs and figures ---------------------------------------------------------------------
    def _make_output(self, st: _ReqState, now: float) -> RequestOutput:
        finished = st.finish_reason is not None
        text = st.detok.get_next_output_text(finished, delta=False) if st.detok is not None else ""
        delta_text, st.sent_text_len = text[st.sent_text_len:], len(text)
        delta_lp = st.logprobs[st.sent_tokens:] if st.logprobs is not None else None
        delta_ids, st.sent_tokens = st.token_ids[st.sent_tokens:], len(st.token_ids)
        if finished:
            st.metrics.finished_time = now
        comp = CompletionOutput(index=0, text=text, token_ids=st.token_ids, cumulative_logprob=st.cumulative_logprob,
                                logprobs=st.logprobs, finish_reason=st.finish_reason, stop_reason=st.stop_reason,
                                delta_text=delta_text, delta_token_ids=delta_ids, delta_logprobs=delta_lp)
        return RequestOutput(request_id=st.request_id, prompt=st.prompt, prompt_token_ids=st.prompt_token_ids,
                             outputs=[comp], finished=finished, metrics=st.metrics)

    def free_blocks(self) -> dict[str, tuple[int, int]]:
        """(free, usable) KV blocks per healthy instance; equal when nothing leaks and nothing runs."""
        return {n: (i.scheduler.kv.pool.num_free_blocks, i.scheduler.kv.pool.num_blocks - 1)
                for n, i in self.instances.items() if i.alive}

    def worker_pids(self) -> dict[str, int | None]:
        """The answering worker's pid per instance (the only worker of a single-device instance)."""
        return {n: i.worker.pid for n, i in self.instances.items()}

    def all_worker_pids(self) -> dict[str, list[int | None]]:
        """Every worker's pid per instance, stage-major (``workers[stage * tp + rank]``)."""
        return {n: [w.pid for w in i.workers] for n, i in self.instances.items()}

    def shutdown(self) -> None:
        stop_workers([w for i in self.instances.values() for w in i.workers], 2.0)
        for inst in self.instances.values():
            inst.alive = False
        if self.placement is not None:
            self.placement.close()
            self.placement = None

    def __enter__(self) -> ClusterEngine:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
