"""Attention backends, registered by name in this one place."""

from __future__ import annotations

from typing import cast

import torch

from hetserve.core.errors import ValidationError
from hetserve.core.registry import Registry
from hetserve.engine.attention.base import AttentionBackend, AttentionMetadata
from hetserve.engine.attention.torch_ref import TorchRefBackend
from hetserve.engine.attention.triton_attn import TritonAttentionBackend
from hetserve.kernels import HAS_TRITON

ATTENTION_BACKENDS: Registry[type[AttentionBackend]] = Registry("attention backend")
ATTENTION_BACKENDS.register("torch_ref")(TorchRefBackend)  # type: ignore[arg-type]
ATTENTION_BACKENDS.register("triton")(TritonAttentionBackend)  # type: ignore[arg-type]


def get_attention_backend(name: str, device: torch.device | str) -> AttentionBackend:
    """Instantiate a registered backend for ``device``; ``"auto"`` picks the best one available there."""
    if name == "auto":
        name = "triton" if torch.device(device).type == "cuda" and HAS_TRITON else "torch_ref"
    if name not in ATTENTION_BACKENDS:
        raise ValidationError(
            "attention_backend", f"unknown backend {name!r}; registered: {', '.join(ATTENTION_BACKENDS.names())}"
        )
    # entries are the backend classes themselves (Registry's signature speaks of zero-arg factories)
    cls = cast("type[AttentionBackend]", ATTENTION_BACKENDS.get(name))
    return cls(torch.device(device))


__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionBackend",
    "AttentionMetadata",
    "TorchRefBackend",
    "TritonAttentionBackend",
    "get_attention_backend",
]
