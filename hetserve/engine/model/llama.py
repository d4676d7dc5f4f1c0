"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) over a paged KV cache.

Parameter names equal the Hugging Face checkpoint names, so loading is a 1:1 copy. Two forward paths:

* the reference path (CPU): Hugging Face's operations one for one, separate q/k/v and gate/up projections;
* the fused path (CUDA, or forced with ``fused_path = True``): one qkv GEMM and one gate_up GEMM, Triton kernels
  for RMSNorm (+ residual add), rotary (+ KV-cache write) and SiLU-and-mul, and no host synchronisation, so the
  whole forward can be captured in a CUDA graph.

The fused weights are not copies: :meth:`LlamaForCausalLM.fuse_projections` gives q/k/v (and gate/up) one
storage and re-points each HF-named parameter at its rows, so loading into the HF names fills the fused tensor.

A ``ParallelSpec`` (``parallel.py``) builds one pipeline stage's layers and/or one tensor-parallel rank's shard;
a stage that is not the last returns the hidden state (fused path: hidden and residual) for the next stage, a
stage that is not the first starts from them. Without one, the model is whole and runs as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hetserve.core.model_config import ModelConfig
from hetserve.engine.attention.base import AttentionBackend, AttentionMetadata
from hetserve.engine.model.layers import RMSNorm, RotaryEmbedding, silu_and_mul
from hetserve.engine.model.linears import Linears
from hetserve.engine.model.parallel import ParallelSpec
from hetserve.kernels import HAS_TRITON
from hetserve.kernels.activation import silu_and_mul as fused_silu_and_mul
from hetserve.kernels.norm import fused_add_rms_norm, rms_norm
from hetserve.kernels.rotary import apply_rotary_


def _fuse_linears(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) tensor holding the linears' rows in order; each linear's parameters become views."""
    first = linears[0].weight
    rows = sum(lin.weight.shape[0] for lin in linears)
    weight = torch.empty((rows, first.shape[1]), dtype=first.dtype, device=first.device)
    has_bias = linears[0].bias is not None
    bias = torch.empty(rows, dtype=first.dtype, device=first.device) if has_bias else None
    offset = 0
    with torch.no_grad():
        for lin in linears:
            n = lin.weight.shape[0]
            weight[offset : offset + n].copy_(lin.weight)
            lin.weight = nn.Parameter(weight[offset : offset + n], requires_grad=lin.weight.requires_grad)
            if bias is not None and lin.bias is not None:
                bias[offset : offset + n].copy_(lin.bias)
                lin.bias = nn.Parameter(bias[offset : offset + n], requires_grad=lin.bias.requires_grad)
            offset += n
    return weight, bias


def _is_view_of(param: torch.Tensor, fused: torch.Tensor | None) -> bool:
    return (
        fused is not None
        and param.device == fused.device
        and param.dtype == fused.dtype
        and param.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    )


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


def _row_parallel(x: torch.Tensor, lin: nn.Linear, all_reduce: Callable[[torch.Tensor], Any]) -> torch.Tensor:
    """A row-parallel linear: this rank's partial product, summed over the group, then the bias once."""
    y = F.linear(x, lin.weight)
    all_reduce(y)
    return y if lin.bias is None else y + lin.bias


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, sliding_window: int | None, par: ParallelSpec | None = None) -> None:
        super().__init__()
        tp = 1 if par is None else par.tp_size
        kv0, kv1 = (0, cfg.num_key_value_heads) if par is None else par.kv_heads(cfg)
        self.num_heads = cfg.num_attention_heads // tp
        self.num_kv_heads = kv1 - kv0
        self.head_dim = cfg.head_dim
        self.scale = cfg.head_dim**-0.5
        self.sliding_window = sliding_window
        h = cfg.hidden_size
        q_size, kv_size = self.num_heads * cfg.head_dim, self.num_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(h, q_size, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, kv_size, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, kv_size, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_size, h, bias=cfg.o_bias)
        # None unless tensor parallel: o_proj is then row-parallel
        self._all_reduce = par.all_reduce if par is not None and tp > 1 else None
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.q_size, self.kv_size = q_size, kv_size
        # plain attributes, not parameters or buffers: invisible to state_dict and to .to(); see fuse_projections
        self.qkv_weight: torch.Tensor | None = None
        self.qkv_bias: torch.Tensor | None = None
        # the fused path's linear kernels by role; the model shares one (``LlamaForCausalLM.linears``)
        self.linears = Linears()

    def fuse_projections(self) -> None:
        self.qkv_weight, self.qkv_bias = _fuse_linears([self.q_proj, self.k_proj, self.v_proj])

    def projections_fused(self) -> bool:
        return _is_view_of(self.q_proj.weight, self.qkv_weight) and _is_view_of(self.v_proj.weight, self.qkv_weight)

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
        if self._all_reduce is not None:
            return _row_parallel(out.reshape(n, self.num_heads * self.head_dim), self.o_proj, self._all_reduce)
        return self.o_proj(out.reshape(n, self.num_heads * self.head_dim))

    def qkv_fused(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One GEMM into q ``[n, heads, dim]``, k and v ``[n, kv_heads, dim]`` (views of its output; q/k normed)."""
        assert self.qkv_weight is not None
        n = hidden.shape[0]
        qkv = self.linears("qkv", hidden, self.qkv_weight, self.qkv_bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q = rms_norm(q, self.q_norm.weight, self.q_norm.eps, impl="triton")
            k = rms_norm(k, self.k_norm.weight, self.k_norm.eps, impl="triton")
        return q, k, v

    def out_proj(self, out: torch.Tensor) -> torch.Tensor:
        """``[n, heads * dim]`` attention output -> ``[n, hidden]`` (row-parallel under TP)."""
        if self._all_reduce is not None:
            return _row_parallel(out, self.o_proj, self._all_reduce)
        return self.linears("o_proj", out, self.o_proj.weight, self.o_proj.bias)

    def forward_fused(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        backend: AttentionBackend,
        cos_sin_cache: torch.Tensor,
    ) -> torch.Tensor:
        n = hidden.shape[0]
        q, k, v = self.qkv_fused(hidden)
        if getattr(backend, "fuses_rotary", False):
            out = backend.forward_rotary(  # type: ignore[attr-defined]
                q, k, v, positions, cos_sin_cache, kv_cache, meta, self.scale, self.sliding_window
            )
        else:
            apply_rotary_(q, k, positions, cos_sin_cache, impl="triton")
            out = backend.forward(q.contiguous(), k, v, kv_cache, meta, self.scale, self.sliding_window)
        return self.out_proj(out.reshape(n, self.num_heads * self.head_dim))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, par: ParallelSpec | None = None) -> None:
        super().__init__()
        tp = 1 if par is None else par.tp_size
        h, i = cfg.hidden_size, cfg.intermediate_size // tp
        self.gate_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=cfg.mlp_bias)
        # None unless tensor parallel: down_proj is then row-parallel
        self._all_reduce = par.all_reduce if par is not None and tp > 1 else None
        self.gate_up_weight: torch.Tensor | None = None
        self.gate_up_bias: torch.Tensor | None = None
        self.linears = Linears()

    def fuse_projections(self) -> None:
        self.gate_up_weight, self.gate_up_bias = _fuse_linears([self.gate_proj, self.up_proj])

    def projections_fused(self) -> bool:
        return _is_view_of(self.gate_proj.weight, self.gate_up_weight) and _is_view_of(
            self.up_proj.weight, self.gate_up_weight
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._all_reduce is not None:
            return _row_parallel(silu_and_mul(self.gate_proj(x), self.up_proj(x)), self.down_proj, self._all_reduce)
        return self.down_proj(silu_and_mul(self.gate_proj(x), self.up_proj(x)))

    def forward_fused(self, x: torch.Tensor) -> torch.Tensor:
        assert self.gate_up_weight is not None
        gate_up = self.linears("gate_up", x, self.gate_up_weight, self.gate_up_bias)
        if self._all_reduce is not None:
            return _row_parallel(fused_silu_and_mul(gate_up, impl="triton"), self.down_proj, self._all_reduce)
        return self.linears("down", fused_silu_and_mul(gate_up, impl="triton"), self.down_proj.weight,
                            self.down_proj.bias)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, sliding_window: int | None, par: ParallelSpec | None = None) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(cfg, sliding_window, par)
        self.mlp = LlamaMLP(cfg, par)
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

    def forward_fused(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        backend: AttentionBackend,
        cos_sin_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(hidden, residual)`` in and out; the residual stream is updated in place by the fused norms and the
        layer's output still has to be added to it (by the next layer's norm, or the final norm)."""
        residual, h = self.input_norm_fused(hidden, residual)
        h = self.self_attn.forward_fused(positions, h, kv_cache, meta, backend, cos_sin_cache)
        return self.post_attention_fused(h, residual), residual

    def input_norm_fused(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(residual, normed)``: the first layer starts the residual stream, later ones add into it in place."""
        ln_in = self.input_layernorm
        if residual is None:
            return hidden, rms_norm(hidden, ln_in.weight, ln_in.eps, impl="triton")
        return residual, fused_add_rms_norm(hidden, residual, ln_in.weight, ln_in.eps, impl="triton")

    def post_attention_fused(self, attn_hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """The attention block's output (after o_proj) -> the MLP's output; adds it into ``residual`` in place."""
        ln_post = self.post_attention_layernorm
        h = fused_add_rms_norm(attn_hidden, residual, ln_post.weight, ln_post.eps, impl="triton")
        return self.mlp.forward_fused(h)


class MissingLayer(nn.Module):
    """A layer another pipeline stage holds: keeps the layer indices (and so the HF parameter names)."""


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, par: ParallelSpec | None = None) -> None:
        super().__init__()
        start, end = (0, cfg.num_hidden_layers) if par is None else (par.layer_start, par.end(cfg))
        self.embed_tokens: nn.Embedding | None = None
        if par is None or par.owns("model.embed_tokens.weight", cfg):
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        windows = layer_sliding_windows(cfg)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(cfg, windows[i], par) if start <= i < end else MissingLayer()
            for i in range(cfg.num_hidden_layers)
        )
        self.norm: RMSNorm | None = None
        if end == cfg.num_hidden_layers:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, parallel: ParallelSpec | None = None) -> None:
        super().__init__()
        self.config = cfg
        self.parallel = (parallel or ParallelSpec()).validate(cfg)
        par = None if self.parallel.is_whole(cfg) else self.parallel
        self.model = LlamaModel(cfg, par)
        self.is_first_stage = self.parallel.is_first
        self.is_last_stage = self.parallel.is_last(cfg)
        # this stage's layers in order (a plain list: the modules are registered under model.layers)
        self.stage_layers: list[LlamaDecoderLayer] = [
            m for m in self.model.layers if isinstance(m, LlamaDecoderLayer)
        ]
        self.lm_head: nn.Linear | None = None
        if not cfg.tie_word_embeddings and self.is_last_stage:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings)
        # None: the fused path on CUDA when triton is installed; True/False force it (on CPU tensors the Triton
        # kernels then run interpreted, which is how CI covers the GPU path)
        self.fused_path: bool | None = None
        # cuBLAS or the skinny GEMM per linear role at decode-batch sizes; a CUDA runner tunes it (linears.py)
        self.linears = Linears()
        for layer in self.stage_layers:
            layer.self_attn.linears = layer.mlp.linears = self.linears

    def fuse_projections(self) -> None:
        """(Re)build the fused qkv and gate_up weights from the current parameters and make those parameters
        views of them. Needed again after anything that re-allocates parameters (``.to()``, ``to_empty``)."""
        for layer in self.stage_layers:
            layer.self_attn.fuse_projections()
            layer.mlp.fuse_projections()

    def projections_fused(self) -> bool:
        first = self.stage_layers[0]
        return first.self_attn.projections_fused() and first.mlp.projections_fused()

    def uses_fused_path(self, device: torch.device) -> bool:
        if self.fused_path is None:
            return device.type == "cuda" and HAS_TRITON
        return self.fused_path

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
        backend: AttentionBackend,
        intermediate: list[torch.Tensor] | None = None,
    ) -> Any:
        """input_ids/positions ``[num_tokens]`` -> final-normed hidden states ``[num_tokens, hidden_size]``.

        Pipeline stages: ``kv_caches`` are this stage's layers' only; a stage after the first starts from
        ``intermediate`` (what the previous stage returned) instead of embedding ``input_ids``; a stage before
        the last returns a list of tensors for the next one (``[hidden]``, fused path ``[hidden, residual]``).
        """
        if self.uses_fused_path(positions.device):
            return self._forward_fused(input_ids, positions, kv_caches, meta, backend, intermediate)
        if intermediate is None:
            assert self.model.embed_tokens is not None
            hidden = self.model.embed_tokens(input_ids)
        else:
            hidden = intermediate[0] if len(intermediate) == 1 else intermediate[0] + intermediate[1]
        for i, layer in enumerate(self.stage_layers):
            hidden = layer(positions, hidden, kv_caches[i], meta, backend, self.rotary)
        if not self.is_last_stage:
            return [hidden]
        assert self.model.norm is not None
        return self.model.norm(hidden)

    def _forward_fused(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[torch.Tensor],
        meta: AttentionMetadata,
        backend: AttentionBackend,
        intermediate: list[torch.Tensor] | None = None,
    ) -> Any:
        if not self.projections_fused():
            self.fuse_projections()
        cos_sin = self.rotary.cos_sin_cache(positions.device)
        residual: torch.Tensor | None = None
        if intermediate is None:
            assert self.model.embed_tokens is not None
            hidden = F.embedding(input_ids, self.model.embed_tokens.weight)
        else:
            hidden = intermediate[0]
            residual = intermediate[1] if len(intermediate) > 1 else None
        for i, layer in enumerate(self.stage_layers):
            hidden, residual = layer.forward_fused(positions, hidden, residual, kv_caches[i], meta, backend, cos_sin)
        assert residual is not None
        if not self.is_last_stage:
            return [hidden, residual]
        norm = self.model.norm
        assert norm is not None
        return fused_add_rms_norm(hidden, residual, norm.weight, norm.eps, impl="triton")

    def compute_logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """``[n, hidden_size]`` -> ``[n, vocab_size]``, float32 unless ``float32=False`` (the activation dtype;
        enough for an argmax, since the upcast is exact)."""
        emb = self.model.embed_tokens
        weight = emb.weight if self.lm_head is None else self.lm_head.weight  # type: ignore[union-attr]
        logits = self.linears("lm_head", hidden, weight)
        return logits.float() if float32 else logits
