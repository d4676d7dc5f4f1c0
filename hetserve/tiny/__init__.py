"""Tiny random-weight checkpoints for tests and the out-of-the-box default model."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from hetserve.tiny.make_tiny import default_model_dir, make_tiny_model

__all__ = ["default_model_dir", "make_tiny_model"]


def __getattr__(name: str) -> Any:
    # lazy, so `python -m hetserve.tiny.make_tiny` does not import the module twice
    if name in __all__:
        from hetserve.tiny import make_tiny

        return getattr(make_tiny, name)
    raise AttributeError(name)
