"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) over a paged KV cache.

Parameter names equal the Hugging Face checkpoint names, so loading is a 1:1 copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hetserve.core.model_config import ModelConfig
from hetserve.engine.attention.base import AttentionBackend, AttentionMetadata
from hetserve.engine.model.layers import RMSNorm, RotaryEmbedding, silu_and_mul


def layer_sliding_windows(cfg: ModelConfig) -> list[int | None]:
    """Sliding window of each layer. Qwen2/3 only window the layers listed as such (``layer_types``, or
    those from ``max_window_layers`` on); Mistral windows every layer."""
    n = cfg.num_hidden_layers
    if cfg.sliding_window is None:
        return [None] * n
    layer_types = cfg.raw.get("layer_types")
    if isinstance(layer_types, list) and len(layer_types) == n:
        return [cfg.sliding_window if t == "sliding_attention" else None for t in layer_types]
    if cfg.family in ("qwen2", "qwen3"):
        first = int(cfg.raw.get("max_window_layers", 28))
        return [cfg.sliding_window if i >= first else None for i in range(n)]
    return [cfg.sliding_window] * n


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, sliding_window: int | None) -> None:
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.sliding_window = sliding_window
        h = cfg.hidden_size
        self.q_proj = nn.Linear(h, cfg.q_size, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, cfg.kv_size, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, cfg.kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.q_size, h, bias=cfg.o_bias)
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        backend: AttentionBackend,
        rotary: RotaryEmbedding,
    ) -> torch.Tensor:
        n = hidden.shape[0]
        q = self.q_proj(hidden).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(hidden).view(n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden).view(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotary(positions, q, k)
        out = backend.forward(q, k, v, kv_cache, meta, self.scale, self.sliding_window)
        return self.o_proj(out.reshape(n, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_proj(x), self.up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, sliding_window: int | None) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, sliding_window)
        self.mlp = LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        backend: AttentionBackend,
        rotary: RotaryEmbedding,
    ) -> torch.Tensor:
        residual = hidden
        hidden = self.self_attn(positions, self.input_layernorm(hidden), kv_cache, meta, backend, rotary)
        hidden = residual + hidden
        residual = hidden
        hidden = self.mlp(self.post_attention_layernorm(hidden))
        return residual + hidden


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        windows = layer_sliding_windows(cfg)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, windows[i]) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head: nn.Linear | None = None
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
        backend: AttentionBackend,
    ) -> torch.Tensor:
        """input_ids/positions ``[num_tokens]`` -> final-normed hidden states ``[num_tokens, hidden_size]``."""
        hidden = self.model.embed_tokens(input_ids)
        for i, layer in enumerate(self.model.layers):
            hidden = layer(positions, hidden, kv_caches[i], meta, backend, self.rotary)
        return self.model.norm(hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[n, hidden_size]`` -> float32 ``[n, vocab_size]``."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(hidden, weight).float()
