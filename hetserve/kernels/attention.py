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
from typing import Any

import torch

from hetserve.kernels import Impl, device_num_sms, dual_kernel, launch_hooked, next_power_of_2, tl, use_triton

try:  # the launch path of compiled kernels (PagedAttentionPlan); absent without Triton
    from triton.runtime import driver as _driver
except ImportError:  # pragma: no cover
    _driver = None

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


# per-layer tensors of a launch, filled in when a plan runs (the rest of its arguments is fixed for the step)
_Q, _KV, _OUT = "<q>", "<kv_cache>", "<out>"


def _launch_specs(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    tokens: tuple[int, int],
    scale: float,
    sliding_window: int | None,
    decode: bool,
    num_splits: int | None,
    launch_config: dict[str, int] | None,
) -> list[tuple[Any, tuple[int, ...], tuple[Any, ...], dict[str, Any]]]:
    """The launches (kernel, grid, arguments, keywords) over the sequences of the given metadata slices, whose
    query tokens lie in ``[tokens[0], tokens[1])`` (absolute rows of q; ``tokens[1]`` may include trailing
    padding rows). q, the cache and the output appear as the placeholders ``_Q``, ``_KV``, ``_OUT``; split-KV
    scratch is allocated here, once for every layer that runs these launches (in stream order)."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_seqs = seq_lens.shape[0]
    num_kv_heads = kv_cache.shape[3]
    token_lo, token_hi = tokens
    if num_seqs == 0 or token_hi <= token_lo:
        return []
    group = num_heads // num_kv_heads
    group_p2 = next_power_of_2(group)
    head_dim_p2 = max(16, next_power_of_2(head_dim))  # tl.dot needs K >= 16
    if num_splits is None:
        num_splits = decode_num_splits(num_seqs, num_kv_heads, device_num_sms(q.device)) if decode else 1
    cfg = _launch_config(group_p2, head_dim_p2, decode, q.dtype, split_kv=num_splits > 1)
    if launch_config:
        cfg.update(launch_config)
    block_q = cfg.pop("BLOCK_Q")
    # block numbers of these sequences span [token_lo // block_q, token_hi // block_q + num_seqs)
    qb_base = token_lo // block_q
    grid = (token_hi // block_q - qb_base + num_seqs, num_kv_heads, num_splits)
    part_out: Any = _OUT
    part_lse: Any = _OUT
    if num_splits > 1:
        part_out = torch.empty((token_hi, num_heads, num_splits, head_dim_p2), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((token_hi, num_heads, num_splits), dtype=torch.float32, device=q.device)
    specs: list[tuple[Any, tuple[int, ...], tuple[Any, ...], dict[str, Any]]] = [(
        _paged_attention, grid,
        (_Q, _KV, _OUT, part_out, part_lse, query_start_loc, seq_lens, block_tables,
         scale * _LOG2E, num_seqs, sliding_window or 0, num_splits, qb_base,
         q.stride(0), q.stride(1), _OUT_STRIDE0, _OUT_STRIDE1,
         kv_cache.stride(0), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3), block_tables.stride(0)),
        dict(GROUP=group, GROUP_P2=group_p2, HEAD_DIM=head_dim, HEAD_DIM_P2=head_dim_p2, BLOCK_Q=block_q,
             PAGE=kv_cache.shape[2], SPLIT_KV=num_splits > 1, USE_WINDOW=sliding_window is not None,
             IEEE=q.dtype == torch.float32, **cfg),
    )]
    if num_splits > 1:
        specs.append((
            _reduce, (token_hi - token_lo, num_heads),
            (part_out, part_lse, _OUT, token_lo, num_heads, num_splits, _OUT_STRIDE0, _OUT_STRIDE1),
            dict(HEAD_DIM=head_dim, HEAD_DIM_P2=head_dim_p2,
                 SPLITS_P2=max(MAX_DECODE_SPLITS, next_power_of_2(num_splits)), num_warps=4),
        ))
    return specs


_OUT_STRIDE0, _OUT_STRIDE1 = "<out.stride(0)>", "<out.stride(1)>"


def _fill(args: tuple[Any, ...], q: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor) -> list[Any]:
    subs = {_Q: q, _KV: kv_cache, _OUT: out, _OUT_STRIDE0: out.stride(0), _OUT_STRIDE1: out.stride(1)}
    return [subs[a] if isinstance(a, str) else a for a in args]


# Triton's ordinary launch binds and specialises every argument on each call; False makes every plan take it
# (a benchmark flips this to time both in one process)
PLAN_FAST_LAUNCH = True


class PagedAttentionPlan:
    """One step's paged attention, bound once and then run for each layer with that layer's q, KV cache and
    output (same shapes and strides; the slices of the step's metadata, the grids and the split-KV scratch are
    the step's, computed here once).

    Triton's ordinary launch (``kernel[grid](...)``) binds and specialises all ~30 arguments in Python on every
    call, and a mixed step launches two or three attention kernels a layer: on a GPU that host work, not the
    device, paced piecewise mixed steps. The first run of a plan takes the ordinary path, which returns the
    compiled kernels; a later run whose per-layer tensors agree with that run in everything Triton
    specialises on (dtypes, 16-byte alignment, the output's strides; the layout is fixed by the plan) calls
    their launchers directly. On the CPU (the Triton interpreter) and on the torch fallback every run takes the
    ordinary path.
    """

    def __init__(
        self,
        q: torch.Tensor,
        kv_cache: torch.Tensor,
        query_start_loc: torch.Tensor,
        seq_lens: torch.Tensor,
        block_tables: torch.Tensor,
        scale: float,
        sliding_window: int | None = None,
        *,
        decode: bool = False,
        num_splits: int | None = None,
        impl: Impl = "auto",
        launch_config: dict[str, int] | None = None,
        decode_prefix: tuple[int, int] | None = None,
    ) -> None:
        self.layout = _layout(q, kv_cache)
        self.triton = use_triton(q, impl)
        if self.triton and q.stride(-1) != 1:
            raise ValueError("paged attention needs q's last dimension contiguous")
        self.torch_args = (query_start_loc, seq_lens, block_tables, scale, sliding_window)
        self.specs: list[tuple[Any, tuple[int, ...], tuple[Any, ...], dict[str, Any]]] = []
        num_tokens, num_seqs = q.shape[0], seq_lens.shape[0]
        if self.triton and num_tokens and num_seqs:
            k = 0 if decode or decode_prefix is None else decode_prefix[0]
            if 0 < k < num_seqs:
                assert decode_prefix is not None and decode_prefix[1] == k
                self.specs = _launch_specs(q, kv_cache, query_start_loc[: k + 1], seq_lens[:k], block_tables[:k],
                                           (0, k), scale, sliding_window, True, None, None)
                self.specs += _launch_specs(q, kv_cache, query_start_loc[k:], seq_lens[k:], block_tables[k:],
                                            (k, num_tokens), scale, sliding_window, False, 1, launch_config)
            else:
                self.specs = _launch_specs(q, kv_cache, query_start_loc, seq_lens, block_tables, (0, num_tokens),
                                           scale, sliding_window, decode or k == num_seqs, num_splits,
                                           launch_config)
        # per launch once compiled: (launcher, function, packed metadata, grid, the full argument list in the
        # kernel's parameter order, the positions of the per-layer values in it)
        self._fast: list[tuple[Any, ...]] | None = None
        self._fast_key: tuple[Any, ...] | None = None
        self.direct_runs = 0  # runs that called the compiled launchers directly

    def run(self, q: torch.Tensor, kv_cache: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if out is None:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if _layout(q, kv_cache) != self.layout:
            raise ValueError(f"a paged-attention plan for q / KV cache {self.layout} run with "
                             f"{_layout(q, kv_cache)}")
        if not self.triton:
            return paged_attention_torch(q, kv_cache, *self.torch_args, out=out)
        if not self.specs:
            return out
        key = (q.data_ptr() % 16, kv_cache.data_ptr() % 16, out.data_ptr() % 16, out.dtype, out.stride())
        if self._fast is not None and key == self._fast_key and PLAN_FAST_LAUNCH and not launch_hooked():
            self.direct_runs += 1
            stream = _driver.active.get_current_stream(q.device.index)
            values = (q, kv_cache, out, out.stride(0), out.stride(1))
            for launcher, function, packed, grid, full, slots in self._fast:
                for i, j in slots:
                    full[i] = values[j]
                launcher(grid[0], grid[1], grid[2], stream, function, packed, None, None, None, *full)
            return out
        fast: list[tuple[Any, ...]] | None = []
        for kernel, grid, args, kwargs in self.specs:
            jit = kernel.on(q.device)
            filled = _fill(args, q, kv_cache, out)
            compiled = jit[grid](*filled, **kwargs)
            if fast is not None:
                fast = _fast_entry(jit, compiled, grid, args, filled, kwargs, fast)
        self._fast, self._fast_key = fast, key
        return out


_PLACEHOLDERS = (_Q, _KV, _OUT, _OUT_STRIDE0, _OUT_STRIDE1)


def _layout(q: torch.Tensor, kv_cache: torch.Tensor) -> tuple[Any, ...]:
    return (tuple(q.shape), q.stride(), q.dtype, tuple(kv_cache.shape), kv_cache.stride(), kv_cache.dtype)


def _fast_entry(jit: Any, compiled: Any, grid: tuple[int, ...], args: tuple[Any, ...], filled: list[Any],
                kwargs: dict[str, Any], fast: list[tuple[Any, ...]]) -> list[tuple[Any, ...]] | None:
    """Append a launch's direct-call entry, or None where this launch cannot be called directly (the
    interpreter returns no compiled kernel; a parameter the call left to its default)."""
    names = getattr(jit, "arg_names", None)
    if compiled is None or names is None or not hasattr(compiled, "packed_metadata"):
        return None
    values = dict(zip(names, filled))
    for name in names[len(filled):]:
        if name not in kwargs:
            return None
        values[name] = kwargs[name]
    full = [values[n] for n in names]
    slots = [(i, _PLACEHOLDERS.index(a)) for i, a in enumerate(args) if isinstance(a, str)]
    grid3 = tuple(grid) + (1,) * (3 - len(grid))
    fast.append((compiled.run, compiled.function, compiled.packed_metadata, grid3, full, slots))
    return fast


def decode_prefix_len(query_start_loc_host: list[int]) -> int:
    """How many leading sequences have exactly one query token."""
    k = 0
    n = len(query_start_loc_host) - 1
    while k < n and query_start_loc_host[k + 1] - query_start_loc_host[k] == 1:
        k += 1
    return k


def paged_attention(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    *,
    decode: bool = False,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    impl: Impl = "auto",
    launch_config: dict[str, int] | None = None,
    decode_prefix: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Causal attention of q ``[T, H, D]`` over each sequence's context, read through ``block_tables``.

    ``query_start_loc`` int32 ``[S + 1]``, ``seq_lens`` int32 ``[S]`` (context after this step, new tokens
    included, already written to the cache), ``block_tables`` int32 ``[S, max_blocks]``. ``decode`` (every
    sequence has one query token) picks decode tiles and, unless ``num_splits`` is given, split-KV.
    ``decode_prefix = (k, t)`` says the first ``k`` sequences are one-token decodes owning rows ``[0, t)``
    (``t == k``) and the rest is prefill: two launches then, decode tiles for the first part. Rows of q past
    ``query_start_loc[-1]`` are left unspecified in the output. ``launch_config`` overrides the tile shapes
    (``BLOCK_Q``, ``BLOCK_N``, ``num_warps``, ``num_stages``; for tuning).
    """
    if use_triton(q, impl) and q.stride(-1) != 1:
        q = q.contiguous()
    return PagedAttentionPlan(q, kv_cache, query_start_loc, seq_lens, block_tables, scale, sliding_window,
                              decode=decode, num_splits=num_splits, impl=impl, launch_config=launch_config,
                              decode_prefix=decode_prefix).run(q, kv_cache, out)


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


__all__ = ["PagedAttentionPlan", "decode_num_splits", "decode_prefix_len", "paged_attention", "paged_attention_torch", "write_kv_cache"]
