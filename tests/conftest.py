"""Shared fixtures. Tiny checkpoints are made once per session per distinct argument set."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from hetserve.tiny.make_tiny import make_tiny_model

TinyFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def tiny_model_factory(tmp_path_factory: pytest.TempPathFactory) -> TinyFactory:
    """``make(arch="llama", **make_tiny_model_kwargs) -> Path``; the same arguments return the same directory.

    Treat the directory as read-only; copy it (``shutil.copytree``) before corrupting it in a test.
    """
    root = tmp_path_factory.mktemp("tiny_models")
    made: dict[str, Path] = {}

    def make(arch: str = "llama", **kwargs: Any) -> Path:
        key = json.dumps([arch, kwargs], sort_keys=True, default=str)
        if key not in made:
            digest = hashlib.sha1(key.encode()).hexdigest()[:10]
            made[key] = make_tiny_model(root / f"{arch}-{digest}", arch, **kwargs)  # type: ignore[arg-type]
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_factory: TinyFactory) -> Path:
    """The default tiny llama (llama3 rope, GQA 4/2, vocab 512), float32."""
    return tiny_model_factory("llama")
