"""Logit processors that depend on a request's history: min_tokens and the three penalties.

All of them act on a whole batch at once; the per-request history lives in ``TokenCounts`` tensors
that are kept up to date incrementally across steps, so a step costs O(new tokens), not O(sequence).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


def apply_penalties(
    logits: Tensor,
    prompt_mask: Tensor,
    output_counts: Tensor,
    repetition_penalties: Tensor,
    presence_penalties: Tensor,
    frequency_penalties: Tensor,
) -> Tensor:
    """Penalised copy of ``logits`` [num_reqs, vocab].

    ``prompt_mask`` (bool) marks tokens in each row's prompt, ``output_counts`` (int) counts each token in
    the row's generated output. Repetition penalty (HF/vLLM): a token seen in prompt or output has its
    positive logit divided by r and its negative logit multiplied by r. Presence and frequency (OpenAI):
    ``logit -= frequency * count + presence * (count > 0)``, from the output only.
    """
    rep = repetition_penalties.to(logits.dtype).unsqueeze(1)
    seen = prompt_mask | (output_counts > 0)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    counts = output_counts.to(logits.dtype)
    logits = logits - frequency_penalties.to(logits.dtype).unsqueeze(1) * counts
    logits = logits - presence_penalties.to(logits.dtype).unsqueeze(1) * (counts > 0).to(logits.dtype)
    return logits


def mask_token_ids(logits: Tensor, token_ids_per_row: Sequence[Sequence[int]]) -> Tensor:
    """Copy of ``logits`` with ``token_ids_per_row[i]`` set to -inf in row i (ids past the vocab ignored)."""
    vocab_size = logits.shape[1]
    rows: list[int] = []
    cols: list[int] = []
    for row, ids in enumerate(token_ids_per_row):
        for tid in ids:
            if 0 <= tid < vocab_size:
                rows.append(row)
                cols.append(tid)
    if not rows:
        return logits
    logits = logits.clone()
    index_rows = torch.tensor(rows, dtype=torch.long, device=logits.device)
    index_cols = torch.tensor(cols, dtype=torch.long, device=logits.device)
    logits[index_rows, index_cols] = float("-inf")
    return logits


@dataclass
class TokenCounts:
    """One request's prompt mask and output counts on the device, updated as its output grows.

    ``num_counted`` output tokens are already in ``output_counts``; if the output list is ever shorter than
    that (the runner rebuilt the request after a preemption), the counts are rebuilt from scratch.
    """

    prompt_mask: Tensor  # bool [vocab]
    output_counts: Tensor  # int32 [vocab]
    num_counted: int = 0

    @classmethod
    def create(cls, prompt_token_ids: Sequence[int], vocab_size: int, device: torch.device) -> TokenCounts:
        prompt_mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
        ids = [t for t in prompt_token_ids if 0 <= t < vocab_size]
        if ids:
            prompt_mask[torch.tensor(ids, dtype=torch.long, device=device)] = True
        output_counts = torch.zeros(vocab_size, dtype=torch.int32, device=device)
        return cls(prompt_mask=prompt_mask, output_counts=output_counts)

    def update(self, output_token_ids: Sequence[int]) -> None:
        if len(output_token_ids) < self.num_counted:
            self.output_counts.zero_()
            self.num_counted = 0
        vocab_size = self.output_counts.shape[0]
        new_ids = [t for t in output_token_ids[self.num_counted :] if 0 <= t < vocab_size]
        if new_ids:
            index = torch.tensor(new_ids, dtype=torch.long, device=self.output_counts.device)
            ones = torch.ones(len(new_ids), dtype=torch.int32, device=self.output_counts.device)
            self.output_counts.index_add_(0, index, ones)
        self.num_counted = len(output_token_ids)
