"""Per-request sampling parameters (vLLM's names and meanings), validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

from hetserve.core.errors import ValidationError

_GREEDY_EPS = 1e-5


class SamplingType(IntEnum):
    GREEDY = 0
    RANDOM = 1
    RANDOM_SEED = 2


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 = off
    min_p: float = 0.0
    seed: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # top-N logprobs of each sampled position
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    detokenize: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        def num(name: str, v: object) -> None:
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise ValidationError(name, f"must be a number, got {v!r}")

        def integer(name: str, v: object) -> None:
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValidationError(name, f"must be an integer, got {v!r}")

        integer("n", self.n)
        if self.n < 1:
            raise ValidationError("n", f"must be >= 1, got {self.n}")
        num("temperature", self.temperature)
        if self.temperature < 0:
            raise ValidationError("temperature", f"must be >= 0, got {self.temperature}")
        num("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise ValidationError("top_p", f"must be in (0, 1], got {self.top_p}")
        integer("top_k", self.top_k)
        if self.top_k < 0:
            raise ValidationError("top_k", f"must be -1 (off), 0 (off) or >= 1, got {self.top_k}")
        num("min_p", self.min_p)
        if not 0.0 <= self.min_p <= 1.0:
            raise ValidationError("min_p", f"must be in [0, 1], got {self.min_p}")
        if self.seed is not None:
            integer("seed", self.seed)
        num("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0:
            raise ValidationError("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        num("presence_penalty", self.presence_penalty)
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValidationError("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        num("frequency_penalty", self.frequency_penalty)
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValidationError("frequency_penalty", f"must be in [-2, 2], got {self.frequency_penalty}")
        if self.max_tokens is not None:
            integer("max_tokens", self.max_tokens)
            if self.max_tokens < 1:
                raise ValidationError("max_tokens", f"must be >= 1, got {self.max_tokens}")
        integer("min_tokens", self.min_tokens)
        if self.min_tokens < 0:
            raise ValidationError("min_tokens", f"must be >= 0, got {self.min_tokens}")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValidationError("min_tokens", f"{self.min_tokens} exceeds max_tokens {self.max_tokens}")
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise ValidationError("stop", "each stop string must be a non-empty string")
        for t in self.stop_token_ids:
            integer("stop_token_ids", t)
        if self.logprobs is not None:
            integer("logprobs", self.logprobs)
            if self.logprobs < 0:
                raise ValidationError("logprobs", f"must be >= 0, got {self.logprobs}")
        if self.prompt_logprobs is not None:
            integer("prompt_logprobs", self.prompt_logprobs)
            if self.prompt_logprobs < 0:
                raise ValidationError("prompt_logprobs", f"must be >= 0, got {self.prompt_logprobs}")

    @property
    def sampling_type(self) -> SamplingType:
        if self.temperature < _GREEDY_EPS:
            return SamplingType.GREEDY
        return SamplingType.RANDOM_SEED if self.seed is not None else SamplingType.RANDOM

    @property
    def all_stop_token_ids(self) -> set[int]:
        return set(self.stop_token_ids)

    def clone_for_child(self, index: int) -> SamplingParams:
        """Parameters of the index-th of n parallel samples: n = 1, and a distinct seed if seeded."""
        from dataclasses import replace

        seed = None if self.seed is None else self.seed + index
        return replace(self, n=1, seed=seed)
