"""Device profiling for the cost model: ``hetserve profile`` and the :class:`Profiler` behind it."""

from __future__ import annotations

from hetserve.profiling.grid import ProfileGrid, ProfileOptions, canonical_torch_dtype
from hetserve.profiling.profiler import Profiler
from hetserve.profiling.synthetic import NoAttention, build_metadata, synthetic_step, truncated_config
from hetserve.profiling.timing import Timer

__all__ = [
    "NoAttention",
    "ProfileGrid",
    "ProfileOptions",
    "Profiler",
    "Timer",
    "build_metadata",
    "canonical_torch_dtype",
    "synthetic_step",
    "truncated_config",
]
