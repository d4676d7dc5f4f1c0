"""SiLU-and-mul on a fused gate/up projection: ``[..., 2 * d]`` (gate first) -> ``[..., d]``.

Rounds like ``F.silu(gate) * up`` in the activation dtype: silu is rounded before the product.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hetserve.kernels import Impl, dual_kernel, tl, use_triton


def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, d, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0)
    g32 = gate.to(tl.float32)
    silu = (g32 / (1.0 + tl.exp(-g32))).to(gate.dtype)
    y = silu.to(tl.float32) * up.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


_silu_and_mul = dual_kernel(_silu_and_mul_kernel)


def silu_and_mul_torch(x: torch.Tensor) -> torch.Tensor:
    d = x.shape[-1] // 2
    return F.silu(x[..., :d]) * x[..., d:]


def silu_and_mul(x: torch.Tensor, impl: Impl = "auto") -> torch.Tensor:
    if not use_triton(x, impl):
        return silu_and_mul_torch(x)
    d = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((*x.shape[:-1], d), dtype=x.dtype, device=x.device)
    out2 = out.view(-1, d)
    if x2.shape[0] == 0:
        return out
    block = min(1024, max(16, 1 << (d - 1).bit_length()))
    grid = (x2.shape[0], (d + block - 1) // block)
    _silu_and_mul.launch(x.device, grid, x2, out2, x2.stride(0), out2.stride(0), d, BLOCK=block, num_warps=4)
    return out


__all__ = ["silu_and_mul", "silu_and_mul_torch"]
