"""Building blocks of Llama-family decoders: RMSNorm, rotary embeddings (default/linear/llama3/yarn), SiLU-and-mul.

Numerics follow Hugging Face transformers operation for operation so that float32 outputs agree to ~1e-6.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, normalised in float32 and cast back before the weight."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x32 = x.to(torch.float32)
        variance = x32.pow(2).mean(-1, keepdim=True)
        x32 = x32 * torch.rsqrt(variance + self.eps)
        return self.weight * x32.to(input_dtype)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


class SiluAndMul(nn.Module):
    """For a fused gate/up projection: input ``[..., 2 * d]`` (gate first), output ``[..., d]``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x.shape[-1] // 2
        return silu_and_mul(x[..., :d], x[..., d:])


def _base_inv_freq(head_dim: int, rope_theta: float) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / head_dim
    return 1.0 / (rope_theta**exponents)


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict[str, Any], max_position_embeddings: int) -> torch.Tensor:
    factor = float(params["factor"])
    low_freq_factor = float(params["low_freq_factor"])
    high_freq_factor = float(params["high_freq_factor"])
    old_context_len = float(params.get("original_max_position_embeddings") or max_position_embeddings)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # long wavelengths are divided by factor, short ones kept, the band in between blended smoothly
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, blended, scaled)


def _yarn_inv_freq(
    head_dim: int, rope_theta: float, params: dict[str, Any], max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    original_max = params.get("original_max_position_embeddings") or max_position_embeddings
    factor = params.get("factor")
    if factor is None:
        factor = max_position_embeddings / original_max
    factor = float(factor)

    def mscale_of(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = mscale_of(factor, mscale) / mscale_of(factor, mscale_all_dim)
        else:
            attention_factor = mscale_of(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1
    truncate = params.get("truncate", True)

    def correction_dim(num_rotations: float) -> float:
        return (head_dim * math.log(original_max / (num_rotations * 2 * math.pi))) / (2 * math.log(rope_theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(head_dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    pos_freqs = rope_theta ** (torch.arange(0, head_dim, 2, device="cpu").to(torch.float32) / head_dim)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq, float(attention_factor)


def compute_inv_freq(
    head_dim: int, rope_theta: float, rope_scaling: dict[str, Any] | None, max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[head_dim // 2]`` (float32, CPU) and the factor cos/sin are multiplied by.

    Always built on the CPU (even under a ``torch.device("meta")`` context) so the values match transformers.
    """
    rope_type = (rope_scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return _base_inv_freq(head_dim, rope_theta), 1.0
    assert rope_scaling is not None
    if rope_type == "linear":
        return _base_inv_freq(head_dim, rope_theta) / float(rope_scaling["factor"]), 1.0
    if rope_type == "llama3":
        return _llama3_inv_freq(_base_inv_freq(head_dim, rope_theta), rope_scaling, max_position_embeddings), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(head_dim, rope_theta, rope_scaling, max_position_embeddings)
    raise ValueError(f"unsupported rope_type {rope_type!r}")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding over the whole head (first half / second half pairing).

    cos/sin are computed from positions on the fly in float32, as transformers does, which keeps them exact at
    any position. The inverse frequencies are deliberately not a buffer: ``module.to(bfloat16)`` must not round
    them.
    """

    def __init__(
        self, head_dim: int, rope_theta: float, rope_scaling: dict[str, Any] | None, max_position_embeddings: int
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        inv_freq, self.attention_scaling = compute_inv_freq(head_dim, rope_theta, rope_scaling, max_position_embeddings)
        self.max_position_embeddings = max_position_embeddings
        self._inv_freq_by_device: dict[torch.device, torch.Tensor] = {inv_freq.device: inv_freq}
        self._cos_sin_by_device: dict[torch.device, torch.Tensor] = {}

    def _inv_freq(self, device: torch.device) -> torch.Tensor:
        found = self._inv_freq_by_device.get(device)
        if found is None:
            found = next(iter(self._inv_freq_by_device.values())).to(device)
            self._inv_freq_by_device[device] = found
        return found

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``[num_tokens, head_dim]`` each, in ``dtype``."""
        freqs = positions[:, None].float() * self._inv_freq(positions.device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype), sin.to(dtype)

    def cos_sin_cache(self, device: torch.device) -> torch.Tensor:
        """float32 ``[max_position_embeddings, head_dim]`` (cosines, then sines) for the fused rotary kernel; the
        values are those :meth:`cos_sin` computes, before its rounding to the activation dtype."""
        found = self._cos_sin_by_device.get(device)
        if found is None:
            from hetserve.kernels.rotary import build_cos_sin_cache

            inv = self._inv_freq(device)
            found = build_cos_sin_cache(inv[: self.head_dim // 2], self.attention_scaling,
                                        self.max_position_embeddings, device)
            self._cos_sin_by_device[device] = found
        return found

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q ``[num_tokens, num_heads, head_dim]``, k ``[num_tokens, num_kv_heads, head_dim]``."""
        cos, sin = self.cos_sin(positions, q.dtype)
        cos, sin = cos[:, None, :], sin[:, None, :]
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
