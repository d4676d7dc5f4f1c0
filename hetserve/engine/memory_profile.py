"""How much device memory one step needs beyond the weights: measured once, to size the KV pool."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from hetserve.core.sampling_params import SamplingParams
from hetserve.engine.attention import AttentionMetadata
from hetserve.engine.sampling.sampler import SamplingState

if TYPE_CHECKING:
    from hetserve.engine.runner import ModelRunner


@torch.inference_mode()
def profile_step_bytes(runner: ModelRunner) -> int:
    """Peak device memory of the largest step (``max_num_batched_tokens`` tokens in one forward, as
    sequences of at most ``max_model_len``; then logits and top-k/top-p sampling for ``max_num_seqs`` rows),
    beyond what is allocated before it."""
    mc = runner.model_config
    sc = runner.config.scheduler
    bs = runner.block_size
    num_tokens = sc.max_num_batched_tokens
    lens = [min(runner.max_model_len, num_tokens - start) for start in range(0, num_tokens, runner.max_model_len)]
    blocks_per_seq = -(-max(lens) // bs)
    num_rows = max(1, min(sc.max_num_seqs, num_tokens))
    torch.cuda.synchronize(runner.device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(runner.device)
    base = torch.cuda.memory_allocated(runner.device)
    caches = [torch.zeros(2, len(lens) * blocks_per_seq + 1, bs, runner.num_local_kv_heads, mc.head_dim,
                          dtype=runner.dtype, device=runner.device) for _ in range(runner.num_local_layers)]
    cache_bytes = sum(c.numel() * c.element_size() for c in caches)
    # sequence i owns blocks 1 + i * blocks_per_seq, ...; block 0 stays the null block
    pos_np = np.concatenate([np.arange(n) for n in lens])
    seq_np = np.repeat(np.arange(len(lens)), lens)
    slots_np = (1 + seq_np * blocks_per_seq) * bs + pos_np
    qsl = [0, *np.cumsum(lens).tolist()]
    tables = 1 + np.arange(len(lens))[:, None] * blocks_per_seq + np.arange(blocks_per_seq)[None, :]
    dev = runner.device
    positions = torch.from_numpy(pos_np).to(dev)
    meta = AttentionMetadata(
        num_tokens=num_tokens, num_seqs=len(lens), positions=positions,
        slot_mapping=torch.from_numpy(slots_np).to(dev),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=dev),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=dev),
        block_tables=torch.from_numpy(tables.astype(np.int32)).to(dev),
        max_query_len=max(lens), max_seq_len=max(lens), query_start_loc_cpu=qsl, seq_lens_cpu=lens,
    )
    # no global RNG here (see the sampler's generator above): any valid ids do
    ids = torch.arange(num_tokens, device=dev) % mc.vocab_size
    if runner.is_first_stage:
        hidden = runner.model(ids, positions, caches, meta, runner.backend)
    else:
        inter = [torch.zeros(num_tokens, mc.hidden_size, dtype=runner.dtype, device=dev) for _ in range(2)]
        hidden = runner.model(ids, positions, caches, meta, runner.backend, inter)
    if not runner.is_last_stage:
        torch.cuda.synchronize(runner.device)
        peak = torch.cuda.max_memory_allocated(runner.device) - base - cache_bytes
        del caches, hidden, meta, ids, positions
        torch.cuda.empty_cache()
        return max(0, peak)
    logits = runner.model.compute_logits(hidden[-num_rows:])
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50)
    states = [SamplingState(params=params, prompt_token_ids=[]) for _ in range(num_rows)]
    runner.sampler(logits, states)
    torch.cuda.synchronize(runner.device)
    peak = torch.cuda.max_memory_allocated(runner.device) - base - cache_bytes
    del caches, hidden, logits, meta, ids, positions
    torch.cuda.empty_cache()
    return max(0, peak)
