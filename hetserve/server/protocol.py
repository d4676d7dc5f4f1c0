"""Request bodies of /v1/completions and /v1/chat/completions (OpenAI's fields plus vLLM's extra sampling fields
at the top level), and their translation to SamplingParams.

Types are strict (``"5"`` is not an integer, ``1`` is not a boolean) and non-finite numbers are refused. Fields
neither OpenAI nor vLLM define are ignored, as vLLM does. Fields we parse but cannot honour are refused with a
400 naming them rather than silently dropped.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, StrictBool, StrictStr

from hetserve.core.errors import ValidationError
from hetserve.core.sampling_params import SamplingParams

SInt = Annotated[int, Strict()]
SFloat = Annotated[float, Strict()]
TokenId = Annotated[int, Strict(), Field(ge=0)]
_INT64_MIN, _UINT64_MAX = -(2**63), 2**64 - 1
_MAX_STOP_STRINGS = 64

Role = Literal["system", "developer", "user", "assistant", "tool", "function"]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool | None = False


class _SamplingRequest(BaseModel):
    """Fields the two endpoints share."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: StrictStr
    n: SInt | None = Field(1, ge=1)
    temperature: SFloat | None = Field(None, ge=0.0, le=2.0)
    top_p: SFloat | None = Field(None, gt=0.0, le=1.0)
    seed: SInt | None = Field(None, ge=_INT64_MIN, le=_UINT64_MAX)
    stop: StrictStr | Annotated[list[StrictStr], Field(max_length=_MAX_STOP_STRINGS)] | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: SFloat | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: SFloat | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, SFloat] | None = None
    user: StrictStr | None = None
    # vLLM's extra sampling fields
    top_k: SInt | None = Field(None, ge=-1)
    min_p: SFloat | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: SFloat | None = Field(None, gt=0.0)
    ignore_eos: StrictBool | None = False
    min_tokens: SInt | None = Field(None, ge=0)
    stop_token_ids: list[TokenId] | None = None
    skip_special_tokens: StrictBool | None = True
    include_stop_str_in_output: StrictBool | None = False
    use_beam_search: StrictBool | None = False
    prompt_logprobs: SInt | None = None

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream and self.stream_options is not None and self.stream_options.include_usage)

    def _check_unsupported(self) -> None:
        if self.logit_bias:
            raise ValidationError("logit_bias", "is not supported by this server")
        if self.use_beam_search:
            raise ValidationError("use_beam_search", "beam search is not supported by this server")
        if self.prompt_logprobs is not None:
            raise ValidationError("prompt_logprobs", "is not supported by this server")
        if self.stream_options is not None and not self.stream:
            raise ValidationError("stream_options", "is only allowed when stream is true")

    def to_sampling_params(
        self, max_tokens: int | None, logprobs: int | None, max_n: int, max_logprobs: int, logprobs_field: str
    ) -> SamplingParams:
        """SamplingParams for one prompt; ``max_tokens`` and ``logprobs`` are resolved by the endpoint."""
        self._check_unsupported()
        n = 1 if self.n is None else self.n
        if n > max_n:
            raise ValidationError("n", f"must be <= {max_n} on this server, got {n}")
        if logprobs is not None and logprobs > max_logprobs:
            raise ValidationError(logprobs_field, f"must be <= {max_logprobs} on this server, got {logprobs}")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            n=n,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            min_p=0.0 if self.min_p is None else self.min_p,
            seed=self.seed,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens or 0,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=bool(self.ignore_eos),
            include_stop_str_in_output=bool(self.include_stop_str_in_output),
            logprobs=logprobs,
            skip_special_tokens=True if self.skip_special_tokens is None else self.skip_special_tokens,
        )


PromptText = Annotated[StrictStr, Field(min_length=1)]
PromptInput = PromptText | list[TokenId] | list[PromptText] | list[list[TokenId]]


class CompletionRequest(_SamplingRequest):
    """``POST /v1/completions``: ``prompt`` is a string, a list of token ids, or a batch of either."""

    prompt: PromptInput
    max_tokens: SInt | None = Field(16, ge=1)
    logprobs: SInt | None = Field(None, ge=0)
    echo: StrictBool | None = False
    suffix: StrictStr | None = None
    best_of: SInt | None = Field(None, ge=1)

    def prompts(self) -> list[str | list[int]]:
        """The batch: one entry per prompt."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ValidationError("prompt", "must not be empty")
        if isinstance(p[0], int):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]

    def check_supported(self) -> None:
        if self.suffix:
            raise ValidationError("suffix", "is not supported by this server")
        if self.best_of is not None and self.best_of != (self.n or 1):
            raise ValidationError("best_of", "only best_of == n is supported")
        if self.echo and self.logprobs is not None:
            raise ValidationError("echo", "echo together with logprobs is not supported (no prompt logprobs)")


class ChatMessage(BaseModel):
    # extra keys (tool_calls, tool_call_id, reasoning_content, ...) pass through to the chat template
    model_config = ConfigDict(extra="allow")

    role: Role
    content: StrictStr | list[dict[str, Any]] | None = None
    name: StrictStr | None = None


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: SInt | None = Field(None, ge=1)
    max_completion_tokens: SInt | None = Field(None, ge=1)
    logprobs: StrictBool | None = False
    top_logprobs: SInt | None = Field(None, ge=0)
    tools: list[dict[str, Any]] | None = None
    tool_choice: StrictStr | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    add_generation_prompt: StrictBool | None = True
    continue_final_message: StrictBool | None = False
    chat_template: StrictStr | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    def check_supported(self) -> None:
        if self.chat_template is not None:
            raise ValidationError(
                "chat_template", "per-request chat templates are not accepted; start the server with --chat-template"
            )
        if self.continue_final_message:
            raise ValidationError("continue_final_message", "is not supported by this server")
        if self.tool_choice not in (None, "none", "auto"):
            raise ValidationError("tool_choice", "only 'none' and 'auto' are supported (no tool-call parsing)")
        if self.response_format is not None and self.response_format.get("type", "text") != "text":
            raise ValidationError("response_format", "only {'type': 'text'} is supported (no guided decoding)")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValidationError("top_logprobs", "needs logprobs: true")

    def requested_max_tokens(self) -> int | None:
        """``max_completion_tokens`` wins over the deprecated ``max_tokens``, as in OpenAI's API."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def requested_logprobs(self) -> int | None:
        if not self.logprobs:
            return None
        return self.top_logprobs or 0

    def template_messages(self) -> list[dict[str, Any]]:
        """Messages as the chat template takes them: text content parts joined into one string."""
        out = []
        for i, m in enumerate(self.messages):
            d = m.model_dump(exclude_none=True)
            if isinstance(m.content, list):
                texts = []
                for j, part in enumerate(m.content):
                    kind = part.get("type")
                    if kind != "text" or not isinstance(part.get("text"), str):
                        raise ValidationError(
                            f"messages[{i}].content[{j}]",
                            f"only text parts ({{'type': 'text', 'text': ...}}) are supported, got type {kind!r}",
                        )
                    texts.append(part["text"])
                d["content"] = "\n".join(texts)
            out.append(d)
        return out
