"""AsyncLLM: the engine loop on one background thread, its outputs on asyncio queues.

Only the engine thread touches the LLMEngine. Handlers post "add" / "abort" messages to a thread-safe inbox,
which the engine thread drains between steps; outputs go back to the event loop(s) with
``loop.call_soon_threadsafe``, one call per loop per step. The thread sleeps on a condition while there is
nothing to do. If a step raises, the engine is dead: every pending request fails with ``EngineDeadError``,
later ones are refused, and ``is_alive`` turns False (``/health`` answers 503).

The engine is an ``LLMEngine`` or, for a cluster, ``server.cluster.ClusterServing`` (the same methods). A
cluster engine also has ``idle_poll_s`` / ``poll()`` (the thread wakes that often while idle to check worker
health) and ``instance_status()`` (published after every step for /health and /metrics). A request the cluster
could not finish (its worker died and no retry was left: ``finish_reason == "error"``) fails its whole HTTP call
with ``RequestFailedError`` (503) instead of returning a truncated answer.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from hetserve.core.config import EngineConfig
from hetserve.core.errors import EngineDeadError
from hetserve.core.outputs import RequestOutput
from hetserve.core.sampling_params import SamplingParams
from hetserve.engine.llm_engine import LLMEngine
from hetserve.server.errors import RequestFailedError, ServerDrainingError
from hetserve.server.metrics import ServerMetrics

logger = logging.getLogger(__name__)

PromptType = str | list[int]


class RequestGroup:
    """The engine requests of one HTTP call (one per prompt); their outputs arrive, tagged with the prompt's
    index, on one asyncio queue. Iterate it on the loop that created it."""

    def __init__(self, owner: AsyncLLM, request_ids: list[str], loop: asyncio.AbstractEventLoop) -> None:
        self.request_ids = request_ids
        self.loop = loop
        self.added: asyncio.Future[None] = loop.create_future()
        self._owner = owner
        self._queue: asyncio.Queue[tuple[int, RequestOutput] | BaseException] = asyncio.Queue()
        self._num_unfinished = len(request_ids)
        self._closed = False

    @property
    def finished(self) -> bool:
        return self._num_unfinished == 0

    def _put(self, item: tuple[int, RequestOutput] | BaseException) -> None:
        self._queue.put_nowait(item)

    def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        while self._num_unfinished > 0:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                self._closed = True
                raise item
            if item[1].finished:
                self._num_unfinished -= 1
            yield item
        self._closed = True

    def abort(self) -> None:
        """Stop whatever of the group still runs (its KV blocks go back to the pool). Idempotent."""
        if not self._closed and self._num_unfinished > 0:
            self._closed = True
            self._owner.abort(self.request_ids)


@dataclass
class _Live:
    """Engine-thread bookkeeping of one engine request."""

    group: RequestGroup
    index: int
    arrival_s: float
    n: int
    queue_time_recorded: bool = False
    first_token_seen: bool = False
    last_token_s: dict[int, float] = field(default_factory=dict)
    finished_children: set[int] = field(default_factory=set)


@dataclass
class _Add:
    group: RequestGroup
    prompts: list[PromptType]
    params: list[SamplingParams]
    arrival_s: float


@dataclass
class _Abort:
    request_ids: list[str]


@dataclass
class _AbortAll:
    error: BaseException


class AsyncLLM:
    def __init__(self, engine: LLMEngine | Any, metrics: ServerMetrics | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self._idle_poll_s: float | None = getattr(engine, "idle_poll_s", None)
        self._status_fn = getattr(engine, "instance_status", None)
        self._instances: tuple[Any, ...] = tuple(self._status_fn()) if callable(self._status_fn) else ()
        self._cv = threading.Condition()
        self._inbox: list[_Add | _Abort | _AbortAll] = []
        self._thread: threading.Thread | None = None
        self._stop_requested = False
        self._exited = False
        self._admitting = True
        self._dead: EngineDeadError | None = None
        self._live: dict[str, _Live] = {}  # engine thread only
        self._num_unscheduled = 0  # live requests whose queue time is not yet recorded (engine thread only)
        self._next_id = 0
        self._id_lock = threading.Lock()

    @classmethod
    def from_config(cls, config: EngineConfig, metrics: ServerMetrics | None = None) -> AsyncLLM:
        return cls(LLMEngine(config), metrics)

    # ---- read-only facts other threads may use -----------------------------------------------
    @property
    def tokenizer(self) -> Any:  # hetserve.engine.tokenizer.Tokenizer: stateless, safe from any thread
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.model_config.vocab_size

    def validate_lengths(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        """The engine's length check (a pure function of its config), for a 400 before the request is queued."""
        self.engine.validate_lengths(num_prompt_tokens, params)

    @property
    def is_alive(self) -> bool:
        return self._dead is None and not self._exited

    @property
    def is_admitting(self) -> bool:
        return self._admitting and self.is_alive

    @property
    def dead_error(self) -> EngineDeadError | None:
        return self._dead

    @property
    def instances(self) -> tuple[Any, ...]:
        """The cluster's ``InstanceStatus`` list as of the engine thread's last step or poll; () for one device."""
        return self._instances

    @property
    def has_work(self) -> bool:
        """Requests in flight or messages not yet handled (approximate from other threads; for draining)."""
        return bool(self._live) or bool(self._inbox)

    # ---- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        with self._cv:
            if self._thread is None and not self._exited:
                self._thread = threading.Thread(target=self._run, name="hetserve-engine", daemon=True)
                self._thread.start()

    def stop_admitting(self) -> None:
        """New requests get ServerDrainingError from now on; requests in flight go on."""
        self._admitting = False

    async def wait_idle(self, timeout_s: float, poll_s: float = 0.05) -> bool:
        """Wait until no request is in flight; False if ``timeout_s`` passed first."""
        deadline = time.monotonic() + timeout_s
        while self.has_work and self.is_alive:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(poll_s)
        return True

    def abort_all(self, message: str = "the server is shutting down") -> None:
        """Abort every request in flight; each one's stream ends with ServerDrainingError(message)."""
        self._post(_AbortAll(ServerDrainingError(message)))

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Stop the engine thread; requests still in flight fail with EngineDeadError."""
        self._admitting = False
        with self._cv:
            self._stop_requested = True
            self._cv.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout_s)
        elif thread is None:
            with self._cv:
                self._exited = True
                self._dead = self._dead or EngineDeadError("the engine was shut down")
            self._stop_engine()

    def _stop_engine(self) -> None:
        stop = getattr(self.engine, "shutdown", None)  # a cluster's worker processes
        if callable(stop):
            try:
                stop()
            except Exception:  # shutting down: log, never raise
                logger.exception("stopping the engine failed")

    # ---- requests (event-loop side) ------------------------------------------------------------
    def new_request_id(self, prefix: str) -> str:
        with self._id_lock:
            self._next_id += 1
            return f"{prefix}-{self._next_id}"

    async def add_requests(
        self,
        request_id: str,
        prompts: Sequence[PromptType],
        params: Sequence[SamplingParams],
        arrival_s: float | None = None,
    ) -> RequestGroup:
        """Queue one engine request per prompt (ids ``request_id`` or ``request_id-i``), all or none.

        Raises what the engine's ``add_request`` raises (ValidationError, QueueFullError), EngineDeadError, or
        ServerDrainingError while the server is shutting down.
        """
        if len(prompts) != len(params) or not prompts:
            raise ValueError("need one SamplingParams per prompt, and at least one prompt")
        if self._dead is not None:
            raise self._dead
        if not self._admitting:
            raise ServerDrainingError("no new requests are admitted")
        self.start()
        loop = asyncio.get_running_loop()
        ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
        group = RequestGroup(self, ids, loop)
        arrival = time.monotonic() if arrival_s is None else arrival_s
        if not self._post(_Add(group, list(prompts), list(params), arrival)):
            raise self._dead or EngineDeadError("the engine is not running")
        try:
            await group.added
        except asyncio.CancelledError:
            self.abort(ids)  # the inbox is FIFO: the abort is handled after the add
            raise
        return group

    def abort(self, request_ids: Sequence[str]) -> None:
        """Abort requests from any thread; unknown or finished ids are ignored."""
        self._post(_Abort(list(request_ids)))

    def _post(self, message: _Add | _Abort | _AbortAll) -> bool:
        with self._cv:
            if self._exited:
                return False
            self._inbox.append(message)
            self._cv.notify()
            return True

    # ---- the engine thread -------------------------------------------------------------------
    def _run(self) -> None:
        error: BaseException | None = None
        try:
            while True:
                with self._cv:
                    wake_s = None if self._idle_poll_s is None else time.monotonic() + self._idle_poll_s
                    while not self._inbox and not self._stop_requested and not self.engine.has_unfinished_requests():
                        if wake_s is None:
                            self._cv.wait()
                        elif not self._cv.wait(max(wake_s - time.monotonic(), 0.0)):
                            break  # time to poll
                    if self._stop_requested:
                        break
                    inbox, self._inbox = self._inbox, []
                for message in inbox:
                    self._handle(message)
                step_start_s = time.monotonic()
                if self.engine.has_unfinished_requests():
                    self._after_step(self.engine.step(), step_start_s)
                elif self._idle_poll_s is not None:
                    self._after_step(self.engine.poll(), step_start_s)
                self._publish_state()
        except BaseException as exc:  # the loop must never die silently
            logger.exception("the engine loop failed")
            error = exc
        with self._cv:
            self._exited = True
            if error is not None:
                self._dead = EngineDeadError(f"the engine loop failed: {type(error).__name__}: {error}")
            else:
                self._dead = self._dead or EngineDeadError("the engine was shut down")
            leftover, self._inbox = self._inbox, []
        dead = self._dead
        for message in leftover:
            if isinstance(message, _Add):
                self._resolve(message.group, dead)
        self._fail_all(dead)
        self._stop_engine()
        self._publish_state()

    def _handle(self, message: _Add | _Abort | _AbortAll) -> None:
        if isinstance(message, _Abort):
            self._abort(message.request_ids)
        elif isinstance(message, _AbortAll):
            self._fail_all(message.error)
        else:
            self._add(message)

    def _add(self, m: _Add) -> None:
        added: list[str] = []
        try:
            for rid, prompt, params in zip(m.group.request_ids, m.prompts, m.params):
                self.engine.add_request(rid, prompt, params, arrival_time=m.arrival_s)
                added.append(rid)
        except Exception as exc:  # noqa: BLE001 - whatever add_request raises belongs to the caller
            self.engine.abort_request(added)
            self._resolve(m.group, exc)
            return
        for index, (rid, params) in enumerate(zip(m.group.request_ids, m.params)):
            self._live[rid] = _Live(m.group, index, m.arrival_s, params.n)
            self._num_unscheduled += 1
        self._resolve(m.group, None)

    def _abort(self, request_ids: list[str]) -> None:
        self.engine.abort_request(request_ids)
        for rid in request_ids:
            live = self._live.pop(rid, None)
            if live is not None:
                self._forget(live, aborted=True)

    def _forget(self, live: _Live, aborted: bool) -> None:
        if not live.queue_time_recorded:
            self._num_unscheduled -= 1
        if aborted and self.metrics is not None:
            for _ in range(live.n - len(live.finished_children)):
                self.metrics.count_finished("abort")

    def _fail_all(self, error: BaseException) -> None:
        rids = list(self._live)
        if rids and not self._exited:
            self.engine.abort_request(rids)
        groups: dict[int, RequestGroup] = {}
        for rid in rids:
            live = self._live.pop(rid)
            self._forget(live, aborted=True)
            groups[id(live.group)] = live.group
        for group in groups.values():
            self._send(group.loop, _deliver_error, (group, error))

    def _after_step(self, outputs: list[RequestOutput], step_start_s: float) -> None:
        now = time.monotonic()
        if self.metrics is not None:
            self._observe(outputs, step_start_s, now)
        per_loop: dict[asyncio.AbstractEventLoop, list[tuple[RequestGroup, int, RequestOutput]]] = {}
        failed: list[tuple[_Live, str]] = []
        for out in outputs:
            live = self._live.get(out.request_id)
            if live is None:
                continue
            if out.finished:
                del self._live[out.request_id]
                self._forget(live, aborted=False)
                error = next((c for c in out.outputs if c.finish_reason == "error"), None)
                if error is not None:
                    failed.append((live, str(error.stop_reason or "the request failed")))
                    continue
            per_loop.setdefault(live.group.loop, []).append((live.group, live.index, out))
        for loop, items in per_loop.items():
            self._send(loop, _deliver, items)
        for live, reason in failed:
            # the whole HTTP call fails; the other prompts of a batch stop too
            self._abort([rid for rid in live.group.request_ids if rid in self._live])
            self._send(live.group.loop, _deliver_error, (live.group, RequestFailedError(reason)))

    def _observe(self, outputs: list[RequestOutput], step_start_s: float, now: float) -> None:
        m = self.metrics
        assert m is not None
        if self._num_unscheduled > 0:
            # the scheduler names the children of an n > 1 request "<id>#<i>"
            for req in self.engine.scheduler.running:
                live = self._live.get(req.request_id.partition("#")[0])
                if live is not None and not live.queue_time_recorded:
                    scheduled_s = req.first_scheduled_time or step_start_s
                    m.queue_s.observe(max(scheduled_s - live.arrival_s, 0.0))
                    live.queue_time_recorded = True
                    self._num_unscheduled -= 1
        for out in outputs:
            live = self._live.get(out.request_id)
            if live is None:
                continue
            if not live.queue_time_recorded:  # scheduled and finished within one step
                m.queue_s.observe(max(step_start_s - live.arrival_s, 0.0))
                live.queue_time_recorded = True
                self._num_unscheduled -= 1
            if not live.first_token_seen and any(c.delta_token_ids for c in out.outputs):
                live.first_token_seen = True
                m.ttft_s.observe(now - live.arrival_s)
                m.prompt_tokens.inc(len(out.prompt_token_ids))
            for c in out.outputs:
                k = len(c.delta_token_ids)
                if k:
                    m.generation_tokens.inc(k)
                    last = live.last_token_s.get(c.index)
                    if last is not None:
                        for _ in range(k):
                            m.itl_s.observe((now - last) / k)
                    live.last_token_s[c.index] = now
                if c.finish_reason is not None and c.index not in live.finished_children:
                    live.finished_children.add(c.index)
                    m.count_finished(c.finish_reason)
            if out.finished:
                m.e2e_s.observe(now - live.arrival_s)

    def _publish_state(self) -> None:
        if callable(self._status_fn):
            self._instances = tuple(self._status_fn())
        if self.metrics is None:
            return
        s = self.engine.scheduler
        self.metrics.set_scheduler_state(s.num_running, s.num_waiting, s.kv_cache_usage)
        if self._instances:
            self.metrics.set_instance_state(self._instances)

    def _resolve(self, group: RequestGroup, error: BaseException | None) -> None:
        self._send(group.loop, _settle, (group.added, error))

    def _send(self, loop: asyncio.AbstractEventLoop, fn: Any, arg: Any) -> None:
        try:
            loop.call_soon_threadsafe(fn, arg)
        except RuntimeError:  # that loop is closed: nobody will read its requests' outputs, so stop them
            self._abort([rid for rid, live in self._live.items() if live.group.loop is loop])


def _settle(arg: tuple[asyncio.Future[None], BaseException | None]) -> None:
    fut, error = arg
    if fut.done():
        return
    if error is None:
        fut.set_result(None)
    else:
        fut.set_exception(error)


def _deliver(items: list[tuple[RequestGroup, int, RequestOutput]]) -> None:
    for group, index, out in items:
        group._put((index, out))


def _deliver_error(arg: tuple[RequestGroup, BaseException]) -> None:
    group, error = arg
    group._put(error)
