"""The token and batch sizes the GPU runtime captures CUDA graphs at (pure Python: the cost model pads a step to
them as the runtime does, and the profiler measures its dense table at them)."""

from __future__ import annotations

import bisect
from collections.abc import Sequence


def graph_batch_sizes(max_batch: int) -> list[int]:
    """Decode graphs: 1, 2, 4, 8, then every multiple of 8 up to ``max_batch`` (and ``max_batch`` itself)."""
    sizes = [b for b in (1, 2, 4, 8) if b <= max_batch] + list(range(16, max_batch + 1, 8))
    if not sizes or sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sorted(set(sizes))


def piecewise_token_sizes(max_tokens: int) -> list[int]:
    """Piecewise graphs: 16, 32, 48, 64, then steps of 32 to 512, of 64 to 1024, of 128 beyond, up to
    ``max_tokens``."""
    sizes = [s for s in (16, 32, 48, 64) if s <= max_tokens]
    sizes += list(range(96, min(max_tokens, 512) + 1, 32))
    sizes += list(range(576, min(max_tokens, 1024) + 1, 64))
    sizes += list(range(1152, max_tokens + 1, 128))
    if max_tokens >= 1 and (not sizes or sizes[-1] != max_tokens):
        sizes.append(max_tokens)
    return sorted(set(sizes))


def padded(sizes: Sequence[int], n: int) -> int:
    """The captured size a step of ``n`` rows replays (the smallest one >= n), or ``n`` beyond the largest."""
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else n
