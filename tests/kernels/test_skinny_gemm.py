"""The skinny GEMM (decode-batch linear layers) against a float64 brute force; on CUDA also against cuBLAS."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hetserve.kernels import HAS_TRITON
from hetserve.kernels.skinny_gemm import SKINNY_MAX_ROWS, SkinnyConfig, skinny_linear

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")


def _brute(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    out = torch.zeros(x.shape[0], w.shape[0], dtype=torch.float64)
    for i in range(x.shape[0]):
        for j in range(w.shape[0]):
            out[i, j] = (x[i].double() * w[j].double()).sum() + (0.0 if b is None else float(b[j]))
    return out


@pytest.mark.parametrize(("rows", "n", "k", "bias", "cfg"), [
    (1, 40, 96, False, SkinnyConfig(block_n=16, block_k=32)),   # n, k not multiples of the tiles
    (3, 33, 70, True, SkinnyConfig(block_n=16, block_k=64)),
    (SKINNY_MAX_ROWS, 64, 128, True, SkinnyConfig(block_n=32, block_k=128)),  # every row of the padded tile
])
def test_skinny_linear_matches_brute_force(rows: int, n: int, k: int, bias: bool, cfg: SkinnyConfig) -> None:
    gen = torch.Generator().manual_seed(rows * 1000 + n)
    x = torch.randn(rows, k, generator=gen)
    w = torch.randn(n, k, generator=gen)
    b = torch.randn(n, generator=gen) if bias else None
    out = skinny_linear(x, w, b, cfg, impl="triton")
    assert out.shape == (rows, n) and out.dtype == x.dtype
    torch.testing.assert_close(out.double(), _brute(x, w, b), rtol=1e-5, atol=1e-4)


def test_leading_dims_kept_and_non_contiguous_input() -> None:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, 3, 48, generator=gen)[:, :, :40]  # rows of stride 48: not contiguous as [6, 40]
    w = torch.randn(24, 40, generator=gen)
    out = skinny_linear(x, w, None, SkinnyConfig(block_n=16, block_k=16), impl="triton")
    assert out.shape == (2, 3, 24)
    torch.testing.assert_close(out.reshape(6, 24).double(), _brute(x.reshape(6, 40), w, None), rtol=1e-5, atol=1e-4)


def test_width_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="input width"):
        skinny_linear(torch.randn(1, 40), torch.randn(24, 48), impl="triton")


def test_more_rows_than_the_tile_fall_back_to_f_linear() -> None:
    x = torch.randn(SKINNY_MAX_ROWS + 1, 32)
    w = torch.randn(8, 32)
    torch.testing.assert_close(skinny_linear(x, w, None, impl="triton"), F.linear(x, w))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_bf16_on_cuda_close_to_cublas(rows: int) -> None:
    gen = torch.Generator(device="cuda").manual_seed(rows)
    x = torch.randn(rows, 4096, device="cuda", generator=gen).bfloat16()
    w = (torch.randn(4096, 4096, device="cuda", generator=gen) / 64).bfloat16()
    out = skinny_linear(x, w, None)
    ref = F.linear(x.float(), w.float())
    assert (out.float() - ref).abs().max() <= 2e-2 * ref.abs().max()
