"""hetserve: LLM serving on heterogeneous GPU clusters.

The package root imports nothing heavy: ``SamplingParams`` is pure Python, and ``LLM`` (which needs torch)
is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hetserve.core.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from hetserve.llm import LLM


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from hetserve.llm import LLM

        return LLM
    raise AttributeError(f"module 'hetserve' has no attribute {name!r}")
