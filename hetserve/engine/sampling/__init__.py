"""Token sampling: batched logit processors, masks and the per-request sampling state."""

from __future__ import annotations

from hetserve.engine.sampling.penalties import TokenCounts, apply_penalties, mask_token_ids
from hetserve.engine.sampling.sampler import (
    Sampler,
    SamplerOutput,
    SamplingState,
    apply_min_p,
    apply_top_k,
    apply_top_p,
    make_generator,
)

__all__ = [
    "Sampler",
    "SamplerOutput",
    "SamplingState",
    "TokenCounts",
    "apply_min_p",
    "apply_penalties",
    "apply_top_k",
    "apply_top_p",
    "make_generator",
    "mask_token_ids",
]
