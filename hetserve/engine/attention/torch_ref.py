"""Reference attention backend: plain torch, one sequence at a time, scores and softmax in float32.

Slow by design; it is the yardstick the fast backends are tested against and the CPU backend.
"""

from __future__ import annotations

import torch

from hetserve.engine.attention.base import AttentionBackend, AttentionMetadata


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter this step's k/v rows into the paged cache; negative slots are padding and are skipped."""
    num_kv_heads, head_dim = kv_cache.shape[-2], kv_cache.shape[-1]
    # view (not reshape) so a non-contiguous cache fails loudly instead of writing into a copy
    key_slots = kv_cache[0].view(-1, num_kv_heads, head_dim)
    value_slots = kv_cache[1].view(-1, num_kv_heads, head_dim)
    slots = slot_mapping[: k.shape[0]]
    if bool((slots < 0).any()):
        keep = slots >= 0
        slots, k, v = slots[keep], k[keep], v[keep]
    key_slots.index_copy_(0, slots, k.to(kv_cache.dtype))
    value_slots.index_copy_(0, slots, v.to(kv_cache.dtype))


def gather_context(
    kv_cache: torch.Tensor, block_table: torch.Tensor, context_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values of positions ``[0, context_len)`` of one sequence, each ``[context_len, kv_heads, dim]``."""
    block_size = kv_cache.shape[2]
    num_blocks = (context_len + block_size - 1) // block_size
    blocks = block_table[:num_blocks].long()
    keys = kv_cache[0, blocks].flatten(0, 1)[:context_len]
    values = kv_cache[1, blocks].flatten(0, 1)[:context_len]
    return keys, values


class TorchRefBackend(AttentionBackend):
    name = "torch_ref"

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        write_kv(k, v, kv_cache, meta.slot_mapping)
        num_heads, head_dim = q.shape[1], q.shape[2]
        num_kv_heads = kv_cache.shape[3]
        group = num_heads // num_kv_heads
        out = torch.zeros_like(q)
        starts = meta.query_start_loc_cpu
        for s in range(meta.num_seqs):
            q_start, q_end = starts[s], starts[s + 1]
            if q_end == q_start:
                continue
            context_len = meta.seq_lens_cpu[s]
            keys, values = gather_context(kv_cache, meta.block_tables[s], context_len)
            query_pos = meta.positions[q_start:q_end].to(q.device)
            key_pos = torch.arange(context_len, device=q.device)
            allowed = key_pos[None, :] <= query_pos[:, None]
            if sliding_window is not None:
                allowed &= key_pos[None, :] > query_pos[:, None] - sliding_window
            # [kv_heads, group, q_len, dim] x [kv_heads, 1, dim, ctx] -> [kv_heads, group, q_len, ctx]
            qs = q[q_start:q_end].float().view(-1, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
            ks = keys.float().permute(1, 2, 0).unsqueeze(1)
            vs = values.float().permute(1, 0, 2).unsqueeze(1)
            scores = torch.matmul(qs, ks) * scale
            scores = scores.masked_fill(~allowed, float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            attended = torch.matmul(probs, vs)  # [kv_heads, group, q_len, dim]
            out[q_start:q_end] = attended.permute(2, 0, 1, 3).reshape(-1, num_heads, head_dim).to(q.dtype)
        return out
