"""``BatchShape``: what one step computes, in the few numbers the cost model's step time depends on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hetserve.core.outputs import SchedulerOutput


@dataclass(frozen=True, slots=True)
class BatchShape:
    """What one step computes, in the few numbers its cost depends on.

    ``prefill_chunks``: ``(num_new_tokens, num_context_tokens_before)`` per request with more than one new token.
    ``num_decode_seqs``: requests with exactly one new token; ``decode_context_tokens``: the sum of their
    cached tokens before this step. ``num_sampled``: rows through the LM head (None: one per request).
    ``num_new_seqs``: requests the executor has not seen before (first step, or resumed after preemption);
    ``new_seq_tokens``: their tokens this step. Both only add host overhead. ``decode_max_context``: the
    largest of the decode requests' cached tokens (0: unknown, taken as the mean): a batch of uneven contexts
    takes longer in attention than one of the same keys spread evenly (the long ones finish last).
    """

    prefill_chunks: tuple[tuple[int, int], ...] = ()
    num_decode_seqs: int = 0
    decode_context_tokens: int = 0
    num_sampled: int | None = None
    num_new_seqs: int = 0
    new_seq_tokens: int = 0
    decode_max_context: int = 0

    @property
    def num_tokens(self) -> int:
        return self.num_decode_seqs + sum(n for n, _ in self.prefill_chunks)

    @property
    def num_reqs(self) -> int:
        return self.num_decode_seqs + len(self.prefill_chunks)

    @classmethod
    def from_lists(cls, num_scheduled_tokens: Sequence[int], num_computed_before: Sequence[int]) -> BatchShape:
        """Per request: tokens computed this step and tokens whose KV existed before it."""
        chunks: list[tuple[int, int]] = []
        num_decode = 0
        decode_ctx = 0
        decode_max = 0
        for n, c in zip(num_scheduled_tokens, num_computed_before, strict=True):
            if n == 1:
                num_decode += 1
                decode_ctx += c
                decode_max = max(decode_max, c)
            elif n > 1:
                chunks.append((n, c))
        return cls(tuple(chunks), num_decode, decode_ctx, decode_max_context=decode_max)

    @classmethod
    def from_scheduler_output(cls, out: SchedulerOutput) -> BatchShape:
        """A scheduler step: ``num_computed_tokens`` counts tokens before it; ``sample`` rows go through the LM head."""
        chunks: list[tuple[int, int]] = []
        num_decode = 0
        decode_ctx = 0
        num_sampled = 0
        num_new = 0
        new_tokens = 0
        decode_max = 0
        for sr in out.scheduled:
            n = sr.num_tokens
            if n == 1:
                num_decode += 1
                decode_ctx += sr.num_computed_tokens
                decode_max = max(decode_max, sr.num_computed_tokens)
            elif n > 1:
                chunks.append((n, sr.num_computed_tokens))
            num_sampled += sr.sample
            if sr.new is not None:
                num_new += 1
                new_tokens += n
        return cls(tuple(chunks), num_decode, decode_ctx, num_sampled, num_new, new_tokens, decode_max)
