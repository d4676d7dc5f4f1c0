"""The plain data that crosses the step loop: scheduler -> executor -> scheduler, and engine -> user.

No tensors here: a step is integers and lists, so the same objects drive a real model runner,
a worker in another process (serialised by msgspec) and the simulator's cost-model executor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hetserve.core.sampling_params import SamplingParams


@dataclass
class NewRequestInfo:
    """What an executor needs the first time it sees a request (and again after a preemption)."""

    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: list[int]


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step: compute ``token_ids`` at positions
    ``[num_computed_tokens, num_computed_tokens + len(token_ids))``."""

    req_id: str
    # the tokens to compute; empty when the scheduler was built with emit_token_ids=False (simulator)
    token_ids: list[int]
    num_computed_tokens: int
    num_tokens: int
    # blocks appended to the request's block table since the executor last saw it (all of them when new)
    new_block_ids: list[int]
    # the step ends at the request's last known token, so one token is sampled
    sample: bool
    new: NewRequestInfo | None = None
    # the request's preemption count when scheduled: an answer to a step scheduled before a preemption (several
    # steps in flight) is stale once the request was re-admitted, and is dropped
    epoch: int = 0
    # async scheduling: the step's last token is the one the request's previous step samples (still in flight,
    # so not in ``token_ids``); the executor takes it from where it keeps sampled tokens on the device
    placeholder: bool = False


@dataclass
class KVLoad:
    """Blocks allocated this step for KV that arrives from another instance (first ``num_tokens`` tokens)."""

    req_id: str
    block_ids: list[int]
    num_tokens: int


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    total_num_scheduled_tokens: int
    # requests the executor may forget (finished, aborted, or preempted since the last step)
    finished_req_ids: set[str] = field(default_factory=set)
    preempted_req_ids: set[str] = field(default_factory=set)
    kv_loads: list[KVLoad] = field(default_factory=list)
    step_id: int = 0

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0

    @property
    def num_reqs(self) -> int:
        return len(self.scheduled)


@dataclass
class Logprobs:
    """Log-probabilities of one sampled position: the sampled token's, its rank, and the top-N."""

    token_id: int
    logprob: float
    rank: int
    top_token_ids: list[int]
    top_logprobs: list[float]


@dataclass
class ModelRunnerOutput:
    """What one step produced. A request in ``req_ids`` whose step ended mid-prompt has no token."""

    req_ids: list[str]
    # one list per request, empty when the step did not end at the request's last known token
    sampled_token_ids: list[list[int]]
    logprobs: list[Logprobs | None] | None = None


@dataclass(slots=True)
class EngineCoreOutput:
    """What one step did for one request, as the scheduler reports it upward."""

    req_id: str
    new_token_ids: list[int]
    new_logprobs: list[Logprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[Logprobs] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # what this output added since the previous one for the same request (for streaming)
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)
    delta_logprobs: list[Logprobs] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0
