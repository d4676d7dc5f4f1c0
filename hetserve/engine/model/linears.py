"""Which kernel runs each fused-path linear layer at decode-batch sizes: cuBLAS or the skinny Triton GEMM.

At <= 16 rows a linear layer only streams its weight. cuBLAS under-fills the GPU for some widths (a
4096 x 4096 o_proj read at ~85% of what the skinny kernel reaches on an H100, ``results/gpu-linear.json``),
and the best choice depends on the GPU and on the SMs a partition has. So a runner measures instead of
assuming: :func:`tune_skinny` times cuBLAS against a few skinny configurations on the model's own weights,
one call per layer inside a CUDA graph (the weights stream from HBM, no launch cost counted), and keeps the
skinny kernel for a role only where it was faster by a margin. Larger batches always use cuBLAS.
"""

from __future__ import annotations

import functools
import logging
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from hetserve.kernels.skinny_gemm import SKINNY_MAX_ROWS, SkinnyConfig, skinny_linear

logger = logging.getLogger(__name__)

ROLES = ("qkv", "o_proj", "gate_up", "down", "lm_head")

#: tried per role; from the H100 sweep of ``benchmarks/gpu_linear.py`` (the winners of 27 configurations)
CANDIDATES = (SkinnyConfig(64, 256, 4, 4), SkinnyConfig(32, 512, 4, 4), SkinnyConfig(32, 128, 4, 3))

#: the skinny kernel must beat cuBLAS by this factor to be chosen (timing noise is ~1%)
MARGIN = 0.97


@dataclass
class Linears:
    """The fused path's linear calls, by role. Empty: cuBLAS everywhere (CPU, eager runners, before tuning)."""

    configs: dict[str, SkinnyConfig] = field(default_factory=dict)
    #: run the chosen skinny kernels on CPU tensors too (interpreted): how CI covers the model's wiring
    on_cpu: bool = False

    def __call__(self, role: str, x: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.configs.get(role)
        if cfg is not None and (x.is_cuda or self.on_cpu) and x.shape[0] <= SKINNY_MAX_ROWS:
            return skinny_linear(x, weight, bias, cfg, impl="triton")
        return F.linear(x, weight, bias)


def role_weights(model: Any) -> dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]]:
    """Each role's (weight, bias) per layer of a fused model (row-parallel o_proj / down under TP excluded:
    they go through the all-reduce path, which stays on cuBLAS)."""
    out: dict[str, list[tuple[torch.Tensor, torch.Tensor | None]]] = {r: [] for r in ROLES}
    for layer in model.stage_layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.qkv_weight is not None:
            out["qkv"].append((attn.qkv_weight, attn.qkv_bias))
        if attn._all_reduce is None:
            out["o_proj"].append((attn.o_proj.weight, attn.o_proj.bias))
        if mlp.gate_up_weight is not None:
            out["gate_up"].append((mlp.gate_up_weight, mlp.gate_up_bias))
        if mlp._all_reduce is None:
            out["down"].append((mlp.down_proj.weight, mlp.down_proj.bias))
    if model.is_last_stage:
        emb = model.model.embed_tokens
        head = model.lm_head.weight if model.lm_head is not None else (emb.weight if emb is not None else None)
        if head is not None:
            out["lm_head"].append((head, None))
    return {r: ws for r, ws in out.items() if ws}


def graph_ms(fn: Callable[[], None], reps: int = 5) -> float:
    """Median ms of ``fn`` captured once in a CUDA graph and replayed (no host launch time counted)."""
    # capture on the caller's stream when it is not the legacy default one (which cannot capture): a stream of
    # a green-context partition keeps the timed kernels on the partition's SMs, a fresh side stream would not
    current = torch.cuda.current_stream()
    stream = current if current != torch.cuda.default_stream() else torch.cuda.Stream()
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        fn()  # compile / pick algorithms outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            fn()
        graph.replay()
        times = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record(stream)
            graph.replay()
            b.record(stream)
            b.synchronize()
            times.append(a.elapsed_time(b))
    current.wait_stream(stream)
    del graph
    return statistics.median(times)


def tune_skinny(model: Any, device: torch.device, rows: tuple[int, ...] = (1, SKINNY_MAX_ROWS),
                candidates: tuple[SkinnyConfig, ...] = CANDIDATES) -> dict[str, Any]:
    """Time cuBLAS and each candidate per role on ``model``'s weights, through the same :class:`Linears` calls
    the model makes; set ``model.linears.configs`` to the winners
    that beat cuBLAS by :data:`MARGIN`. Returns the timings (ms per pass over the role's layers)."""
    report: dict[str, Any] = {}
    chosen: dict[str, SkinnyConfig] = {}
    with torch.inference_mode():
        for role, ws in role_weights(model).items():
            k = ws[0][0].shape[1]
            xs = [torch.randn(r, k, device=device, dtype=ws[0][0].dtype) for r in rows]

            def one_pass(x: torch.Tensor, cfg: SkinnyConfig | None, role: str = role, ws: list[Any] = ws) -> None:
                lin = Linears({} if cfg is None else {role: cfg})  # the calls the model makes
                for w, b in ws:
                    lin(role, x, w, b)

            def run(cfg: SkinnyConfig | None, xs: list[torch.Tensor] = xs,
                    one_pass: Callable[..., None] = one_pass) -> float:
                return sum(graph_ms(functools.partial(one_pass, x, cfg)) for x in xs)

            base = run(None)
            timed = {"cublas": base}
            best: tuple[float, SkinnyConfig] | None = None
            for cfg in candidates:
                try:
                    ms = run(cfg)
                except Exception as e:  # noqa: BLE001 - a configuration that does not fit (shared memory) is skipped
                    logger.debug("skinny %s %s failed: %s", role, cfg, e)
                    continue
                timed[f"{cfg.block_n}x{cfg.block_k}w{cfg.num_warps}s{cfg.num_stages}"] = ms
                if best is None or ms < best[0]:
                    best = (ms, cfg)
            if best is not None and best[0] < MARGIN * base:
                chosen[role] = best[1]
            report[role] = {"ms": timed, "chosen": None if role not in chosen else chosen[role].__dict__}
    model.linears.configs = chosen
    logger.info("skinny GEMM for %s (rows <= %d); cuBLAS for the rest",
                ", ".join(sorted(chosen)) or "no role", SKINNY_MAX_ROWS)
    return report


__all__ = ["CANDIDATES", "ROLES", "Linears", "graph_ms", "role_weights", "tune_skinny"]
