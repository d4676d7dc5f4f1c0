"""Brute-force references for KV formats: per-token, per-head python loops over index arithmetic, and an
fp8 e4m3 rounding written from the format's definition (independent of torch's cast)."""

from __future__ import annotations

import bisect
import math

import torch

from hetserve.runtime.kv_convert import TORCH_DTYPES, KVPayload
from hetserve.runtime.kv_layout import KVDescriptor


def position(desc: KVDescriptor, layer: int, kv: int, token: int, local_head: int) -> tuple[int, tuple[int, ...]]:
    """(which tensor, index of the head-dim vector) of one token's K or V of one head."""
    b, s = divmod(token, desc.block_size)
    blk = (s, local_head) if desc.layout == "NHD" else (local_head, s)
    if desc.arrangement == "layer_major":
        return layer, (kv, b, *blk)
    return 0, (b, layer, kv, *blk)


def tensor_shapes(desc: KVDescriptor, num_blocks: int, num_heads: int) -> list[tuple[int, ...]]:
    blk = (desc.block_size, num_heads, desc.head_dim) if desc.layout == "NHD" else (
        num_heads, desc.block_size, desc.head_dim)
    if desc.arrangement == "layer_major":
        return [(2, num_blocks, *blk)] * desc.num_layers
    return [(num_blocks, desc.num_layers, 2, *blk)]


def write_payload(truth: torch.Tensor, desc: KVDescriptor, head_start: int, num_heads: int,
                  num_blocks: int | None = None, dtype: torch.dtype | None = None) -> KVPayload:
    """A payload holding ``truth[L, 2, T, H_total, D]``'s heads ``[head_start, +num_heads)``, built by loops."""
    L, _, T, _, _ = truth.shape
    nb = num_blocks if num_blocks is not None else -(-T // desc.block_size)
    dt = dtype or TORCH_DTYPES[desc.dtype]
    tensors = [torch.zeros(s, dtype=torch.float32) for s in tensor_shapes(desc, nb, num_heads)]
    for layer in range(L):
        for kv in range(2):
            for t in range(T):
                for h in range(num_heads):
                    i, idx = position(desc, layer, kv, t, h)
                    tensors[i][idx] = truth[layer, kv, t, head_start + h]
    return KVPayload(desc, T, [x.to(dt) for x in tensors], head_start)


def read_payload(p: KVPayload, num_tokens: int) -> torch.Tensor:
    """``[L, 2, T, H_payload, D]`` float64 read back from a payload by loops (fp8 dequantised by its scales)."""
    d = p.desc
    out = torch.zeros(d.num_layers, 2, num_tokens, p.num_heads, d.head_dim, dtype=torch.float64)
    for layer in range(d.num_layers):
        for kv in range(2):
            for t in range(num_tokens):
                for h in range(p.num_heads):
                    i, idx = position(d, layer, kv, t, h)
                    v = p.tensors[i][idx].double()
                    if p.scales is not None:
                        v = v * float(p.scales[layer, kv, h if p.scales.shape[2] > 1 else 0])
                    out[layer, kv, t, h] = v
    return out


def padding_is_zero(p: KVPayload, num_tokens: int) -> bool:
    """Every slot at or past ``num_tokens`` in the payload's blocks is zero (checked per slot)."""
    d = p.desc
    for layer in range(d.num_layers):
        for kv in range(2):
            for t in range(num_tokens, p.num_blocks * d.block_size):
                for h in range(p.num_heads):
                    i, idx = position(d, layer, kv, t, h)
                    if p.tensors[i][idx].float().abs().sum() != 0:
                        return False
    return True


# ---- fp8 e4m3 (fn: no infinities, S.1111.111 is NaN, max 448) ------------------------------------
def _e4m3_table() -> tuple[list[float], list[int]]:
    vals: list[tuple[float, int]] = []
    for e in range(16):
        for m in range(8):
            if e == 15 and m == 7:
                continue
            v = (m / 8) * 2.0**-6 if e == 0 else (1 + m / 8) * 2.0 ** (e - 7)
            vals.append((v, e * 8 + m))
    vals.sort()
    return [v for v, _ in vals], [c for _, c in vals]


_VALS, _CODES = _e4m3_table()


def e4m3_round(x: float) -> float:
    """Nearest e4m3fn value (ties to an even mantissa), after clamping to +-448."""
    a = min(abs(x), 448.0)
    i = bisect.bisect_left(_VALS, a)
    if i == 0:
        r = _VALS[0]
    elif i == len(_VALS):
        r = _VALS[-1]
    else:
        lo, hi = _VALS[i - 1], _VALS[i]
        if a - lo < hi - a:
            r = lo
        elif hi - a < a - lo:
            r = hi
        else:
            r = lo if _CODES[i - 1] % 2 == 0 else hi
    return math.copysign(r, x) if r != 0 else 0.0


def fp8_reference(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Per element: ``e4m3_round(x / scale) * scale``."""
    flat = [e4m3_round(float(v) / scale) * scale for v in x.double().reshape(-1).tolist()]
    return torch.tensor(flat, dtype=torch.float64).reshape(x.shape)
