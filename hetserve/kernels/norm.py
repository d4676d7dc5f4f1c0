"""RMSNorm, optionally fused with the residual add that precedes it in a decoder layer.

Numerics follow Hugging Face's ``LlamaRMSNorm`` step for step: the sum ``x + residual`` is rounded to the
activation dtype first (HF adds in that dtype), the normalisation runs in float32, the normalised value is rounded
to the activation dtype and only then multiplied by the weight. In float32 all roundings vanish.
"""

from __future__ import annotations

import torch

from hetserve.kernels import Impl, dual_kernel, next_power_of_2, tl, use_triton


def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    stride_x_outer,
    stride_x_inner,
    inner_rows,
    stride_r,
    stride_o,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x_row = (row // inner_rows) * stride_x_outer + (row % inner_rows) * stride_x_inner
    x = tl.load(x_ptr + x_row + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(r.dtype)
        tl.store(residual_ptr + row * stride_r + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    variance = tl.sum(x32 * x32, axis=0) / n_cols
    normed = (x32 * (1.0 / tl.sqrt(variance + eps))).to(x.dtype)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    y = normed.to(tl.float32) * w.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


_rms_norm = dual_kernel(_rms_norm_kernel)


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The reference: exactly ``hetserve.engine.model.layers.RMSNorm.forward``."""
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    return weight * (x32 * torch.rsqrt(variance + eps)).to(x.dtype)


def _launch(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float) -> torch.Tensor:
    n_cols = x.shape[-1]
    # rows are addressed as [outer, inner] so per-head slices of a fused qkv ([tokens, heads, dim] with a token
    # stride wider than heads * dim) need no copy
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.dim() == 1:
        x = x.unsqueeze(0)
    if x.dim() > 3 or x.stride(-1) != 1:
        x = x.reshape(-1, n_cols).contiguous()
    x3 = x if x.dim() == 3 else x.unsqueeze(1)
    out2 = out.view(-1, n_cols)
    num_rows = out2.shape[0]
    r2 = out2
    if residual is not None:
        r2 = residual.view(-1, n_cols)  # written in place: must be a real view
    if num_rows == 0:
        return out
    block = next_power_of_2(n_cols)
    num_warps = 4 if block <= 2048 else 8
    _rms_norm.launch(
        x.device, (num_rows,),
        x3, r2, weight, out2, x3.stride(0), x3.stride(1), x3.shape[1], r2.stride(0), out2.stride(0), n_cols, eps,
        HAS_RESIDUAL=residual is not None, BLOCK=block, num_warps=num_warps,
    )
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, impl: Impl = "auto") -> torch.Tensor:
    """RMSNorm over the last dimension of ``x`` (any leading shape; rows may be strided)."""
    if not use_triton(x, impl):
        return rms_norm_torch(x, weight, eps)
    return _launch(x, None, weight, eps)


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, impl: Impl = "auto"
) -> torch.Tensor:
    """``residual += x`` in place (rounded to residual's dtype), then return ``rms_norm(residual)``.

    ``residual`` must be contiguous in its rows (it is written through a view).
    """
    if not use_triton(x, impl):
        residual.copy_(residual + x)
        return rms_norm_torch(residual, weight, eps)
    if residual.shape != x.shape:
        raise ValueError(f"residual {tuple(residual.shape)} and x {tuple(x.shape)} differ")
    return _launch(x, residual, weight, eps)


__all__ = ["fused_add_rms_norm", "rms_norm", "rms_norm_torch"]
