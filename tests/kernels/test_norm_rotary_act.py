"""RMSNorm (+ residual), SiLU-and-mul and rotary kernels against independent references: the model's own HF-
equivalent layers (``RMSNorm``, ``RotaryEmbedding``, ``F.silu``) evaluated in float64. Interpreted on CPU,
compiled on a GPU when one is present."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hetserve.engine.model.layers import RMSNorm, RotaryEmbedding
from hetserve.kernels import HAS_TRITON
from hetserve.kernels.activation import silu_and_mul
from hetserve.kernels.attention import write_kv_cache
from hetserve.kernels.norm import fused_add_rms_norm, rms_norm
from hetserve.kernels.rotary import apply_rotary_, build_cos_sin_cache, rotary_and_store_kv

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    norm = RMSNorm(x.shape[-1], eps).double().to(x.device)
    with torch.no_grad():
        norm.weight.copy_(weight.double())
        return norm(x.double())


def close(got: torch.Tensor, want: torch.Tensor, tol: float = 1e-5) -> None:
    assert got.shape == want.shape
    assert not torch.isnan(got).any()
    err = (got.double().cpu() - want.double().cpu()).abs().max().item()
    assert err < tol, f"max abs error {err:.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hidden", [64, 80])
def test_rms_norm(device: str, hidden: int) -> None:
    gen = torch.Generator().manual_seed(hidden)
    x = (torch.randn(7, hidden, generator=gen) * 3).to(device)
    w = torch.randn(hidden, generator=gen).to(device)
    close(rms_norm(x, w, 1e-6, impl="triton"), hf_rms_norm(x, w, 1e-6))


@pytest.mark.parametrize("device", DEVICES)
def test_fused_add_rms_norm_updates_residual(device: str) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 48, generator=gen).to(device)
    residual = torch.randn(5, 48, generator=gen).to(device)
    w = torch.randn(48, generator=gen).to(device)
    want_sum = x.double() + residual.double()
    out = fused_add_rms_norm(x, residual, w, 1e-5, impl="triton")
    close(residual, want_sum)
    close(out, hf_rms_norm(want_sum, w, 1e-5))


@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_on_strided_heads(device: str) -> None:
    """Per-head norm (Qwen3 q/k norm) straight on the q slice of a fused qkv output, no copy."""
    gen = torch.Generator().manual_seed(2)
    qkv = torch.randn(6, (4 + 2 + 2) * 16, generator=gen).to(device)
    q = qkv[:, : 4 * 16].view(6, 4, 16)
    w = torch.randn(16, generator=gen).to(device)
    close(rms_norm(q, w, 1e-6, impl="triton"), hf_rms_norm(q.contiguous(), w, 1e-6))


@pytest.mark.parametrize("device", DEVICES)
def test_silu_and_mul(device: str) -> None:
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(9, 2 * 40, generator=gen) * 4).to(device)
    x64 = x.double()
    close(silu_and_mul(x, impl="triton"), F.silu(x64[:, :40]) * x64[:, 40:])


def hf_rotary(head_dim: int, rope_scaling: dict | None) -> RotaryEmbedding:
    return RotaryEmbedding(head_dim, 10000.0, rope_scaling, 256)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "rope_scaling",
    [None, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64},
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}],
    ids=["default", "llama3", "yarn"],
)
def test_rotary_in_place_matches_hf(device: str, rope_scaling: dict | None) -> None:
    rotary = hf_rotary(32, rope_scaling)
    gen = torch.Generator().manual_seed(4)
    qkv = torch.randn(6, (4 + 2 + 2) * 32, generator=gen).to(device)
    q = qkv[:, :128].view(6, 4, 32)
    k = qkv[:, 128:192].view(6, 2, 32)
    positions = torch.tensor([0, 1, 5, 63, 64, 255], device=device)
    want_q, want_k = rotary(positions.cpu(), q.cpu().double(), k.cpu().double())
    apply_rotary_(q, k, positions, rotary.cos_sin_cache(torch.device(device)), impl="triton")
    close(q, want_q, 2e-5)
    close(k, want_k, 2e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_rotary_and_store_kv(device: str) -> None:
    """The fused rotary + KV write leaves q/k rotated and the cache holding the rotated k and v at the slots
    (a negative slot writes nothing)."""
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
    cos_sin = build_cos_sin_cache(inv_freq, 1.0, 32, device)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(4, 2, 16, generator=gen).to(device)
    k = torch.randn(4, 2, 16, generator=gen).to(device)
    v = torch.randn(4, 2, 16, generator=gen).to(device)
    positions = torch.tensor([3, 0, 17, 31], device=device)
    slots = torch.tensor([5, -1, 12, 0], device=device)
    q_ref, k_ref = q.clone(), k.clone()
    apply_rotary_(q_ref, k_ref, positions, cos_sin, impl="torch")
    cache_ref = torch.full((2, 4, 4, 2, 16), float("nan"), device=device)
    write_kv_cache(k_ref, v, cache_ref, slots, impl="torch")
    cache = torch.full_like(cache_ref, float("nan"))
    rotary_and_store_kv(q, k, v, positions, cos_sin, cache, slots, impl="triton")
    close(q, q_ref)
    close(k, k_ref)
    assert torch.equal(cache.isnan(), cache_ref.isnan())
    close(cache.nan_to_num(), cache_ref.nan_to_num())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_bf16_kernels_close_to_hf_on_gpu() -> None:
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(33, 4096, generator=gen).cuda().bfloat16()
    residual = torch.randn(33, 4096, generator=gen).cuda().bfloat16()
    w = (1 + 0.1 * torch.randn(4096, generator=gen)).cuda().bfloat16()
    want_sum = (x.float() + residual.float()).bfloat16()
    out = fused_add_rms_norm(x, residual, w, 1e-5)
    assert torch.equal(residual, want_sum)  # HF adds in bf16: bit-exact
    close(out.float(), hf_rms_norm(want_sum.float(), w.float(), 1e-5), 0.07)
    gu = torch.randn(33, 2 * 14336, generator=gen).cuda().bfloat16()
    close(silu_and_mul(gu).float(), (F.silu(gu[:, :14336]) * gu[:, 14336:]).float(), 0.07)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.gpu
def test_direct_launches_match_the_ordinary_path_on_gpu() -> None:
    """``DualKernel.launch`` calls a compiled kernel's launcher directly once a call with the same
    specialisation compiled it: norms and SiLU over aligned rows, then over rows one element off 16-byte
    alignment and with a row count of 1 (other specialisations: compiled, not reused), all equal to the
    ordinary launch path bit for bit."""
    import hetserve.kernels as kernels
    from hetserve.kernels.activation import _silu_and_mul
    from hetserve.kernels.norm import _rms_norm

    gen = torch.Generator().manual_seed(9)
    base = torch.randn(40 * 512 + 1, generator=gen).cuda().bfloat16()
    w = torch.randn(512, generator=gen).cuda().bfloat16()
    gu = torch.randn(40, 2 * 256, generator=gen).cuda().bfloat16()
    inputs = [base[: 40 * 512].view(40, 512), base[1:].view(40, 512), base[:512].view(1, 512)]
    assert inputs[1].data_ptr() % 16 != 0
    try:
        results = []
        for direct in (True, False):
            kernels.DIRECT_LAUNCH = direct
            outs = []
            for x in inputs * 2:  # each input twice: the second time a direct launch where one is allowed
                outs.append(rms_norm(x, w, 1e-5))
                outs.append(silu_and_mul(gu[: x.shape[0]]))
            results.append(outs)
            if direct:
                assert _rms_norm.direct_launches >= 3 and _silu_and_mul.direct_launches >= 2
        for a, b in zip(*results, strict=True):
            assert torch.equal(a, b)
    finally:
        kernels.DIRECT_LAUNCH = True
    for x, out in zip(inputs, results[0][0:6:2], strict=True):
        close(out.float(), hf_rms_norm(x.float(), w.float(), 1e-5), 0.07)
