"""CUDA graphs for mixed steps (prefill chunks with decodes) and for pipeline stages: the dense parts captured in
pieces, paged attention run eagerly between them.

A decode-only step replays one graph of the whole model (``cuda_graphs``). A step with a prefill chunk cannot:
the Triton attention's launch shape depends on host-side lengths (the decode prefix, the longest query). Every
other kernel depends only on the step's token count, so for each bucketed token count ``T`` the forward is
captured as ``L + 1`` graphs, cut at the layers' attention:

    piece 0      embedding (or the previous stage's hidden / residual), layer 0's norm, qkv GEMM, rotary + KV write
    piece i      layer i-1's o_proj, norm, MLP; layer i's norm, qkv GEMM, rotary + KV write     (0 < i < L)
    piece L      layer L-1's o_proj, norm, MLP; the final norm (last stage) or hidden / residual out

Between piece ``i`` and ``i + 1`` the runner calls the backend's ``attend`` on the real tokens of the step
(``q`` from a static buffer, the cache the graph just wrote) and copies the result into the static buffer piece
``i + 1`` reads. A launch then costs one graph and the attention's kernels per layer instead of ~10 kernels.

Padding (``n`` real tokens replayed in bucket ``T >= n``): tokens ``n..T-1`` get id 0, position 0 and slot -1
(their K/V is never written); attention never reads or writes their rows, so they carry stale but finite values
through row-wise kernels and are dropped.

Static buffers: ``ids_pos_slots`` int64 ``[3, max_tokens]``; ``q`` ``[max_tokens, heads, dim]``; ``attn``
``[max_tokens, heads * dim]``; ``residual`` ``[max_tokens, hidden]``; a stage after the first also reads
``hidden_in`` / ``residual_in``. Whole model on one device, tensor parallel size 1, a backend with ``attend``.
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import Any

import torch
import torch.nn.functional as F

from hetserve.core.graph_sizes import piecewise_token_sizes
from hetserve.engine.attention.base import AttentionBackend, AttentionMetadata
from hetserve.kernels.norm import fused_add_rms_norm
from hetserve.kernels.rotary import rotary_and_store_kv

logger = logging.getLogger(__name__)

__all__ = ["PiecewiseGraphRunner", "piecewise_token_sizes", "supports_piecewise"]


def supports_piecewise(model: torch.nn.Module, backend: AttentionBackend) -> bool:
    par = getattr(model, "parallel", None)
    return (
        callable(getattr(backend, "attend", None))
        and getattr(backend, "fuses_rotary", False)
        and par is not None
        and par.tp_size == 1
    )


class PiecewiseGraphRunner:
    """Captures the model's dense pieces per token-count bucket; ``run`` replays them around eager attention."""

    def __init__(self, model: Any, kv_caches: list[torch.Tensor], backend: Any, device: torch.device,
                 sizes: list[int], dtype: torch.dtype) -> None:
        if not sizes:
            raise ValueError("no piecewise CUDA graph sizes")
        self.model = model
        self.layers = list(model.stage_layers)
        self.kv_caches = kv_caches
        self.backend = backend
        self.device = device
        self.sizes = sorted(sizes)
        self.max_tokens = self.sizes[-1]
        cfg = model.config
        attn = self.layers[0].self_attn
        self.num_heads, self.head_dim = attn.num_heads, attn.head_dim
        mt, h = self.max_tokens, cfg.hidden_size
        self.ids_pos_slots = torch.zeros((3, mt), dtype=torch.int64, device=device)
        self.q = torch.zeros((mt, self.num_heads, self.head_dim), dtype=dtype, device=device)
        self.attn = torch.zeros((mt, self.num_heads * self.head_dim), dtype=dtype, device=device)
        self.residual = torch.zeros((mt, h), dtype=dtype, device=device)
        self.first = bool(model.is_first_stage)
        self.last = bool(model.is_last_stage)
        self.hidden_in = None if self.first else torch.zeros((mt, h), dtype=dtype, device=device)
        self.residual_in = None if self.first else torch.zeros((mt, h), dtype=dtype, device=device)
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}
        self.outputs: dict[int, list[torch.Tensor]] = {}
        self.capture_s = 0.0
        self._cos_sin = model.rotary.cos_sin_cache(device)

    def bucket(self, num_tokens: int) -> int | None:
        i = bisect.bisect_left(self.sizes, num_tokens)
        if i == len(self.sizes) or self.sizes[i] not in self.graphs:
            return None
        return self.sizes[i]

    # ---- the pieces --------------------------------------------------------------------------------------------
    def _qkv_rotary_store(self, i: int, h: torch.Tensor, t: int) -> None:
        q, k, v = self.layers[i].self_attn.qkv_fused(h)
        qs = self.q[:t]
        qs.copy_(q)
        rotary_and_store_kv(qs, k, v, self.ids_pos_slots[1, :t], self._cos_sin, self.kv_caches[i],
                            self.ids_pos_slots[2, :t], impl="triton")

    def _piece(self, i: int, t: int) -> list[torch.Tensor]:
        residual = self.residual[:t]
        if i == 0:
            if self.first:
                emb = self.model.model.embed_tokens
                residual.copy_(F.embedding(self.ids_pos_slots[0, :t], emb.weight))
                _, h = self.layers[0].input_norm_fused(residual, None)
            else:
                assert self.hidden_in is not None and self.residual_in is not None
                residual.copy_(self.residual_in[:t])
                _, h = self.layers[0].input_norm_fused(self.hidden_in[:t], residual)
            self._qkv_rotary_store(0, h, t)
            return []
        layer = self.layers[i - 1]
        hidden = layer.post_attention_fused(layer.self_attn.out_proj(self.attn[:t]), residual)
        if i < len(self.layers):
            _, h = self.layers[i].input_norm_fused(hidden, residual)
            self._qkv_rotary_store(i, h, t)
            return []
        if not self.last:
            return [hidden, residual]
        norm = self.model.model.norm
        return [fused_add_rms_norm(hidden, residual, norm.weight, norm.eps, impl="triton")]

    # ---- capture / run -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def capture(self) -> None:
        start = time.perf_counter()
        self.ids_pos_slots.zero_()
        self.ids_pos_slots[2].fill_(-1)  # no K/V write while capturing
        torch.empty(1, device=self.device).normal_()  # the global generator, outside any capture (cuda_graphs)
        pool = torch.cuda.graph_pool_handle()
        ambient = torch.cuda.current_stream(self.device)
        on_default = ambient == torch.cuda.default_stream(self.device)
        stream = torch.cuda.Stream(self.device) if on_default else ambient
        n_pieces = len(self.layers) + 1
        for t in reversed(self.sizes):  # largest first: the smaller ones fit in the memory it reserved
            stream.wait_stream(ambient)
            with torch.cuda.stream(stream):
                for _ in range(2):  # compile this shape's Triton kernels outside the capture
                    for i in range(n_pieces):
                        self._piece(i, t)
            ambient.wait_stream(stream)
            torch.cuda.synchronize(self.device)
            graphs = []
            out: list[torch.Tensor] = []
            for i in range(n_pieces):
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, pool=pool, stream=stream):
                    res = self._piece(i, t)
                graphs.append(g)
                if res:
                    out = res
            self.graphs[t] = graphs
            self.outputs[t] = out
        torch.cuda.synchronize(self.device)
        self.capture_s = time.perf_counter() - start
        logger.info("captured piecewise CUDA graphs for %d token counts (%d..%d, %d pieces each) in %.1f s",
                    len(self.graphs), self.sizes[0], self.max_tokens, n_pieces, self.capture_s)

    def run(self, t: int, n: int, meta: AttentionMetadata,
            intermediate: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Replay bucket ``t`` for a step of ``n`` real tokens whose ids, positions and slots the caller has put
        in ``ids_pos_slots`` (padding after them); ``meta`` is the step's attention metadata. Returns the final
        hidden states ``[t, hidden]`` (last stage) or ``[hidden, residual]``; valid until the next replay."""
        if intermediate is not None:
            assert self.hidden_in is not None and self.residual_in is not None
            self.hidden_in[:n].copy_(intermediate[0])
            self.residual_in[:n].copy_(intermediate[1])
        q = self.q[:n]
        attn = self.attn[:n].view(n, self.num_heads, self.head_dim)  # the o_proj piece's input, written in place
        for i, layer in enumerate(self.layers):
            self._replay(i, t)
            a = layer.self_attn
            self.backend.attend(q, self.kv_caches[i], meta, a.scale, a.sliding_window, out=attn)
        self._replay(len(self.layers), t)
        return self.outputs[t]

    def _replay(self, i: int, t: int) -> None:
        self.graphs[t][i].replay()
