"""Turn one step's logits into tokens (and logprobs), one row per request, vectorised over the batch.

Order, as in vLLM v1: min_tokens (stop/eos ids masked) -> penalties -> greedy argmax, or for random rows
temperature -> top-k -> top-p -> min-p -> sample. Every mask is a batched tensor op; the only per-row
python work is drawing a seeded row's noise from its own generator, which is what makes a seeded request's
tokens independent of whatever else shares the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from hetserve.core.outputs import Logprobs
from hetserve.core.sampling_params import SamplingParams, SamplingType
from hetserve.engine.sampling.penalties import TokenCounts, apply_penalties, mask_token_ids

_NEG_INF = float("-inf")


def make_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``: a seeded request's private source of noise."""
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(seed)
    return generator


@dataclass
class SamplingState:
    """Per request, owned by the runner, lives across steps. The runner appends each sampled token."""

    params: SamplingParams
    prompt_token_ids: list[int]
    output_token_ids: list[int] = field(default_factory=list)
    eos_token_ids: frozenset[int] = frozenset()
    generator: torch.Generator | None = None
    # device-side prompt mask and output counts, built the first time a penalty is needed
    token_counts: TokenCounts | None = field(default=None, repr=False, compare=False)

    @classmethod
    def create(
        cls,
        params: SamplingParams,
        prompt_token_ids: list[int],
        eos_token_ids: frozenset[int],
        device: torch.device | str,
        output_token_ids: list[int] | None = None,
    ) -> SamplingState:
        generator = None if params.seed is None else make_generator(params.seed, device)
        return cls(
            params=params,
            prompt_token_ids=prompt_token_ids,
            output_token_ids=[] if output_token_ids is None else output_token_ids,
            eos_token_ids=eos_token_ids,
            generator=generator,
        )

    @property
    def has_penalties(self) -> bool:
        p = self.params
        return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0

    def min_tokens_blocked_ids(self) -> set[int]:
        """Ids that may not be sampled yet: stop ids and (unless ignore_eos) eos, while below min_tokens."""
        if len(self.output_token_ids) >= self.params.min_tokens:
            return set()
        blocked = set(self.params.stop_token_ids)
        if not self.params.ignore_eos:
            blocked |= self.eos_token_ids
        return blocked


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[Logprobs | None]


def apply_top_k(logits: Tensor, k: Tensor) -> Tensor:
    """Keep each row's ``k[i]`` largest logits (ties at the k-th value are all kept); 0 = off."""
    vocab_size = logits.shape[1]
    k = k.to(device=logits.device, dtype=torch.long)
    active = (k > 0) & (k < vocab_size)
    if not bool(active.any()):
        return logits
    max_k = int(torch.where(active, k, 0).max())
    top_values = logits.topk(max_k, dim=1).values
    kth = top_values.gather(1, (torch.where(active, k, 1) - 1).unsqueeze(1))
    threshold = torch.where(active.unsqueeze(1), kth, torch.full_like(kth, _NEG_INF))
    return logits.masked_fill(logits < threshold, _NEG_INF)


def apply_top_p(logits: Tensor, p: Tensor) -> Tensor:
    """Keep each row's smallest set of most likely tokens whose probability reaches ``p[i]``; 1.0 = off."""
    p = p.to(device=logits.device, dtype=logits.dtype)
    active = p < 1.0
    if not bool(active.any()):
        return logits
    sorted_logits, order = logits.sort(dim=1, descending=False)
    cumulative = sorted_logits.softmax(dim=1).cumsum(dim=1)
    # a token is dropped when the tokens more likely than it already hold at least p of the mass
    remove_sorted = cumulative <= (1.0 - p).unsqueeze(1)
    remove_sorted[:, -1] = False
    remove_sorted &= active.unsqueeze(1)
    remove = torch.zeros_like(remove_sorted).scatter(1, order, remove_sorted)
    return logits.masked_fill(remove, _NEG_INF)


def apply_min_p(logits: Tensor, p: Tensor) -> Tensor:
    """Drop tokens whose probability is below ``p[i]`` times the row's largest probability; 0 = off."""
    p = p.to(device=logits.device, dtype=logits.dtype)
    if not bool((p > 0).any()):
        return logits
    probs = logits.softmax(dim=1)
    max_probs = probs.max(dim=1, keepdim=True).values
    return logits.masked_fill(probs < p.unsqueeze(1) * max_probs, _NEG_INF)


class Sampler:
    """Samples one token per row of ``logits``; ``states[i]`` describes row i.

    Unseeded rows share ``generator`` (None = torch's default generator of the device).
    """

    def __init__(
        self, vocab_size: int, device: torch.device | str, generator: torch.Generator | None = None
    ) -> None:
        self.vocab_size = vocab_size
        self.device = torch.device(device)
        self.generator = generator

    def __call__(self, logits: Tensor, states: list[SamplingState]) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise ValueError(f"logits {tuple(logits.shape)} do not match {len(states)} sampling states")
        if logits.dtype != torch.float32:
            logits = logits.float()
        # Logprobs are reported from the raw model logits, before min_tokens, penalties, temperature and
        # the top-k/p masks (vLLM v1's default "raw_logprobs"), so they describe the model, not the sampler.
        raw_logits = logits
        logits = self._apply_min_tokens(logits, states)
        logits = self._apply_penalties(logits, states)
        token_ids = self._sample(logits, states)
        token_list: list[int] = token_ids.tolist()
        logprobs = self._logprobs(raw_logits, token_ids, states)
        return SamplerOutput(token_ids=token_list, logprobs=logprobs)

    def _apply_min_tokens(self, logits: Tensor, states: list[SamplingState]) -> Tensor:
        blocked = [state.min_tokens_blocked_ids() for state in states]
        if not any(blocked):
            return logits
        return mask_token_ids(logits, blocked)

    def _apply_penalties(self, logits: Tensor, states: list[SamplingState]) -> Tensor:
        rows = [i for i, state in enumerate(states) if state.has_penalties]
        if not rows:
            return logits
        vocab_size = logits.shape[1]
        prompt_masks: list[Tensor] = []
        output_counts: list[Tensor] = []
        for i in rows:
            state = states[i]
            counts = state.token_counts
            if counts is None or counts.prompt_mask.shape[0] != vocab_size:
                counts = TokenCounts.create(state.prompt_token_ids, vocab_size, logits.device)
                state.token_counts = counts
            counts.update(state.output_token_ids)
            prompt_masks.append(counts.prompt_mask)
            output_counts.append(counts.output_counts)
        device = logits.device
        params = [states[i].params for i in rows]
        index = torch.tensor(rows, dtype=torch.long, device=device)
        penalised = apply_penalties(
            logits.index_select(0, index),
            torch.stack(prompt_masks),
            torch.stack(output_counts),
            torch.tensor([p.repetition_penalty for p in params], device=device),
            torch.tensor([p.presence_penalty for p in params], device=device),
            torch.tensor([p.frequency_penalty for p in params], device=device),
        )
        return logits.index_copy(0, index, penalised)

    def _sample(self, logits: Tensor, states: list[SamplingState]) -> Tensor:
        greedy = [state.params.sampling_type == SamplingType.GREEDY for state in states]
        if all(greedy):
            return logits.argmax(dim=1)
        random_rows = [i for i, g in enumerate(greedy) if not g]
        if len(random_rows) == len(states):
            return self._sample_random(logits, states)
        tokens = logits.argmax(dim=1)
        index = torch.tensor(random_rows, dtype=torch.long, device=logits.device)
        sampled = self._sample_random(logits.index_select(0, index), [states[i] for i in random_rows])
        return tokens.index_copy(0, index, sampled)

    def _sample_random(self, logits: Tensor, states: list[SamplingState]) -> Tensor:
        device = logits.device
        params = [state.params for state in states]
        temperatures = torch.tensor([p.temperature for p in params], dtype=logits.dtype, device=device)
        logits = logits / temperatures.unsqueeze(1)
        if any(p.top_k > 0 for p in params):
            logits = apply_top_k(logits, torch.tensor([p.top_k for p in params], device=device))
        if any(p.top_p < 1.0 for p in params):
            logits = apply_top_p(logits, torch.tensor([p.top_p for p in params], device=device))
        if any(p.min_p > 0.0 for p in params):
            logits = apply_min_p(logits, torch.tensor([p.min_p for p in params], device=device))
        probs = logits.softmax(dim=1)
        # Exponential race: argmax(p_i / E_i) with E_i ~ Exp(1) is a draw from p. Each seeded row takes its
        # noise from its own generator, a full row per step, so its draw ignores the rest of the batch.
        noise = torch.empty_like(probs)
        noise.exponential_(generator=self.generator)
        for row, state in enumerate(states):
            if state.params.seed is not None:
                if state.generator is None:
                    state.generator = make_generator(state.params.seed, device)
                noise[row].exponential_(generator=state.generator)
        noise.clamp_(min=torch.finfo(noise.dtype).tiny)
        return (probs / noise).argmax(dim=1)

    def _logprobs(
        self, raw_logits: Tensor, token_ids: Tensor, states: list[SamplingState]
    ) -> list[Logprobs | None]:
        out: list[Logprobs | None] = [None] * len(states)
        rows = [i for i, state in enumerate(states) if state.params.logprobs is not None]
        if not rows:
            return out
        index = torch.tensor(rows, dtype=torch.long, device=raw_logits.device)
        logprobs = raw_logits.index_select(0, index).log_softmax(dim=1)
        sampled = token_ids.index_select(0, index).unsqueeze(1)
        sampled_logprobs = logprobs.gather(1, sampled)
        ranks = (logprobs > sampled_logprobs).sum(dim=1) + 1
        num_top = [states[i].params.logprobs or 0 for i in rows]
        max_top = min(max(num_top), logprobs.shape[1])
        top_ids: list[list[int]] = [[] for _ in rows]
        top_values: list[list[float]] = [[] for _ in rows]
        if max_top > 0:
            top = logprobs.topk(max_top, dim=1)
            top_ids = top.indices.tolist()
            top_values = top.values.tolist()
        sampled_list = sampled.squeeze(1).tolist()
        sampled_lp_list = sampled_logprobs.squeeze(1).tolist()
        rank_list = ranks.tolist()
        for j, row in enumerate(rows):
            n = num_top[j]
            out[row] = Logprobs(
                token_id=sampled_list[j],
                logprob=sampled_lp_list[j],
                rank=rank_list[j],
                top_token_ids=top_ids[j][:n],
                top_logprobs=top_values[j][:n],
            )
        return out
