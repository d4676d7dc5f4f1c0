"""What ``hetserve profile`` measures: the engine dtype names, the grid of points (:class:`ProfileGrid`) and the
run's options (:class:`ProfileOptions`). The measuring itself is :mod:`hetserve.profiling.profiler`."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import torch

from hetserve.core.errors import ValidationError
from hetserve.core.graph_sizes import piecewise_token_sizes

_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "half": "float16", "float": "float32"}


def canonical_torch_dtype(name: str, device_type: str) -> str:
    """``bf16``/``auto``/... -> a key of the engine's dtypes (auto: float32 on CPU, bfloat16 on GPU)."""
    n = _DTYPE_ALIASES.get(name, name)
    if n == "auto":
        return "float32" if device_type == "cpu" else "bfloat16"
    if n not in _TORCH_DTYPES:
        choices = f"auto, {', '.join(_TORCH_DTYPES)}, bf16, fp16, fp32"
        raise ValidationError("--dtype", f"must be one of {choices}; got {name!r}")
    return n


@dataclass(frozen=True)
class ProfileGrid:
    """The points measured. Every axis strictly increasing (the profile format requires it)."""

    dense_num_tokens: tuple[int, ...]
    decode_num_seqs: tuple[int, ...]
    decode_context_lens: tuple[int, ...]
    prefill_num_tokens: tuple[int, ...]
    prefill_context_lens: tuple[int, ...]
    lm_head_rows: tuple[int, ...]
    idle_s: tuple[float, ...] = (0.0, 0.001, 0.005, 0.02, 0.1)  # engine idle gaps before a step (wake-up cost)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            xs = getattr(self, f.name)
            if not xs or any(b <= a for a, b in itertools.pairwise(xs)) or xs[0] < 0:
                raise ValidationError(f"grid.{f.name}", f"must be non-empty, >= 0 and strictly increasing, got {xs}")

    @classmethod
    def default(cls, device_type: str, quick: bool = False) -> ProfileGrid:
        if device_type == "cpu":
            if quick:
                return cls((1, 4, 16, 64, 256), (1, 4, 16), (16, 64, 256), (16, 64, 256), (0, 256), (1, 4, 16))
            return cls(
                (1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
                (1, 2, 4, 8, 16, 32),
                (16, 64, 256, 1024),
                (16, 64, 128, 256, 512),
                (0, 128, 512),
                (1, 2, 4, 8, 16, 32, 64),
            )
        if quick:
            return cls(
                (1, 8, 64, 512, 2048),
                (1, 8, 64),
                (128, 1024, 4096),
                (128, 512, 2048),
                (0, 2048),
                (1, 8, 64),
            )
        # dense: powers of two, and every piecewise-graph size up to 1024 (a piecewise step's dense layers run
        # at one of those; between two powers of two GEMM time is a staircase of tiles, not the line that
        # interpolation draws: at 257-511 tokens the line was up to 15% short on an H100)
        dense = sorted({1, 2, 4, 8, *piecewise_token_sizes(1024), 1536, 2048, 3072, 4096, 6144, 8192, 16384})
        return cls(
            tuple(dense),
            (1, 4, 8, 16, 32, 64, 128, 256),
            (128, 512, 1024, 2048, 4096, 8192),
            (16, 64, 128, 256, 512, 1024, 2048, 4096, 8192),
            (0, 1024, 4096, 8192),
            (1, 4, 8, 16, 32, 64, 128, 256, 512),
        )


@dataclass(frozen=True)
class ProfileOptions:
    num_layers: int = 2
    warmup: int = 2
    repeat: int = 10
    use_cuda_graphs: bool = True
    attention_backend: str = "auto"
    block_size: int = 16
    seed: int = 0
    table_budget_s: float = 60.0  # per table: outer rows past the budget are left out (reported in meta)
    kv_pool_bytes: int | None = None  # None: min(35% of free memory, 24 GiB) on GPU, 256 MiB on CPU
    # median on GPUs; on a shared CPU other processes only ever add time, so the minimum is the robust choice
    statistic: str = "auto"
    copy_bytes: int | None = None  # None: 1 GiB on GPU, 128 MiB on CPU

    def __post_init__(self) -> None:
        if not 1 <= self.num_layers <= 8:
            raise ValidationError("--layers", f"must be in [1, 8], got {self.num_layers}")
        if self.repeat < 1 or self.warmup < 0:
            raise ValidationError("--repeat", "repeat must be >= 1 and warmup >= 0")
        if self.statistic not in ("auto", "median", "min"):
            raise ValidationError("statistic", f"must be auto, median or min, got {self.statistic!r}")
