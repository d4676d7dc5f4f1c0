"""Neox-style rotary embedding applied in place on q and k, from a cos/sin cache; optionally fused with the write
of the rotated k (and v) into the paged KV cache, which saves a launch per layer in decode.

The cache is float32 ``[max_positions, head_dim]``: the first half holds ``cos(pos * inv_freq) * scaling``, the
second half the sines (both halves of a head share the frequencies). The rotation is done in float32 and rounded
once; Hugging Face rounds cos/sin to the activation dtype first, so bf16 results differ from HF's in the last bit
now and then, while float32 results agree to rounding.
"""

from __future__ import annotations

import torch

from hetserve.kernels import Impl, dual_kernel, next_power_of_2, tl, use_triton


def build_cos_sin_cache(
    inv_freq: torch.Tensor, attention_scaling: float, max_positions: int, device: torch.device | str
) -> torch.Tensor:
    """float32 ``[max_positions, head_dim]``, computed exactly as ``RotaryEmbedding.cos_sin`` does per position."""
    inv = inv_freq.to(device=device, dtype=torch.float32)
    positions = torch.arange(max_positions, device=device, dtype=torch.int64)
    freqs = positions[:, None].float() * inv[None, :]
    return torch.cat((freqs.cos() * attention_scaling, freqs.sin() * attention_scaling), dim=-1).contiguous()


def _rotary_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    cache_ptr,
    kv_ptr,
    slot_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kv_side,
    stride_kv_block,
    stride_kv_tok,
    stride_kv_head,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    Q_HEADS_P2: tl.constexpr,
    KV_HEADS_P2: tl.constexpr,
    HALF: tl.constexpr,
    HALF_P2: tl.constexpr,
    PAGE: tl.constexpr,
    STORE_KV: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    d = tl.arange(0, HALF_P2)
    d_mask = d < HALF
    cos = tl.load(cache_ptr + pos * (2 * HALF) + d, mask=d_mask, other=0.0)[None, :]
    sin = tl.load(cache_ptr + pos * (2 * HALF) + HALF + d, mask=d_mask, other=0.0)[None, :]

    hq = tl.arange(0, Q_HEADS_P2)
    q_mask = (hq < NUM_Q_HEADS)[:, None] & d_mask[None, :]
    q_off = t * stride_qt + hq[:, None] * stride_qh + d[None, :]
    q1 = tl.load(q_ptr + q_off, mask=q_mask, other=0.0)
    q2 = tl.load(q_ptr + q_off + HALF, mask=q_mask, other=0.0)
    a = q1.to(tl.float32)
    b = q2.to(tl.float32)
    tl.store(q_ptr + q_off, (a * cos - b * sin).to(q1.dtype), mask=q_mask)
    tl.store(q_ptr + q_off + HALF, (b * cos + a * sin).to(q1.dtype), mask=q_mask)

    hk = tl.arange(0, KV_HEADS_P2)
    k_mask = (hk < NUM_KV_HEADS)[:, None] & d_mask[None, :]
    k_off = t * stride_kt + hk[:, None] * stride_kh + d[None, :]
    k1 = tl.load(k_ptr + k_off, mask=k_mask, other=0.0)
    k2 = tl.load(k_ptr + k_off + HALF, mask=k_mask, other=0.0)
    a = k1.to(tl.float32)
    b = k2.to(tl.float32)
    r1 = (a * cos - b * sin).to(k1.dtype)
    r2 = (b * cos + a * sin).to(k1.dtype)
    tl.store(k_ptr + k_off, r1, mask=k_mask)
    tl.store(k_ptr + k_off + HALF, r2, mask=k_mask)

    if STORE_KV:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        # a negative slot is a padding token: nothing is written
        s_mask = k_mask & (slot >= 0)
        slot = tl.maximum(slot, 0)
        c_off = (slot // PAGE) * stride_kv_block + (slot % PAGE) * stride_kv_tok + hk[:, None] * stride_kv_head
        c_off = c_off + d[None, :]
        out_ty = kv_ptr.dtype.element_ty
        tl.store(kv_ptr + c_off, r1.to(out_ty), mask=s_mask)
        tl.store(kv_ptr + c_off + HALF, r2.to(out_ty), mask=s_mask)
        v_off = t * stride_vt + hk[:, None] * stride_vh + d[None, :]
        v1 = tl.load(v_ptr + v_off, mask=s_mask, other=0.0)
        v2 = tl.load(v_ptr + v_off + HALF, mask=s_mask, other=0.0)
        tl.store(kv_ptr + stride_kv_side + c_off, v1.to(out_ty), mask=s_mask)
        tl.store(kv_ptr + stride_kv_side + c_off + HALF, v2.to(out_ty), mask=s_mask)


_rotary = dual_kernel(_rotary_kernel, do_not_specialize_on_alignment=("pos_ptr", "slot_ptr"))


def rotary_torch(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference (out of place): float32 rotation from the cache, rounded once."""
    half = cos_sin_cache.shape[-1] // 2
    cs = cos_sin_cache.index_select(0, positions.long())
    cos, sin = cs[:, None, :half], cs[:, None, half:]

    def rot(x: torch.Tensor) -> torch.Tensor:
        a, b = x[..., :half].float(), x[..., half:].float()
        return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1).to(x.dtype)

    return rot(q), rot(k)


def _check(q: torch.Tensor, k: torch.Tensor, cos_sin_cache: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("q and k must be [num_tokens, heads, head_dim] with a contiguous last dimension")
    if cos_sin_cache.shape[-1] != q.shape[-1] or cos_sin_cache.dtype != torch.float32:
        raise ValueError("cos_sin_cache must be float32 [max_positions, head_dim]")


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor | None,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    kv_cache: torch.Tensor | None,
    slot_mapping: torch.Tensor | None,
) -> None:
    num_tokens = q.shape[0]
    if num_tokens == 0:
        return
    head_dim = q.shape[-1]
    half = head_dim // 2
    store = kv_cache is not None
    if store:
        assert v is not None and kv_cache is not None and slot_mapping is not None
        kv, vv, slots = kv_cache, v, slot_mapping
        page = kv_cache.shape[2]
        side, blk, tok, head = (kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3))
    else:
        kv, vv, slots = k, k, positions
        page, side, blk, tok, head = 1, 0, 0, 0, 0
    _rotary.launch(
        q.device, (num_tokens,),
        q, k, vv, positions, cos_sin_cache, kv, slots,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), vv.stride(0), vv.stride(1),
        side, blk, tok, head,
        NUM_Q_HEADS=q.shape[1], NUM_KV_HEADS=k.shape[1],
        Q_HEADS_P2=next_power_of_2(q.shape[1]), KV_HEADS_P2=next_power_of_2(k.shape[1]),
        HALF=half, HALF_P2=next_power_of_2(half), PAGE=page, STORE_KV=store,
        num_warps=4 if q.shape[1] * head_dim <= 4096 else 8,
    )


def apply_rotary_(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, impl: Impl = "auto"
) -> None:
    """Rotate q ``[T, H, D]`` and k ``[T, KVH, D]`` in place (rows may be strided views of a fused qkv)."""
    _check(q, k, cos_sin_cache)
    if not use_triton(q, impl):
        rq, rk = rotary_torch(q, k, positions, cos_sin_cache)
        q.copy_(rq)
        k.copy_(rk)
        return
    _launch(q, k, None, positions, cos_sin_cache, None, None)


def rotary_and_store_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    impl: Impl = "auto",
) -> None:
    """:func:`apply_rotary_`, then write the rotated k and v at ``slot_mapping`` of the NHD cache
    ``[2, num_blocks, block_size, kv_heads, head_dim]`` (negative slots are padding and skipped)."""
    _check(q, k, cos_sin_cache)
    if not use_triton(q, impl):
        apply_rotary_(q, k, positions, cos_sin_cache, impl="torch")
        from hetserve.kernels.attention import write_kv_cache

        write_kv_cache(k, v, kv_cache, slot_mapping, impl="torch")
        return
    _launch(q, k, v, positions, cos_sin_cache, kv_cache, slot_mapping)


__all__ = ["apply_rotary_", "build_cos_sin_cache", "rotary_and_store_kv", "rotary_torch"]
