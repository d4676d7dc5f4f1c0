"""Launching the paged-attention kernels of :mod:`hetserve.kernels.attention`: :class:`PagedAttentionPlan`, a
step's launches bound once and run by every layer, and :func:`paged_attention`, a one-off call through one.

Triton's ordinary launch (``kernel[grid](...)``) binds and specialises all ~30 arguments in Python on every call,
and a mixed step launches two or three attention kernels a layer. A plan computes the step's metadata slices,
grids and split-KV scratch once; its first run takes the ordinary path, which returns the compiled kernels, and
later runs whose per-layer tensors agree with it in everything Triton specialises on call their launchers
directly (``kernels.DIRECT_LAUNCH``, as :meth:`DualKernel.launch` does for the other kernels).
"""

from __future__ import annotations

from typing import Any

import torch

from hetserve import kernels
from hetserve.kernels import Impl, device_num_sms, direct_entry, launch_hooked, next_power_of_2, use_triton
from hetserve.kernels.attention import (
    _LOG2E,
    MAX_DECODE_SPLITS,
    _launch_config,
    _paged_attention,
    _reduce,
    decode_num_splits,
    paged_attention_torch,
)

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
        if self._fast is not None and key == self._fast_key and kernels.DIRECT_LAUNCH and not launch_hooked():
            self.direct_runs += 1
            stream = kernels._driver.active.get_current_stream(q.device.index)
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
            entry = direct_entry(jit, compiled, len(filled), kwargs) if fast is not None else None
            if entry is None:
                fast = None
            elif fast is not None:
                launcher, function, packed, tail = entry
                slots = [(i, _PLACEHOLDERS.index(a)) for i, a in enumerate(args) if isinstance(a, str)]
                fast.append((launcher, function, packed, tuple(grid) + (1,) * (3 - len(grid)), filled + tail, slots))
        self._fast, self._fast_key = fast, key
        return out


_PLACEHOLDERS = (_Q, _KV, _OUT, _OUT_STRIDE0, _OUT_STRIDE1)


def _layout(q: torch.Tensor, kv_cache: torch.Tensor) -> tuple[Any, ...]:
    return (tuple(q.shape), q.stride(), q.dtype, tuple(kv_cache.shape), kv_cache.stride(), kv_cache.dtype)


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


__all__ = ["PagedAttentionPlan", "paged_attention"]
