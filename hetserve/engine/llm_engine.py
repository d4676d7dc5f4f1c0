"""The engine users and the server drive: text in, text out, around the pure step loop.

``add_request`` validates and tokenises; ``step`` runs one engine step and returns a ``RequestOutput`` for
every request that produced something; ``abort_request`` stops requests at any point. Requests with n > 1
fan out into n child requests and are reassembled here.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hetserve.core.config import EngineConfig
from hetserve.core.errors import ModelLoadError, QueueFullError, ValidationError
from hetserve.core.interfaces import Executor
from hetserve.core.model_config import ModelConfig
from hetserve.core.outputs import CompletionOutput, Logprobs, RequestMetrics, RequestOutput
from hetserve.core.request import Request, RequestStatus
from hetserve.core.sampling_params import SamplingParams
from hetserve.engine.core import EngineCore
from hetserve.engine.detokenizer import IncrementalDetokenizer
from hetserve.engine.sched.scheduler import Scheduler
from hetserve.engine.tokenizer import Tokenizer

PromptType = str | list[int]


@dataclass
class _ChildState:
    index: int
    detok: IncrementalDetokenizer | None
    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[Logprobs] | None = None
    cumulative_logprob: float | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    sent_text_len: int = 0
    sent_tokens: int = 0


@dataclass
class _ParentState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: dict[str, _ChildState]
    metrics: RequestMetrics
    num_cached_tokens: int = 0


class LLMEngine:
    def __init__(self, config: EngineConfig, executor: Executor | None = None) -> None:
        model_dir = Path(config.model)
        if not model_dir.exists():
            raise ModelLoadError("model", f"model directory {config.model!r} does not exist")
        self.config = config
        self.model_config = ModelConfig.from_path(model_dir)
        self.tokenizer = Tokenizer.from_dir(config.tokenizer or config.model)
        mc = self.model_config
        max_len = config.scheduler.max_model_len or mc.max_position_embeddings
        if max_len > mc.max_position_embeddings:
            raise ValidationError(
                "max_model_len",
                f"{max_len} exceeds the model's max_position_embeddings {mc.max_position_embeddings}",
            )
        self.max_model_len = max_len
        if executor is None:
            from hetserve.engine.runner import ModelRunner

            executor = ModelRunner(config)
        self.executor = executor
        num_blocks = executor.num_kv_blocks
        capacity_tokens = (num_blocks - 1) * config.cache.block_size
        if capacity_tokens < max_len:
            raise ValidationError(
                "num_blocks",
                f"the KV pool holds {capacity_tokens} tokens ({num_blocks - 1} blocks of "
                f"{config.cache.block_size}), fewer than max_model_len {max_len}; add blocks or lower max_model_len",
            )
        self.scheduler = Scheduler(config.scheduler, config.cache, num_blocks, max_len)
        self.core = EngineCore(self.scheduler, executor, config.scheduler.async_scheduling)
        self.eos_token_ids = frozenset(self.tokenizer.eos_token_ids) | frozenset(mc.eos_token_ids)
        self._parents: dict[str, _ParentState] = {}
        self._child_to_parent: dict[str, str] = {}
        self._ids = itertools.count()

    # ---- requests -------------------------------------------------------------------------
    def _tokenize(self, prompt: Any) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValidationError("prompt", "must not be empty")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)):
            if not prompt:
                raise ValidationError("prompt", "must not be empty")
            vocab = self.model_config.vocab_size
            for t in prompt:
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                    raise ValidationError("prompt", f"token ids must be integers in [0, {vocab}), got {t!r}")
            return None, list(prompt)
        raise ValidationError("prompt", f"must be a string or a list of token ids, got {type(prompt).__name__}")

    def validate_lengths(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        m = self.max_model_len
        if num_prompt_tokens >= m:
            raise ValidationError(
                "prompt",
                f"the prompt has {num_prompt_tokens} tokens but max_model_len is {m}; at least one token "
                "must be left for the output",
            )
        if params.max_tokens is not None and num_prompt_tokens + params.max_tokens > m:
            raise ValidationError(
                "max_tokens",
                f"max_tokens {params.max_tokens} plus the prompt's {num_prompt_tokens} tokens exceeds "
                f"max_model_len {m}",
            )

    def add_request(
        self,
        request_id: str | None,
        prompt: PromptType,
        params: SamplingParams | None = None,
        arrival_time: float | None = None,
    ) -> str:
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValidationError("sampling_params", "must be a SamplingParams")
        request_id = request_id if request_id is not None else str(next(self._ids))
        if request_id in self._parents:
            raise ValidationError("request_id", f"{request_id!r} is already in use")
        cap = self.config.scheduler.max_queued_requests
        if cap is not None and self.scheduler.num_waiting >= cap:
            raise QueueFullError(f"{self.scheduler.num_waiting} requests are already waiting (cap {cap})")
        text, ids = self._tokenize(prompt)
        self.validate_lengths(len(ids), params)
        arrival = arrival_time if arrival_time is not None else time.monotonic()
        children: dict[str, _ChildState] = {}
        reqs = []
        for i in range(params.n):
            cp = params if params.n == 1 else params.clone_for_child(i)
            cid = request_id if params.n == 1 else f"{request_id}#{i}"
            detok = None
            if params.detokenize:
                detok = IncrementalDetokenizer(
                    self.tokenizer, ids, cp.skip_special_tokens, cp.stop, cp.include_stop_str_in_output
                )
            children[cid] = _ChildState(
                index=i, detok=detok, params=cp,
                logprobs=[] if cp.logprobs is not None else None,
                cumulative_logprob=0.0 if cp.logprobs is not None else None,
            )
            reqs.append(
                Request(
                    request_id=cid, prompt_token_ids=ids, sampling_params=cp,
                    eos_token_ids=self.eos_token_ids, arrival_time=arrival, max_model_len=self.max_model_len,
                )
            )
        self._parents[request_id] = _ParentState(
            request_id=request_id, prompt=text, prompt_token_ids=ids, children=children,
            metrics=RequestMetrics(arrival_time=arrival),
        )
        for r in reqs:
            self._child_to_parent[r.request_id] = request_id
            self.scheduler.add_request(r)
        return request_id

    def abort_request(self, request_ids: str | list[str]) -> None:
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for rid in request_ids:
            parent = self._parents.pop(rid, None)
            if parent is None:
                continue
            self.scheduler.finish_requests(parent.children.keys(), RequestStatus.FINISHED_ABORTED)
            for cid in parent.children:
                self._child_to_parent.pop(cid, None)

    # ---- the step -------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        core_outputs = self.core.step()
        now = time.monotonic()
        touched: dict[str, _ParentState] = {}
        for co in core_outputs:
            pid = self._child_to_parent.get(co.req_id)
            if pid is None:
                continue
            parent = self._parents[pid]
            child = parent.children[co.req_id]
            m = parent.metrics
            if m.first_token_time is None:
                m.first_token_time = now
                req_sched = co.num_cached_tokens
                parent.num_cached_tokens = req_sched
            m.last_token_time = now
            child.token_ids.extend(co.new_token_ids)
            if co.new_logprobs and child.logprobs is not None:
                child.logprobs.extend(co.new_logprobs)
                child.cumulative_logprob = (child.cumulative_logprob or 0.0) + sum(
                    lp.logprob for lp in co.new_logprobs
                )
            finish, stop_reason = co.finish_reason, co.stop_reason
            if child.detok is not None:
                stop_str = child.detok.update(co.new_token_ids)
                if stop_str is not None and finish is None:
                    finish, stop_reason = "stop", stop_str
                    self.scheduler.finish_requests([co.req_id], RequestStatus.FINISHED_STOPPED)
                elif stop_str is not None:
                    finish, stop_reason = "stop", stop_str
            if finish is not None:
                child.finish_reason, child.stop_reason = finish, stop_reason
            touched[pid] = parent
        outputs = []
        for pid, parent in touched.items():
            out = self._make_output(parent, now)
            outputs.append(out)
            if out.finished:
                del self._parents[pid]
                for cid in parent.children:
                    self._child_to_parent.pop(cid, None)
        return outputs

    def _make_output(self, parent: _ParentState, now: float) -> RequestOutput:
        comps = []
        for c in parent.children.values():
            finished = c.finish_reason is not None
            text = c.detok.get_next_output_text(finished, delta=False) if c.detok is not None else ""
            delta_text = text[c.sent_text_len :]
            c.sent_text_len = len(text)
            delta_ids = c.token_ids[c.sent_tokens :]
            delta_lp = c.logprobs[c.sent_tokens :] if c.logprobs is not None else None
            c.sent_tokens = len(c.token_ids)
            comps.append(
                CompletionOutput(
                    # the live list (no per-step copy): it grows until the request finishes
                    index=c.index, text=text, token_ids=c.token_ids,
                    cumulative_logprob=c.cumulative_logprob, logprobs=c.logprobs,
                    finish_reason=c.finish_reason, stop_reason=c.stop_reason,
                    delta_text=delta_text, delta_token_ids=delta_ids, delta_logprobs=delta_lp,
                )
            )
        finished = all(c.finish_reason is not None for c in parent.children.values())
        if finished:
            parent.metrics.finished_time = now
        parent.metrics.num_cached_tokens = parent.num_cached_tokens
        return RequestOutput(
            request_id=parent.request_id, prompt=parent.prompt, prompt_token_ids=parent.prompt_token_ids,
            outputs=comps, finished=finished, metrics=parent.metrics, num_cached_tokens=parent.num_cached_tokens,
        )

    # ---- figures --------------------------------------------------------------------------
    def has_unfinished_requests(self) -> bool:
        return bool(self._parents)

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._parents)
