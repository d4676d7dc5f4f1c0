"""gpu_kernels.py's shared state: the Llama-8B shapes (tiny ones on the CPU with ``--cpu-smoke``, which rebinds the
module globals here: the section modules read them as ``gk.NAME``), timing helpers, errors, the run's :class:`Ctx`
and random paged KV (:func:`make_paged`)."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hetserve.core.model_config import ModelConfig

LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072, "tie_word_embeddings": False,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "torch_dtype": "bfloat16",
}
BLOCK = 16
H, KVH, D = 32, 8, 128
DEFAULT_COPY_BPS = 3.0e12
DEFAULT_MATMUL_FLOPS = 781e12
DEV = torch.device("cuda")
BF16 = torch.bfloat16  # the activation dtype (float32 in --cpu-smoke)
DECODE_BATCHES = (1, 8, 32, 64, 128, 256)
CTXS = (1024, 4096)
ATTN_PREFILL_LENS = (512, 1024, 2048, 4096, 8192)
MODEL_PREFILL_LENS = (512, 2048, 4096, 8192)
SMOKE = False


def use_cpu_smoke() -> None:
    """Tiny shapes on the CPU (kernels interpreted or torch fallbacks): checks this script's own logic only."""
    global H, KVH, D, DEV, BF16, DECODE_BATCHES, CTXS, ATTN_PREFILL_LENS, MODEL_PREFILL_LENS, SMOKE
    H, KVH, D = 4, 2, 16
    DEV, BF16, SMOKE = torch.device("cpu"), torch.float32, True
    DECODE_BATCHES, CTXS = (1, 2, 3, 4, 6, 8), (64, 128)
    ATTN_PREFILL_LENS, MODEL_PREFILL_LENS = (64, 96, 128, 192, 256), (32, 64, 96, 128)
    LLAMA_8B.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, vocab_size=512, max_position_embeddings=8192)


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def empty_cache() -> None:
    if DEV.type == "cuda":
        torch.cuda.empty_cache()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- timing helpers --------------------------------------------------------------------------------------
def events_ms(run: Callable[[], Any], reps: int = 20) -> list[float]:
    out = []
    if DEV.type != "cuda":
        for _ in range(min(reps, 2)):
            t = time.perf_counter()
            run()
            out.append((time.perf_counter() - t) * 1e3)
        return out
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        out.append(a.elapsed_time(b))
    return out


def bench_ms(fn: Callable[[int], Any], variants: int = 1, reps: int = 20, warmup: int = 3,
             graph: bool = True) -> float:
    """Median ms of ``fn(i)``; with ``graph`` the ``variants`` calls (rotating inputs) are captured in one CUDA
    graph, so launch gaps do not count; falls back to eager timing if capture fails."""
    for _ in range(warmup if DEV.type == "cuda" else 1):
        for i in range(variants):
            fn(i)
    sync()
    if graph and DEV.type == "cuda":
        try:
            g = torch.cuda.CUDAGraph()
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.graph(g, stream=s):
                for i in range(variants):
                    fn(i)
            torch.cuda.synchronize()
            return statistics.median(events_ms(g.replay, reps)) / variants
        except Exception as e:  # noqa: BLE001
            log(f"    (graph capture failed, timing eagerly: {type(e).__name__}: {e})")
    times = events_ms(lambda: [fn(i) for i in range(variants)], reps)
    return statistics.median(times) / variants


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def max_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max())


def git_commit() -> str:
    from hetserve.cli.profile import git_commit as gc

    return gc(ROOT) or "unknown"  # benchmarks/.commit in an archived tree, else git HEAD


# ---- state shared by sections ----------------------------------------------------------------------------
class Ctx:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t0 = time.perf_counter()
        self.results: dict[str, Any] = {}
        self.summary: list[str] = []
        self.copy_bps = DEFAULT_COPY_BPS
        self.matmul_flops = DEFAULT_MATMUL_FLOPS
        self.cfg = ModelConfig.from_dict(dict(LLAMA_8B))
        self.model: Any = None
        self.kv_caches: list[torch.Tensor] | None = None
        self.graphs: Any = None

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.args.budget_s - self.elapsed()

    def weight_bytes_read(self) -> int:
        """Bytes of weights a step reads: every parameter except the embedding table (only gathered rows)."""
        assert self.model is not None
        total = sum(p.numel() * p.element_size() for p in self.model.parameters())
        emb = self.model.model.embed_tokens.weight
        return total - (emb.numel() * emb.element_size() if self.model.lm_head is not None else 0)

    def kv_bytes_per_token(self) -> int:
        return self.cfg.kv_bytes_per_token("bfloat16")


def make_paged(chunks: list[tuple[int, int]], dtype: torch.dtype | None = None, seed: int = 0,
               pool_blocks: int | None = None, num_variants: int = 1) -> dict[str, Any]:
    """Random paged KV for sequences ``(cached, new)``; ``num_variants`` disjoint block-table sets (to rotate
    inputs past L2). The new tokens' K/V are already in the cache."""
    dtype = dtype or BF16
    g = torch.Generator(device=DEV).manual_seed(seed)
    need = sum(-(-(a + b) // BLOCK) for a, b in chunks)
    nb = max(pool_blocks or 0, need * num_variants + 1)
    kv = torch.randn(2, nb, BLOCK, KVH, D, device=DEV, dtype=dtype, generator=g)
    perm = torch.randperm(nb - 1, device=DEV, generator=g) + 1
    tables = []
    width = max(-(-(a + b) // BLOCK) for a, b in chunks)
    for v in range(num_variants):
        rows, off = [], v * need
        for a, b in chunks:
            k = -(-(a + b) // BLOCK)
            row = perm[off : off + k]
            off += k
            rows.append(torch.nn.functional.pad(row, (0, width - k)))
        tables.append(torch.stack(rows).to(torch.int32))
    new = [b for _, b in chunks]
    qsl = torch.tensor([0] + list(torch.tensor(new).cumsum(0).tolist()), dtype=torch.int32, device=DEV)
    seq_lens = torch.tensor([a + b for a, b in chunks], dtype=torch.int32, device=DEV)
    q = torch.randn(sum(new), H, D, device=DEV, dtype=dtype, generator=g)
    return {"kv": kv, "tables": tables, "qsl": qsl, "seq_lens": seq_lens, "q": q, "decode": max(new) == 1}
