"""``y = x @ w.T (+ b)`` for a few rows of ``x`` (decode at small batch): a weight-streaming kernel.

At batch 1-16 a linear layer only streams its weight from memory. cuBLAS picks its tile from the output
width; for a square 4096 x 4096 weight it launches ~64 CTAs on a 132-SM H100 and reads at about half of the
copy bandwidth (``benchmarks/gpu_linear.py``). This kernel splits the output into narrow column tiles, so
even a 4096-wide output fills every SM, and pipelines the weight loads. The model uses it only for the
weights where it measured faster (``select_skinny``); everything else stays on cuBLAS.

Accumulates in fp32 like cuBLAS (fp32 inputs multiply in full fp32, not tf32); results may differ from ``F.linear`` in the last bits (summation order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hetserve.kernels import Impl, dual_kernel, tl, use_triton

#: rows of ``x`` one launch handles; the kernel pads to this (tensor-core tiles need 16 rows)
SKINNY_MAX_ROWS = 16


def _skinny_gemm_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
                        HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        x_mask = m_ok[:, None] & k_ok[None, :]
        x = tl.load(x_ptr + rm[:, None] * stride_xm + kk[None, :], mask=x_mask, other=0.0)
        w = tl.load(w_ptr + rn[:, None].to(tl.int64) * stride_wn + kk[None, :], mask=n_ok[:, None] & k_ok[None, :],
                    other=0.0)
        acc += tl.dot(x, tl.trans(w), input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rm[:, None] * stride_om + rn[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


_skinny_gemm = dual_kernel(_skinny_gemm_kernel, do_not_specialize=("M",))


@dataclass(frozen=True)
class SkinnyConfig:
    """Tile shape and pipeline depth of one launch."""

    block_n: int = 32
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 4


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  config: SkinnyConfig | None = None, impl: Impl = "auto") -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x`` of at most :data:`SKINNY_MAX_ROWS` rows (after flattening the
    leading dims); more rows fall back to ``F.linear``."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if not use_triton(x, impl) or rows > SKINNY_MAX_ROWS or rows == 0:
        return F.linear(x, weight, bias)
    cfg = config or SkinnyConfig()
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"skinny_linear: input width {x.shape[-1]} does not match the weight's {k}")
    x2 = x.reshape(rows, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.stride(-1) != 1:
        raise ValueError("skinny_linear: the weight's last dim must be contiguous")
    out = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    grid = ((n + cfg.block_n - 1) // cfg.block_n,)
    _skinny_gemm.launch(
        x.device, grid,
        x2, weight, bias if bias is not None else weight, out, rows, n, k, x2.stride(0), weight.stride(0),
        out.stride(0), HAS_BIAS=bias is not None, BLOCK_M=SKINNY_MAX_ROWS, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, PRECISION="ieee" if x.dtype == torch.float32 else "tf32", num_warps=cfg.num_warps,
        num_stages=cfg.num_stages)
    return out.reshape(*x.shape[:-1], n)


__all__ = ["SKINNY_MAX_ROWS", "SkinnyConfig", "skinny_linear"]
