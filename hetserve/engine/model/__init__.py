"""Model definitions and checkpoint loading."""

from __future__ import annotations

from hetserve.engine.model.llama import LlamaForCausalLM
from hetserve.engine.model.loader import init_random_model, load_generation_config, load_model

__all__ = ["LlamaForCausalLM", "init_random_model", "load_generation_config", "load_model"]
