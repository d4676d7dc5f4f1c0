"""Paged attention over the NHD KV cache ``[2, num_blocks, block_size, kv_heads, head_dim]``: one Triton kernel for
prefill, chunked prefill over a cached prefix, decode and any mix of them, plus a split-KV reduction.

Layout of the work. Query tokens of all sequences are flattened (``query_start_loc``). A program owns one
*query block* (``BLOCK_Q`` consecutive query tokens of one sequence) and one KV head, and packs the ``GROUP``
query heads that share that KV head into the rows of its tile: row ``r`` is token ``r // GROUP_P2`` and head
``r % GROUP_P2`` of the group. So every K/V tile read from the cache serves the whole head group (GQA), and the
tile is ``BLOCK_M = BLOCK_Q * GROUP_P2`` rows high: 16 for decode (memory bound), 128 for prefill (``tl.dot`` on
bf16 tiles with float32 accumulation).

Query blocks are numbered without a host-side table: sequence ``s`` owns block numbers starting at
``query_start_loc[s] // BLOCK_Q + s``, which increase strictly with ``s``, so a program finds its sequence by a
binary search over ``query_start_loc``; at most ``num_tokens // BLOCK_Q + num_seqs`` numbers are needed, and
unused numbers exit at once. Nothing depends on host values of lengths, so a launch is CUDA-graph safe: the
grid is a function of (num_tokens, num_seqs, num_kv_heads, num_splits) only.

Split-KV (flash-decoding): with ``num_splits > 1`` the key range of each query block is cut into that many
pieces handled by separate programs, each writing a normalised partial output and its log-sum-exp (base 2);
:func:`_reduce_kernel` merges them. Used for small decode batches, where (seqs x kv heads) alone cannot fill
the GPU.

A query at absolute position ``p`` (``seq_len - query_len + i`` for the ``i``-th query token of its sequence)
sees keys ``[max(0, p - window + 1), p]``.
"""

from __future__ import annotations

import math

import torch

from hetserve.kernels import (
    Impl,
    dual_kernel,
    next_power_of_2,
    tl,
    use_triton,
)

_LOG2E = 1.4426950408889634


def _paged_attention_kernel(
    q_ptr,
    kv_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    qsl_ptr,
    seq_lens_ptr,
    block_tables_ptr,
    scale_log2,
    num_seqs,
    window,
    num_splits,
    qb_base,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kv_side,
    stride_kv_block,
    stride_kv_tok,
    stride_kv_head,
    stride_bt,
    GROUP: tl.constexpr,
    GROUP_P2: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,
    SPLIT_KV: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    IEEE: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_P2
    # longest query blocks (the last ones of each sequence) are numbered highest; run them first
    qb = qb_base + tl.num_programs(0) - 1 - tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    # loop-carried values must be tensors from the start (num_seqs may arrive specialised as a constant)
    lo = kvh * 0
    hi = lo + num_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        first = tl.load(qsl_ptr + mid) // BLOCK_Q + mid
        if first <= qb:
            lo = mid
        else:
            hi = mid
    seq = lo
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    local = qb - (q_start // BLOCK_Q + seq)
    seq_len = tl.load(seq_lens_ptr + seq)
    tok0 = local * BLOCK_Q  # first query token of this block, within its sequence

    rows = tl.arange(0, BLOCK_M)
    row_tok = tok0 + rows // GROUP_P2
    row_g = rows % GROUP_P2
    row_valid = (row_tok < q_len) & (row_g < GROUP)
    row_pos = seq_len - q_len + row_tok  # absolute position of each row's query token
    head = kvh * GROUP + row_g
    d = tl.arange(0, HEAD_DIM_P2)
    d_mask = d < HEAD_DIM

    q_rows = (q_start + row_tok).to(tl.int64) * stride_qt + head.to(tl.int64) * stride_qh
    q = tl.load(q_ptr + q_rows[:, None] + d[None, :], mask=row_valid[:, None] & d_mask[None, :], other=0.0)

    # key range [kv_lo, kv_hi) that any valid row of this block may see; empty for unused block numbers
    n_valid_tok = tl.minimum(q_len - tok0, BLOCK_Q)
    pos_first = seq_len - q_len + tok0
    pos_last = pos_first + n_valid_tok - 1
    kv_hi = tl.where(n_valid_tok > 0, pos_last + 1, 0)
    kv_lo = 0
    if USE_WINDOW:
        kv_lo = tl.maximum(pos_first - window + 1, 0)
    kv_lo = tl.minimum(kv_lo, kv_hi)
    span = kv_hi - kv_lo
    per_split = tl.cdiv(tl.cdiv(span, num_splits), BLOCK_N) * BLOCK_N
    s_lo = tl.minimum(kv_lo + split * per_split, kv_hi)
    s_hi = tl.minimum(s_lo + per_split, kv_hi)
    # keys below pos_first + 1 are visible to every row (causal); without a window no mask is needed there
    full_hi = s_lo
    if not USE_WINDOW:
        full_hi = tl.maximum(tl.minimum(s_hi, pos_first + 1), s_lo)
    num_full = (full_hi - s_lo) // BLOCK_N

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P2], dtype=tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    kv_head_off = kvh.to(tl.int64) * stride_kv_head
    offs_n = tl.arange(0, BLOCK_N)

    for i in range(num_full):
        keys = s_lo + i * BLOCK_N + offs_n
        page = tl.load(bt_row + keys // PAGE).to(tl.int64)
        kv_off = page * stride_kv_block + (keys % PAGE).to(tl.int64) * stride_kv_tok + kv_head_off
        k = tl.load(kv_ptr + kv_off[:, None] + d[None, :], mask=d_mask[None, :], other=0.0)
        v = tl.load(kv_ptr + stride_kv_side + kv_off[:, None] + d[None, :], mask=d_mask[None, :], other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale_log2
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    for start in range(s_lo + num_full * BLOCK_N, s_hi, BLOCK_N):
        keys = start + offs_n
        key_valid = keys < s_hi
        page = tl.load(bt_row + keys // PAGE, mask=key_valid, other=0).to(tl.int64)
        kv_off = page * stride_kv_block + (keys % PAGE).to(tl.int64) * stride_kv_tok + kv_head_off
        kv_mask = key_valid[:, None] & d_mask[None, :]
        k = tl.load(kv_ptr + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(kv_ptr + stride_kv_side + kv_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = s * scale_log2
        visible = key_valid[None, :] & (keys[None, :] <= row_pos[:, None])
        if USE_WINDOW:
            visible = visible & (keys[None, :] > row_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    has_mass = l_i > 0.0
    result = acc / tl.where(has_mass, l_i, 1.0)[:, None]
    tok = (q_start + row_tok).to(tl.int64)
    if not SPLIT_KV:
        o_rows = tok * stride_ot + head.to(tl.int64) * stride_oh
        tl.store(out_ptr + o_rows[:, None] + d[None, :], result.to(out_ptr.dtype.element_ty),
                 mask=row_valid[:, None] & d_mask[None, :])
    else:
        # partials: out [num_tokens, num_heads, num_splits, HEAD_DIM_P2], lse [num_tokens, num_heads, num_splits]
        num_heads = tl.num_programs(1) * GROUP
        lse_idx = (tok * num_heads + head) * num_splits + split
        lse = tl.where(has_mass, m_i + tl.log2(tl.where(has_mass, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + lse_idx, lse, mask=row_valid)
        tl.store(part_out_ptr + lse_idx[:, None] * HEAD_DIM_P2 + d[None, :], result,
                 mask=row_valid[:, None] & d_mask[None, :])


def _reduce_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    tok_base,
    num_heads,
    num_splits,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    SPLITS_P2: tl.constexpr,
):
    tok = tok_base + tl.program_id(0).to(tl.int64)
    head = tl.program_id(1).to(tl.int64)
    sp = tl.arange(0, SPLITS_P2)
    sp_mask = sp < num_splits
    base = (tok * num_heads + head) * num_splits
    lse = tl.load(part_lse_ptr + base + sp, mask=sp_mask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.where(sp_mask & (lse > float("-inf")), tl.exp2(lse - m_safe), 0.0)
    total = tl.sum(w, axis=0)
    d = tl.arange(0, HEAD_DIM_P2)
    d_mask = d < HEAD_DIM
    parts = tl.load(part_out_ptr + (base + sp)[:, None] * HEAD_DIM_P2 + d[None, :],
                    mask=(w > 0.0)[:, None] & d_mask[None, :], other=0.0)
    out = tl.sum(parts * w[:, None], axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + tok * stride_ot + head * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_mask)


def _write_kv_kernel(
    k_ptr,
    v_ptr,
    kv_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kv_side,
    stride_kv_block,
    stride_kv_tok,
    stride_kv_head,
    NUM_KV_HEADS: tl.constexpr,
    KV_HEADS_P2: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_P2: tl.constexpr,
    PAGE: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    h = tl.arange(0, KV_HEADS_P2)
    d = tl.arange(0, HEAD_DIM_P2)
    mask = (h < NUM_KV_HEADS)[:, None] & (d < HEAD_DIM)[None, :] & (slot >= 0)
    slot = tl.maximum(slot, 0)
    k = tl.load(k_ptr + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask, other=0.0)
    v = tl.load(v_ptr + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask, other=0.0)
    c_off = (slot // PAGE) * stride_kv_block + (slot % PAGE) * stride_kv_tok + h[:, None] * stride_kv_head + d[None, :]
    out_ty = kv_ptr.dtype.element_ty
    tl.store(kv_ptr + c_off, k.to(out_ty), mask=mask)
    tl.store(kv_ptr + stride_kv_side + c_off, v.to(out_ty), mask=mask)


_paged_attention = dual_kernel(
    _paged_attention_kernel,
    do_not_specialize=("num_seqs", "window", "num_splits", "qb_base", "stride_bt"),
    do_not_specialize_on_alignment=("qsl_ptr", "seq_lens_ptr", "block_tables_ptr"),
)
_reduce = dual_kernel(_reduce_kernel, do_not_specialize=("tok_base", "num_splits"))
_write_kv = dual_kernel(_write_kv_kernel, do_not_specialize_on_alignment=("slot_ptr",))


# ---- KV write -------------------------------------------------------------------------------------------
def write_kv_cache(
    k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor, impl: Impl = "auto"
) -> None:
    """Write rows of k/v ``[T, kv_heads, head_dim]`` at ``slot_mapping[:T]``; negative slots are skipped.

    Never reads a slot value on the host, so it is CUDA-graph safe.
    """
    num_tokens = k.shape[0]
    if num_tokens == 0:
        return
    if not use_triton(k, impl):
        num_kv_heads, head_dim = kv_cache.shape[-2], kv_cache.shape[-1]
        slots = slot_mapping[:num_tokens].long()
        keep = slots >= 0
        key_slots = kv_cache[0].view(-1, num_kv_heads, head_dim)
        value_slots = kv_cache[1].view(-1, num_kv_heads, head_dim)
        if bool(keep.all()):
            key_slots.index_copy_(0, slots, k.to(kv_cache.dtype))
            value_slots.index_copy_(0, slots, v.to(kv_cache.dtype))
        else:
            key_slots.index_copy_(0, slots[keep], k[keep].to(kv_cache.dtype))
            value_slots.index_copy_(0, slots[keep], v[keep].to(kv_cache.dtype))
        return
    _write_kv.on(k.device)[(num_tokens,)](
        k, v, kv_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        NUM_KV_HEADS=k.shape[1], KV_HEADS_P2=next_power_of_2(k.shape[1]),
        HEAD_DIM=k.shape[2], HEAD_DIM_P2=next_power_of_2(k.shape[2]), PAGE=kv_cache.shape[2],
        num_warps=4,
    )


# ---- attention ------------------------------------------------------------------------------------------
MAX_DECODE_SPLITS = 16


def decode_num_splits(num_seqs: int, num_kv_heads: int, num_sms: int, max_splits: int = MAX_DECODE_SPLITS) -> int:
    """Key-range splits for a decode batch: enough programs to give every SM about two (flash-decoding).

    A function of the batch shape only, so a CUDA graph captured for a batch size keeps its launch shape.
    """
    programs = max(1, num_seqs * num_kv_heads)
    return max(1, min(max_splits, math.ceil(2 * num_sms / programs)))


def _launch_config(group_p2: int, head_dim_p2: int, decode: bool, dtype: torch.dtype,
                   split_kv: bool = True) -> dict[str, int]:
    """Tile shapes: decode tiles are 16 rows high (memory bound, GQA group packed into rows); prefill tiles
    are 128 rows (compute bound, tensor-core sized). A decode batch large enough to run unsplit (one program
    per sequence and KV head, scanning its whole context) streams 32-key tiles four deep: 12-14% faster at 64
    sequences of 1k-4k keys on an H100, equal at 256-384 (``results/gpu-kernels-tune-s5.json``); split
    programs scan short ranges and keep 64-key tiles."""
    elt = 4 if dtype == torch.float32 else 2
    if decode:
        block_q = max(1, 16 // group_p2)
        if not split_kv and elt == 2 and head_dim_p2 <= 128:
            return {"BLOCK_Q": block_q, "BLOCK_N": 32, "num_warps": 4, "num_stages": 4}
        return {"BLOCK_Q": block_q, "BLOCK_N": 64 if head_dim_p2 <= 128 else 32, "num_warps": 4,
                "num_stages": 3 if elt == 2 else 2}
    block_m = 128 if head_dim_p2 <= 128 else 64
    block_q = max(1, block_m // group_p2)
    return {"BLOCK_Q": block_q, "BLOCK_N": 64, "num_warps": 8 if block_q * group_p2 >= 128 else 4,
            "num_stages": 2}


def decode_prefix_len(query_start_loc_host: list[int]) -> int:
    """How many leading sequences have exactly one query token."""
    k = 0
    n = len(query_start_loc_host) - 1
    while k < n and query_start_loc_host[k + 1] - query_start_loc_host[k] == 1:
        k += 1
    return k


def paged_attention_torch(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fallback: one sequence at a time in float32 (reads lengths on the host, so not graph safe)."""
    if out is None:
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, page = kv_cache.shape[3], kv_cache.shape[2]
    group = num_heads // num_kv_heads
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for s, seq_len in enumerate(lens):
        a, b = starts[s], starts[s + 1]
        if b == a:
            continue
        pages = block_tables[s, : (seq_len + page - 1) // page].long()
        keys = kv_cache[0, pages].flatten(0, 1)[:seq_len].float()
        values = kv_cache[1, pages].flatten(0, 1)[:seq_len].float()
        q_pos = torch.arange(seq_len - (b - a), seq_len, device=q.device)
        k_pos = torch.arange(seq_len, device=q.device)
        allowed = k_pos[None, :] <= q_pos[:, None]
        if sliding_window is not None:
            allowed &= k_pos[None, :] > q_pos[:, None] - sliding_window
        qs = q[a:b].float().reshape(b - a, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
        scores = torch.matmul(qs, keys.permute(1, 2, 0).unsqueeze(1)) * scale
        probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
        att = torch.matmul(probs, values.permute(1, 0, 2).unsqueeze(1))
        out[a:b] = att.permute(2, 0, 1, 3).reshape(b - a, num_heads, head_dim).to(out.dtype)
    return out


__all__ = ["MAX_DECODE_SPLITS", "decode_num_splits", "decode_prefix_len", "paged_attention_torch", "write_kv_cache"]
