"""Synthetic steps for measuring an engine: attention metadata, scheduler outputs and a no-op attention backend.

The timing is real, the tokens are not: cached tokens' KV is whatever the pool holds.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch

from hetserve.core.errors import ValidationError
from hetserve.core.model_config import ModelConfig
from hetserve.core.outputs import NewRequestInfo, ScheduledRequest, SchedulerOutput
from hetserve.core.sampling_params import SamplingParams
from hetserve.engine.attention import AttentionBackend, AttentionMetadata


def truncated_config(cfg: ModelConfig, num_layers: int) -> ModelConfig:
    """The same per-layer shapes with ``num_layers`` layers (per-layer lists in ``raw`` cut to match)."""
    n = min(num_layers, cfg.num_hidden_layers)
    raw = dict(cfg.raw)
    raw["num_hidden_layers"] = n
    if isinstance(raw.get("layer_types"), list):
        raw["layer_types"] = raw["layer_types"][:n]
    return dataclasses.replace(cfg, num_hidden_layers=n, raw=raw)


def build_metadata(
    seqs: Sequence[tuple[int, int]], block_size: int, device: torch.device, num_pool_blocks: int | None = None
) -> AttentionMetadata:
    """Attention metadata of one step: per sequence ``(num_new_tokens, num_cached_tokens)``.

    Sequences get consecutive blocks from block 1 on (block 0 is the engine's null block); with
    ``num_pool_blocks`` the block ids wrap around ``[1, num_pool_blocks)``.
    """
    positions: list[int] = []
    slots: list[int] = []
    qsl = [0]
    seq_lens: list[int] = []
    tables: list[list[int]] = []
    nxt = 0
    span = None if num_pool_blocks is None else num_pool_blocks - 1
    if span is not None and span < 1:
        raise ValidationError("num_pool_blocks", "needs at least 2 blocks")
    for n_new, n_cached in seqs:
        total = n_cached + n_new
        nb = max(1, math.ceil(total / block_size))
        table = [1 + ((nxt + i) % span if span else nxt + i) for i in range(nb)]
        nxt += nb
        pos = range(n_cached, total)
        positions.extend(pos)
        slots.extend(table[p // block_size] * block_size + p % block_size for p in pos)
        qsl.append(qsl[-1] + n_new)
        seq_lens.append(total)
        tables.append(table)
    width = max(len(t) for t in tables)
    bt = torch.zeros(len(tables), width, dtype=torch.int32)
    for i, t in enumerate(tables):
        bt[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    return AttentionMetadata(
        num_tokens=qsl[-1],
        num_seqs=len(seqs),
        positions=torch.tensor(positions, dtype=torch.int64, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=bt.to(device),
        max_query_len=max(n for n, _ in seqs),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=seq_lens,
    )


def synthetic_step(
    seqs: Sequence[tuple[str, int, int]],
    block_size: int,
    *,
    new: bool,
    vocab_size: int,
    num_pool_blocks: int | None = None,
    seed: int = 0,
    first_block: int = 1,
) -> SchedulerOutput:
    """A scheduler step for the runner: per request ``(req_id, num_new_tokens, num_cached_tokens)``, sampling
    one token each (greedy). With ``new`` the requests are introduced (their block tables sent); otherwise
    they must have been introduced by an earlier step. The cached tokens' KV is whatever the pool holds: the
    timing is real, the tokens are not."""
    g = torch.Generator().manual_seed(seed)
    sched: list[ScheduledRequest] = []
    nxt = 0
    span = None if num_pool_blocks is None else num_pool_blocks - first_block
    params = SamplingParams(temperature=0.0, max_tokens=1 << 20, ignore_eos=True, detokenize=False)
    for req_id, n_new, n_cached in seqs:
        total = n_cached + n_new
        nb = max(1, math.ceil(total / block_size))
        blocks = [first_block + ((nxt + i) % span if span else nxt + i) for i in range(nb)]
        nxt += nb
        ids = torch.randint(10, max(11, vocab_size), (total,), generator=g).tolist()
        info = None
        if new:
            info = NewRequestInfo(prompt_token_ids=ids, output_token_ids=[], sampling_params=params, eos_token_ids=[])
        sched.append(
            ScheduledRequest(
                req_id=req_id,
                token_ids=ids[n_cached:],
                num_computed_tokens=n_cached,
                num_tokens=n_new,
                new_block_ids=blocks if new else [],
                sample=True,
                new=info,
            )
        )
    return SchedulerOutput(scheduled=sched, total_num_scheduled_tokens=sum(s.num_tokens for s in sched))


class NoAttention(AttentionBackend):
    """Attention that does nothing (returns ``q``): the model's forward then costs its dense part only."""

    name = "none"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float, sliding_window: int | None) -> torch.Tensor:
        return q
