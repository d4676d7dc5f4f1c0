"""A request's state in the engine: two counters, no phases.

``num_computed_tokens`` counts tokens whose KV exists on the instance that runs the request next.
``num_tokens`` = prompt + generated tokens. A step advances a request by some tokens; a prefill chunk,
a prefix-cache hit and KV that arrived from another device all just move ``num_computed_tokens`` forward.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from hetserve.core.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    # blocks are allocated and the KV of the first ``num_remote_tokens`` tokens is on its way
    WAITING_FOR_REMOTE_KV = 3
    # everything past here is finished
    FINISHED_STOPPED = 10
    FINISHED_LENGTH_CAPPED = 11
    FINISHED_ABORTED = 12
    FINISHED_ERROR = 13
    # done on this instance; its KV stays pinned for another instance to take (PD prefill, Cronus head)
    FINISHED_REMOTE = 14

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASON.get(self)


_FINISH_REASON = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
    RequestStatus.FINISHED_REMOTE: "remote",
}


@dataclass
class KVTransferParams:
    """How a request's KV crosses instances.

    On the sending side, ``compute_limit`` caps the tokens computed here (None: all, then sample one token,
    as a PD prefill instance does); the request then finishes as FINISHED_REMOTE with its blocks pinned
    until released. On the receiving side, ``num_remote_tokens`` leading tokens arrive from elsewhere.
    """

    compute_limit: int | None = None
    send: bool = False
    num_remote_tokens: int = 0
    remote_instance: str | None = None


@dataclass(slots=True, eq=False)  # identity: list.remove() must not compare every field
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    arrival_time: float = field(default_factory=time.monotonic)
    max_model_len: int | None = None
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | str | None = None
    num_preemptions: int = 0
    # prefix-cache hit found when the request was first scheduled (tokens)
    num_cached_tokens: int = -1
    # timestamps (time.monotonic) for metrics
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    # chained hashes of this request's full blocks, filled lazily by the KV cache manager
    block_hashes: list[int] = field(default_factory=list)
    kv_transfer: KVTransferParams | None = None
    # tokens that steps in flight will sample for this request (async scheduling: the scheduler may schedule the
    # next position before the previous step's token is known; the executor takes it from the device)
    num_pending_tokens: int = 0
    # len(prompt) + len(output), kept current by append_output: a plain field, since the scheduler's per-request
    # loops read it millions of times in a simulation (a property call costs several times an attribute read)
    num_tokens: int = field(init=False, default=0, repr=False)
    # the sampling parameters allow running ahead (see may_run_ahead); SamplingParams are not changed once a
    # request holds them, so this is decided once
    _sampling_may_run_ahead: bool = field(init=False, default=False, repr=False)

    def __post_init__(self) -> None:
        self.num_tokens = len(self.prompt_token_ids) + len(self.output_token_ids)
        sp = self.sampling_params
        self._sampling_may_run_ahead = (
            sp.min_tokens <= 0
            and sp.seed is None
            and sp.repetition_penalty == 1.0
            and sp.presence_penalty == 0.0
            and sp.frequency_penalty == 0.0
        )

    def append_output(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.num_tokens += 1

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    def token_ids_slice(self, start: int, end: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - n]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def num_target_tokens(self) -> int:
        """Tokens this instance computes KV for before it samples (or hands the request on)."""
        kt = self.kv_transfer
        if kt is not None and kt.compute_limit is not None:
            return min(kt.compute_limit, self.num_tokens)
        return self.num_tokens

    @property
    def may_run_ahead(self) -> bool:
        """Whether the next position may be scheduled while a step that samples this request is in flight:
        its sampling does not depend on the tokens before it (no penalties, no min_tokens, no seed: the runner
        has not seen the pending token yet), it does not hand its KV on or wait for KV (a request whose KV has
        arrived decodes like any other), and the pending token cannot be its last."""
        if not self._sampling_may_run_ahead:
            return False
        kt = self.kv_transfer
        if kt is not None and (kt.send or kt.compute_limit is not None or kt.num_remote_tokens > 0):
            return False
        # the step would sample output token number len(output) + pending + 1
        ahead = self.num_pending_tokens + 1
        max_tokens = self.sampling_params.max_tokens
        if max_tokens is not None and len(self.output_token_ids) + ahead > max_tokens:
            return False
        return self.max_model_len is None or self.num_tokens + ahead <= self.max_model_len

    def check_stop(self, new_token_id: int) -> RequestStatus | None:
        """Stop condition after appending ``new_token_id``; stop strings are checked after detokenising."""
        sp = self.sampling_params
        n_out = len(self.output_token_ids)
        if sp.ignore_eos and not sp.stop_token_ids:  # the common benchmark case: only lengths stop it
            if (sp.max_tokens is not None and n_out >= sp.max_tokens) or (
                self.max_model_len is not None and self.num_tokens >= self.max_model_len
            ):
                return RequestStatus.FINISHED_LENGTH_CAPPED
            return None
        if n_out >= sp.min_tokens:
            if not sp.ignore_eos and new_token_id in self.eos_token_ids:
                self.stop_reason = None
                return RequestStatus.FINISHED_STOPPED
            if new_token_id in sp.stop_token_ids:
                self.stop_reason = new_token_id
                return RequestStatus.FINISHED_STOPPED
        if sp.max_tokens is not None and n_out >= sp.max_tokens:
            return RequestStatus.FINISHED_LENGTH_CAPPED
        if self.max_model_len is not None and self.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH_CAPPED
        return None
