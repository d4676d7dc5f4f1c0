#!/usr/bin/env python
"""GPU check and timing of the single-device fast path (Triton kernels, fused model, CUDA graphs, runner).

    python benchmarks/gpu_kernels.py            # everything, < 4 min on an H100
    python benchmarks/gpu_kernels.py --sections kernels,attention --budget-s 120

Sections (each fails soft: an exception is printed and recorded, the rest still runs):
  calibrate   copy bandwidth (2 GiB device copy, read+write) and bf16 8192^3 matmul rate
  kernels     every Triton kernel against its torch reference on Llama-8B shapes (bf16; max and relative error)
  attention   decode attention (batch 1..256, ctx 1k/4k; KV bandwidth) and prefill attention (512..8k; TFLOP/s,
              next to torch SDPA), CUDA-event medians of 20 after warmup, inputs rotated past L2
  model       8B-shaped random bf16 model on the GPU: fused path vs the reference path, graph replay vs eager
  decode      full decode step (forward + logits + argmax) at batch 1/8/32/64/128/256 x ctx 1k/4k, with and
              without CUDA graphs; bandwidth utilisation = (weights read + KV read) / time / copy bandwidth
  prefill     one sequence of 512/2k/4k/8k tokens; TFLOP/s and utilisation against the measured matmul rate
  profile     kernel-level time split (torch.profiler) of a decode step (batch 1 and 64, ctx 1k) and a 4k prefill
  engine      scheduler + runner (CUDA graphs, greedy fast path) over the 300 Azure-conv requests in
              tests/data (random prompt ids, forced output lengths): output tok/s and host-time split
  tune        a few alternative attention tile configs (decode and prefill), to pick defaults

Writes JSON to $OUT/gpu_kernels.json when $OUT is set, else benchmarks/results/gpu_kernels-<time>.json, and
prints a short table last.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hetserve.core.model_config import ModelConfig
from hetserve.engine.attention import AttentionMetadata, TritonAttentionBackend
from hetserve.kernels.attention import paged_attention, paged_attention_torch, write_kv_cache

ALL_SECTIONS = ["calibrate", "kernels", "attention", "model", "decode", "prefill", "profile", "engine", "tune"]
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
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=5, check=False).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


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


# ---- sections --------------------------------------------------------------------------------------------
def section_calibrate(c: Ctx) -> dict[str, Any]:
    n = 2**30 // 2 if not SMOKE else 2**20
    mm = 8192 if not SMOKE else 256
    bufs = [torch.randn(n, device=DEV, dtype=BF16), torch.empty(n, device=DEV, dtype=BF16)]
    ms = bench_ms(lambda i: bufs[1].copy_(bufs[0]), graph=False, reps=10)
    c.copy_bps = 2 * n * 2 / (ms * 1e-3)
    mats = [torch.randn(mm, mm, device=DEV, dtype=BF16) for _ in range(2)]
    ms_mm = bench_ms(lambda i: mats[0] @ mats[1], graph=False, reps=10)
    c.matmul_flops = 2 * mm**3 / (ms_mm * 1e-3)
    bufs.clear()
    mats.clear()
    empty_cache()
    c.summary.append(f"calibrate: copy {c.copy_bps / 1e9:.0f} GB/s, bf16 matmul {c.matmul_flops / 1e12:.0f} TFLOP/s")
    return {"copy_gb_s": c.copy_bps / 1e9, "matmul_tflops": c.matmul_flops / 1e12}


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


def section_kernels(c: Ctx) -> dict[str, Any]:
    from hetserve.engine.model.layers import RotaryEmbedding
    from hetserve.kernels.activation import silu_and_mul
    from hetserve.kernels.norm import fused_add_rms_norm, rms_norm, rms_norm_torch
    from hetserve.kernels.rotary import apply_rotary_, rotary_and_store_kv, rotary_torch

    out: dict[str, Any] = {}
    g = torch.Generator(device=DEV).manual_seed(0)
    T = 333
    x = torch.randn(T, 4096, device=DEV, dtype=BF16, generator=g)
    r = torch.randn(T, 4096, device=DEV, dtype=BF16, generator=g)
    w = (1 + 0.1 * torch.randn(4096, device=DEV, generator=g)).to(BF16)
    out["rms_norm"] = rel_err(rms_norm(x, w, 1e-5), rms_norm_torch(x.float(), w.float(), 1e-5))
    out["rms_norm_max_abs"] = max_err(rms_norm(x, w, 1e-5), rms_norm_torch(x.float(), w.float(), 1e-5))
    r2 = r.clone()
    y = fused_add_rms_norm(x, r2, w, 1e-5)
    s = (x.float() + r.float()).to(BF16)
    out["fused_add_rms_norm"] = rel_err(y, rms_norm_torch(s.float(), w.float(), 1e-5))
    out["fused_add_residual_exact"] = bool(torch.equal(r2, s))
    gu = torch.randn(T, 2 * 14336, device=DEV, dtype=BF16, generator=g)
    ref = torch.nn.functional.silu(gu[:, :14336].float()) * gu[:, 14336:].float()
    out["silu_and_mul"] = rel_err(silu_and_mul(gu), ref)
    out["silu_and_mul_max_abs"] = max_err(silu_and_mul(gu), ref)
    rot = RotaryEmbedding(D, 500000.0, LLAMA_8B["rope_scaling"], 131072)
    cs = rot.cos_sin_cache(DEV)
    qkv = torch.randn(T, (H + 2 * KVH) * D, device=DEV, dtype=BF16, generator=g)
    q, k, v = qkv.split([H * D, KVH * D, KVH * D], -1)
    q, k, v = q.view(T, H, D), k.view(T, KVH, D), v.view(T, KVH, D)
    pos = torch.randint(0, 131072, (T,), device=DEV, generator=g)
    hq, hk = rot(pos, q.float(), k.float())  # HF formula in fp32
    tq, _ = rotary_torch(q.float(), k.float(), pos, cs)
    qq, kk = q.clone(), k.clone()
    apply_rotary_(qq, kk, pos, cs)
    out["rotary_q_vs_hf_fp32"] = rel_err(qq, hq)
    out["rotary_k_vs_hf_fp32"] = rel_err(kk, hk)
    out["rotary_ref_vs_hf_fp32"] = rel_err(tq, hq)
    out["rotary_q_max_abs"] = max_err(qq, hq)
    cache = torch.zeros(2, 64, BLOCK, KVH, D, device=DEV, dtype=BF16)
    slots = torch.randperm(64 * BLOCK, device=DEV, generator=g)[:T]
    slots[::7] = -1
    ref_cache = torch.zeros_like(cache)
    write_kv_cache(kk, v, ref_cache, slots, impl="torch")
    q3, k3 = q.clone(), k.clone()
    rotary_and_store_kv(q3, k3, v, pos, cs, cache, slots)
    out["rotary_and_store_kv_cache_exact"] = bool(torch.equal(cache, ref_cache))
    cache2 = torch.zeros_like(cache)
    write_kv_cache(kk, v, cache2, slots)
    out["write_kv_cache_exact"] = bool(torch.equal(cache2, ref_cache))
    # paged attention, bf16 kernel vs fp32 torch reference on the same (bf16) inputs
    for name, chunks in [("prefill_mixed", [(0, 300), (200, 77), (1000, 1), (0, 129), (37, 513)]),
                         ("decode_b8", [(int(n), 1) for n in torch.randint(1, 5000, (8,)).tolist()]),
                         ("decode_b1_4k", [(4095, 1)])]:
        p = make_paged(chunks, seed=len(name))
        args = (p["q"], p["kv"], p["qsl"], p["seq_lens"], p["tables"][0], D**-0.5)
        ref = paged_attention_torch(p["q"].float(), p["kv"].float(), *args[2:])
        got = paged_attention(*args, decode=p["decode"])
        out[f"attention_{name}"] = rel_err(got, ref)
        out[f"attention_{name}_max_abs"] = max_err(got, ref)
        if p["decode"]:
            for splits in (1, 7):
                got = paged_attention(*args, decode=True, num_splits=splits)
                out[f"attention_{name}_splits{splits}"] = rel_err(got, ref)
        ref_w = paged_attention_torch(p["q"].float(), p["kv"].float(), *args[2:], sliding_window=100)
        out[f"attention_{name}_window100"] = rel_err(paged_attention(*args, sliding_window=100,
                                                                      decode=p["decode"]), ref_w)
    rel = {k: v for k, v in out.items() if isinstance(v, float) and not k.endswith("_max_abs")}
    bad = [k for k, v in out.items() if isinstance(v, bool) and not v] + [k for k, v in rel.items() if not v < 2e-2]
    out["failures"] = bad
    worst = max(rel.values())
    c.summary.append(f"kernels: {'all ok' if not bad else 'FAIL ' + ','.join(bad)} (worst rel err {worst:.1e})")
    for k2, v2 in out.items():
        log(f"    {k2}: {v2}")
    return out


def section_attention(c: Ctx) -> dict[str, Any]:
    res: dict[str, Any] = {"decode": [], "prefill": []}
    per_tok = 2 * KVH * D * 2  # K and V bytes of one token in one layer
    for ctx in CTXS:
        for b in DECODE_BATCHES:
            need_bytes = b * ctx * per_tok
            variants = max(1, min(64, (256 * 2**20) // need_bytes))  # >= 256 MiB touched: past the 50 MB L2
            p = make_paged([(ctx - 1, 1)] * b, num_variants=variants, seed=b + ctx)
            out = torch.empty_like(p["q"])

            def run(i: int, p: dict[str, Any] = p, out: torch.Tensor = out) -> None:
                paged_attention(p["q"], p["kv"], p["qsl"], p["seq_lens"], p["tables"][i], D**-0.5, decode=True,
                                out=out)

            ms = bench_ms(run, variants=variants)
            gbs = need_bytes / (ms * 1e-3) / 1e9
            res["decode"].append({"batch": b, "ctx": ctx, "us": ms * 1e3, "kv_gb_s": gbs,
                                  "kv_bw_util": gbs * 1e9 / c.copy_bps, "rotated_variants": variants})
            log(f"    decode attn b={b:3d} ctx={ctx}: {ms * 1e3:8.1f} us  {gbs:7.0f} GB/s")
            del p, out
        empty_cache()
    for L in ATTN_PREFILL_LENS:
        p = make_paged([(0, L)], seed=L)
        flops = 2 * L * L * D * H  # causal: QK^T and PV, half of each
        ms = bench_ms(lambda i, p=p: paged_attention(p["q"], p["kv"], p["qsl"], p["seq_lens"], p["tables"][0],
                                                     D**-0.5), reps=10)
        entry = {"tokens": L, "ms": ms, "tflops": flops / (ms * 1e-3) / 1e12}
        try:
            qh = p["q"].transpose(0, 1).unsqueeze(0)
            kh = torch.randn(1, H, L, D, device=DEV, dtype=BF16)
            vh = torch.randn_like(kh)
            sd = bench_ms(lambda i, qh=qh, kh=kh, vh=vh: torch.nn.functional.scaled_dot_product_attention(
                qh, kh, vh, is_causal=True), reps=10)
            entry["sdpa_ms"] = sd
            entry["sdpa_tflops"] = flops / (sd * 1e-3) / 1e12
        except Exception as e:  # noqa: BLE001
            entry["sdpa_error"] = repr(e)
        res["prefill"].append(entry)
        log(f"    prefill attn {L}: {ms:.3f} ms {entry['tflops']:.0f} TFLOP/s (torch SDPA "
            f"{entry.get('sdpa_tflops', float('nan')):.0f})")
        del p
    empty_cache()
    # a mixed step as the scheduler builds it: running decodes first, then a prefill chunk
    n_dec = DECODE_BATCHES[-1] - 1
    chunks = [(CTXS[0] - 1, 1)] * n_dec + [(0, ATTN_PREFILL_LENS[2])]
    p = make_paged(chunks, seed=5)
    for label, prefix in (("one_launch_prefill_tiles", None), ("decode_prefix_split", (n_dec, n_dec))):
        ms = bench_ms(lambda i, p=p, prefix=prefix: paged_attention(
            p["q"], p["kv"], p["qsl"], p["seq_lens"], p["tables"][0], D**-0.5, decode_prefix=prefix), reps=10)
        res.setdefault("mixed", []).append({"decodes": n_dec, "ctx": CTXS[0], "prefill_tokens": ATTN_PREFILL_LENS[2],
                                            "variant": label, "ms": ms})
        log(f"    mixed step attn ({n_dec} decodes @{CTXS[0]} + {ATTN_PREFILL_LENS[2]} prefill), {label}: {ms:.3f} ms")
    del p
    empty_cache()
    d = {(e["batch"], e["ctx"]): e for e in res["decode"]}
    p4 = res["prefill"][3]
    short, long = CTXS
    b1, b64, b256 = DECODE_BATCHES[0], DECODE_BATCHES[3], DECODE_BATCHES[-1]
    c.summary.append(
        f"attention: decode b{b1}/{short} {d[(b1, short)]['us']:.0f} us, b{b64}/{long} "
        f"{d[(b64, long)]['kv_bw_util'] * 100:.0f}% bw, b{b256}/{long} "
        f"{d[(b256, long)]['kv_bw_util'] * 100:.0f}% bw; "
        f"prefill {p4['tokens']} {p4['tflops']:.0f} TFLOP/s (SDPA {p4.get('sdpa_tflops', float('nan')):.0f}); mixed "
        + " vs ".join(f"{e['variant']} {e['ms']:.2f} ms" for e in res["mixed"]))
    return res


def _eager_graphs_class() -> Any:
    from hetserve.engine.cuda_graphs import CudaGraphRunner

    class EagerGraphs(CudaGraphRunner):
        """--cpu-smoke stand-in: the graph runner's buffers, each replay run eagerly."""

        def capture(self) -> None:
            self.graphs = dict.fromkeys(self.batch_sizes)  # type: ignore[arg-type]

        def replay(self, batch: int) -> torch.Tensor:
            with torch.inference_mode():
                return self._run(batch)

    return EagerGraphs


def _setup_model(c: Ctx) -> None:
    if c.model is not None:
        return
    from hetserve.engine.cuda_graphs import CudaGraphRunner
    from hetserve.engine.model.loader import init_random_model

    t = time.perf_counter()
    c.model = init_random_model(c.cfg, DEV, BF16, seed=0)
    sync()
    log(f"    8B random model on GPU in {time.perf_counter() - t:.1f} s; fused={c.model.projections_fused()}")
    per_block = c.cfg.num_hidden_layers * 2 * BLOCK * KVH * D * BF16.itemsize
    if DEV.type == "cuda":
        free, _ = torch.cuda.mem_get_info()
        num_blocks = int((free - 6 * 2**30) // per_block)
    else:
        num_blocks = 600
    c.kv_caches = [torch.empty(2, num_blocks, BLOCK, KVH, D, device=DEV, dtype=BF16)
                   for _ in range(c.cfg.num_hidden_layers)]
    for kv in c.kv_caches:
        kv.normal_()
    c.results.setdefault("setup", {})["kv_pool_blocks"] = num_blocks
    log(f"    KV pool {num_blocks} blocks ({num_blocks * per_block / 2**30:.1f} GiB)")
    graph_cls = CudaGraphRunner if DEV.type == "cuda" else _eager_graphs_class()
    c.graphs = graph_cls(c.model, c.kv_caches, TritonAttentionBackend(DEV), DEV, list(DECODE_BATCHES),
                         max_blocks_per_seq=8192 // BLOCK + 1)
    c.graphs.capture()
    c.results["setup"]["graph_capture_s"] = c.graphs.capture_s
    log(f"    captured {len(c.graphs.graphs)} graphs in {c.graphs.capture_s:.1f} s")


def decode_tables(c: Ctx, batch: int, ctx: int) -> tuple[torch.Tensor, bool]:
    """Block tables for ``batch`` sequences of ``ctx`` tokens; when the pool is too small, sequences share
    blocks with a large stride (each block's re-use is far apart in time, so L2 does not help)."""
    assert c.kv_caches is not None
    pool = c.kv_caches[0].shape[1] - 1
    need = -(-ctx // BLOCK)
    aliased = batch * need > pool
    stride = need if not aliased else max(1, (pool - need) // max(1, batch - 1))
    base = torch.arange(batch, device=DEV)[:, None] * stride + torch.arange(need, device=DEV)[None, :]
    return (base % pool + 1).to(torch.int32), aliased


def fill_decode(c: Ctx, batch: int, ctx: int) -> tuple[AttentionMetadata, torch.Tensor, bool]:
    """Write a decode step (position ctx-1 for each sequence) into the graph runner's static buffers."""
    gr = c.graphs
    tables, aliased = decode_tables(c, batch, ctx)
    mb = gr.max_batch
    gr.ids_pos_slots[0, :batch] = torch.randint(0, c.cfg.vocab_size, (batch,), device=DEV)
    gr.ids_pos_slots[1, :batch] = ctx - 1
    last = tables[:, (ctx - 1) // BLOCK].long()
    gr.ids_pos_slots[2, :batch] = last * BLOCK + (ctx - 1) % BLOCK
    gr.qsl_seq_lens[: batch + 1] = torch.arange(batch + 1, device=DEV, dtype=torch.int32)
    gr.qsl_seq_lens[mb + 1 : mb + 1 + batch] = ctx
    gr.block_tables[:batch, : tables.shape[1]] = tables
    meta = gr.metadata(batch, max_seq_len=ctx)
    return meta, gr.input_ids(batch), aliased


def section_model(c: Ctx) -> dict[str, Any]:
    _setup_model(c)
    from hetserve.engine.attention import TorchRefBackend

    out: dict[str, Any] = {}
    m = c.model
    assert c.kv_caches is not None
    # fused path (Triton) vs reference path (torch ops + torch_ref attention), same weights, 3 sequences
    p = make_paged([(0, 96), (64, 33), (150, 1)], seed=3)
    n = p["q"].shape[0]
    cached = [0, 64, 150]
    table = p["tables"][0]
    pos, slots = [], []
    for s, (a, b) in enumerate([(0, 96), (64, 33), (150, 1)]):
        for t in range(a, a + b):
            pos.append(t)
            slots.append(int(table[s, t // BLOCK]) * BLOCK + t % BLOCK)
    meta = AttentionMetadata(n, 3, torch.tensor(pos, device=DEV), torch.tensor(slots, device=DEV), p["qsl"],
                             p["seq_lens"], table, 96, 151, p["qsl"].tolist(), p["seq_lens"].tolist())
    del cached
    ids = torch.randint(0, c.cfg.vocab_size, (n,), device=DEV)
    nb = p["kv"].shape[1]
    base = [torch.randn(2, nb, BLOCK, KVH, D, device=DEV, dtype=BF16) for _ in range(c.cfg.num_hidden_layers)]
    with torch.inference_mode():
        caches = [x.clone() for x in base]
        m.fused_path = True
        try:
            fused = m.compute_logits(m(ids, meta.positions, caches, meta, TritonAttentionBackend(DEV)))
        finally:
            m.fused_path = None
        m.fused_path = False
        try:
            caches = [x.clone() for x in base]
            ref = m.compute_logits(m(ids, meta.positions, caches, meta, TorchRefBackend(DEV)))
        finally:
            m.fused_path = None
    out["fused_vs_reference_logits_rel_err"] = rel_err(fused, ref)
    out["fused_vs_reference_top1_agree"] = float((fused.argmax(-1) == ref.argmax(-1)).float().mean())
    del base, caches, fused, ref
    # graph replay vs eager on the same static inputs (batch 8, ctx 1000; bucket 8)
    with torch.inference_mode():
        meta8, ids8, _ = fill_decode(c, 8, 1000)
        replay = c.graphs.replay(8)[:8].clone()
        eager = m(ids8, meta8.positions, c.kv_caches, meta8, TritonAttentionBackend(DEV))
    out["graph_vs_eager_rel_err"] = rel_err(replay, eager)
    ok = out["fused_vs_reference_logits_rel_err"] < 3e-2 and out["graph_vs_eager_rel_err"] < 1e-3
    out["pass"] = ok
    c.summary.append(f"model: fused vs reference logits rel err {out['fused_vs_reference_logits_rel_err']:.1e} "
                     f"(top-1 agree {out['fused_vs_reference_top1_agree'] * 100:.0f}%), graph vs eager "
                     f"{out['graph_vs_eager_rel_err']:.1e} -> {'ok' if ok else 'CHECK'}")
    log(f"    {out}")
    return out


def section_decode(c: Ctx) -> dict[str, Any]:
    _setup_model(c)
    m = c.model
    backend = TritonAttentionBackend(DEV)
    wbytes = c.weight_bytes_read()
    wbytes_all = sum(p.numel() * p.element_size() for p in m.parameters())  # GPU.md's 16.1 GB
    kvt = c.kv_bytes_per_token()
    pts = []
    for ctx in CTXS:
        for b in DECODE_BATCHES:
            with torch.inference_mode():
                meta, ids, aliased = fill_decode(c, b, ctx)

                def graph_step(i: int, b: int = b) -> None:
                    h = c.graphs.replay(b)
                    m.compute_logits(h[:b], float32=False).argmax(-1)

                def eager_step(i: int, meta: AttentionMetadata = meta, ids: torch.Tensor = ids, b: int = b) -> None:
                    h = m(ids, meta.positions, c.kv_caches, meta, backend)
                    m.compute_logits(h[:b], float32=False).argmax(-1)

                g_ms = bench_ms(graph_step, graph=False, reps=20)
                e_ms = bench_ms(eager_step, graph=False, reps=10)
            moved = wbytes + b * ctx * kvt
            pt = {"batch": b, "ctx": ctx, "graph_ms": g_ms, "eager_ms": e_ms, "bytes_read": moved,
                  "bw_util_graph": moved / (g_ms * 1e-3) / c.copy_bps,
                  "bw_util_eager": moved / (e_ms * 1e-3) / c.copy_bps, "kv_aliased": aliased,
                  "bw_util_graph_all_weights": (wbytes_all + b * ctx * kvt) / (g_ms * 1e-3) / c.copy_bps,
                  "tok_s_graph": b / (g_ms * 1e-3)}
            pts.append(pt)
            log(f"    decode step b={b:3d} ctx={ctx}: graph {g_ms:7.2f} ms ({pt['bw_util_graph'] * 100:3.0f}%)  "
                f"eager {e_ms:7.2f} ms ({pt['bw_util_eager'] * 100:3.0f}%){'  [KV aliased]' if aliased else ''}")
    by = {(p["batch"], p["ctx"]): p for p in pts}
    for b in (DECODE_BATCHES[0], DECODE_BATCHES[3]):
        for ctx in CTXS:
            p = by[(b, ctx)]
            goal = 85 if b == 1 else 70
            c.summary.append(f"decode b={b:3d} ctx={ctx}: {p['graph_ms']:.2f} ms, {p['bw_util_graph'] * 100:.0f}% of "
                             f"copy bw ({p['bw_util_graph_all_weights'] * 100:.0f}% counting all weights incl. "
                             f"embedding) (goal >= {goal}%), eager {p['eager_ms']:.2f} ms")
    short, long = CTXS
    c.summary.append(f"decode graph ms by batch (ctx {short} | {long}): " + ", ".join(
        f"{b}: {by[(b, short)]['graph_ms']:.1f}|{by[(b, long)]['graph_ms']:.1f}" for b in DECODE_BATCHES))
    return {"points": pts, "weight_bytes_read": wbytes, "weight_bytes_all": wbytes_all, "kv_bytes_per_token": kvt,
            "method": "graph replay (or eager forward) + lm_head on the batch rows + argmax; CUDA events; median"}


def prefill_meta(L: int, cached: int = 0) -> AttentionMetadata:
    n_blocks = -(-(cached + L) // BLOCK)
    table = torch.arange(1, n_blocks + 1, device=DEV, dtype=torch.int32)[None, :]
    pos = torch.arange(cached, cached + L, device=DEV)
    return AttentionMetadata(L, 1, pos, pos + BLOCK, torch.tensor([0, L], dtype=torch.int32, device=DEV),
                             torch.tensor([cached + L], dtype=torch.int32, device=DEV), table, L, cached + L,
                             [0, L], [cached + L])


def section_prefill(c: Ctx) -> dict[str, Any]:
    _setup_model(c)
    m = c.model
    backend = TritonAttentionBackend(DEV)
    cfg = c.cfg
    emb = cfg.vocab_size * cfg.hidden_size
    dense = cfg.num_params() - emb * (1 if cfg.tie_word_embeddings else 2)  # per-token GEMM params
    pts = []
    for L in MODEL_PREFILL_LENS:
        meta = prefill_meta(L)
        ids = torch.randint(0, cfg.vocab_size, (L,), device=DEV)

        def step(i: int, ids: torch.Tensor = ids, meta: AttentionMetadata = meta) -> None:
            h = m(ids, meta.positions, c.kv_caches, meta, backend)
            m.compute_logits(h[-1:], float32=False).argmax(-1)

        with torch.inference_mode():
            ms = bench_ms(step, graph=False, reps=5, warmup=2)
        flops = 2 * dense * L + 2 * L * L * cfg.head_dim * cfg.num_attention_heads * cfg.num_hidden_layers \
            + 2 * cfg.hidden_size * cfg.vocab_size
        pt = {"tokens": L, "ms": ms, "tflops": flops / (ms * 1e-3) / 1e12,
              "util": flops / (ms * 1e-3) / c.matmul_flops, "flops": flops, "tok_s": L / (ms * 1e-3)}
        pts.append(pt)
        log(f"    prefill {L}: {ms:.1f} ms, {pt['tflops']:.0f} TFLOP/s ({pt['util'] * 100:.0f}%)")
    p4 = pts[2]
    c.summary.append(f"prefill {p4['tokens']}: {p4['ms']:.1f} ms, {p4['tflops']:.0f} TFLOP/s = {p4['util'] * 100:.0f}% of "
                     f"{c.matmul_flops / 1e12:.0f} (goal >= 60%); " + ", ".join(
                         f"{p['tokens']}: {p['util'] * 100:.0f}%" for p in pts))
    return {"points": pts, "flop_count": "2*dense_params*L + causal attention 2*L^2*d*heads*layers + lm_head 1 row"}


def _kernel_table(prof: Any, top: int = 12) -> list[dict[str, Any]]:
    rows = []
    for e in prof.key_averages():
        attrs = ("self_device_time_total", "self_cuda_time_total") if DEV.type == "cuda" else ("self_cpu_time_total",)
        t = next((getattr(e, a) for a in attrs if hasattr(e, a)), 0.0)
        if t and t > 0:
            rows.append({"name": e.key[:90], "total_us": float(t), "count": int(e.count)})
    rows.sort(key=lambda r: -r["total_us"])
    total = sum(r["total_us"] for r in rows) or 1.0
    for r in rows:
        r["share"] = r["total_us"] / total
    return rows[:top]


def section_profile(c: Ctx) -> dict[str, Any]:
    _setup_model(c)
    from torch.profiler import ProfilerActivity, profile

    m = c.model
    backend = TritonAttentionBackend(DEV)
    out: dict[str, Any] = {}
    cases: list[tuple[str, Callable[[], Any]]] = []
    # the largest batch first: the static buffers then still hold the smaller batch's rows as a prefix
    for b in (DECODE_BATCHES[3], DECODE_BATCHES[0]):
        meta, ids, _ = fill_decode(c, b, CTXS[0])
        ids = ids.clone()
        cases.append((f"decode_b{b}_ctx{CTXS[0]}_eager", lambda ids=ids, meta=meta, b=b: m.compute_logits(
            m(ids, meta.positions, c.kv_caches, meta, backend)[:b], float32=False).argmax(-1)))
    L = MODEL_PREFILL_LENS[2]
    pm = prefill_meta(L)
    pid = torch.randint(0, c.cfg.vocab_size, (L,), device=DEV)
    cases.append((f"prefill_{L}", lambda: m.compute_logits(m(pid, pm.positions, c.kv_caches, pm, backend)[-1:])))
    activity = ProfilerActivity.CUDA if DEV.type == "cuda" else ProfilerActivity.CPU
    with torch.inference_mode():
        for name, fn in cases:
            fn()
            sync()
            with profile(activities=[activity]) as prof:
                for _ in range(3):
                    fn()
                sync()
            out[name] = _kernel_table(prof)
            log(f"    {name}: " + "; ".join(f"{r['name'][:40]} {r['share'] * 100:.0f}%" for r in out[name][:6]))
    return out


def section_engine(c: Ctx) -> dict[str, Any]:
    _setup_model(c)
    from hetserve.core.config import CacheConfig, DeviceConfig, EngineConfig, SchedulerConfig
    from hetserve.core.request import Request
    from hetserve.core.sampling_params import SamplingParams
    from hetserve.engine.runner import ModelRunner
    from hetserve.engine.sched.scheduler import Scheduler

    # the decode section's KV pool and graphs go; the runner sizes its own pool from a profiling forward
    c.kv_caches = None
    c.graphs = None
    empty_cache()
    max_batched = c.args.max_num_batched_tokens
    config = EngineConfig(
        model="random-llama-8b",
        cache=CacheConfig(block_size=BLOCK, gpu_memory_utilization=0.9, enable_prefix_caching=False),
        scheduler=SchedulerConfig(max_num_batched_tokens=max_batched, max_num_seqs=256, max_model_len=8192),
        device=DeviceConfig(device=DEV.type, dtype="bfloat16" if BF16 == torch.bfloat16 else "float32"),
    )
    t = time.perf_counter()
    runner = ModelRunner(config, model=c.model, model_config=c.cfg)
    setup_s = time.perf_counter() - t
    log(f"    runner ready in {setup_s:.1f} s: {runner.num_kv_blocks} KV blocks, graphs "
        f"{len(runner.graphs.graphs) if runner.graphs else 0}")
    sched = Scheduler(config.scheduler, config.cache, runner.num_kv_blocks, 8192)
    with open(ROOT / "tests/data/azure_conv_excerpt.csv") as f:
        rows = list(csv.DictReader(f))
    g = torch.Generator().manual_seed(0)
    reqs = []
    max_in, max_out = (8000, 8192) if not SMOKE else (48, 6)
    for i, r in enumerate(rows[: c.args.num_requests]):
        n_in = max(1, min(int(r["ContextTokens"]), max_in))
        n_out = max(1, min(int(r["GeneratedTokens"]), 8192 - n_in, max_out))
        ids = torch.randint(0, c.cfg.vocab_size, (n_in,), generator=g).tolist()
        reqs.append(Request(f"r{i}", ids, SamplingParams(temperature=0.0, max_tokens=n_out, ignore_eos=True)))
    # warm-up: a few tiny requests (compiles the prefill-shaped kernels outside the timed region)
    for j in range(4):
        sched.add_request(Request(f"w{j}", [1 + j] * 40, SamplingParams(temperature=0.0, max_tokens=4,
                                                                        ignore_eos=True)))
    while sched.has_unfinished():
        so = sched.schedule()
        sched.update_from_output(so, runner.execute(so))
    for r in reqs:
        sched.add_request(r)
    cap = max(10.0, min(c.args.engine_cap_s, c.left() - 30))
    t_sched = t_exec = t_upd = 0.0
    steps = graph_steps = out_tokens = 0
    start = time.perf_counter()
    partial = False
    while sched.has_unfinished():
        a = time.perf_counter()
        so = sched.schedule()
        b = time.perf_counter()
        ro = runner.execute(so)
        d = time.perf_counter()
        outs = sched.update_from_output(so, ro)
        e = time.perf_counter()
        t_sched += b - a
        t_exec += d - b
        t_upd += e - d
        steps += 1
        if so.scheduled and all(s.num_tokens == 1 for s in so.scheduled) and runner.graphs is not None \
                and runner.graphs.bucket(len(so.scheduled)) is not None:
            graph_steps += 1
        out_tokens += sum(len(o.new_token_ids) for o in outs)
        if e - start > cap:
            partial = True
            break
    wall = time.perf_counter() - start
    res = {"num_requests": len(reqs), "prompt_tokens": sum(len(r.prompt_token_ids) for r in reqs),
           "output_tokens": out_tokens, "wall_s": wall, "output_tok_s": out_tokens / wall, "steps": steps,
           "graph_steps": graph_steps, "schedule_s": t_sched, "execute_s": t_exec, "update_s": t_upd,
           "partial": partial, "runner_setup_s": setup_s, "kv_blocks": runner.num_kv_blocks,
           "max_num_batched_tokens": max_batched, "max_num_seqs": 256,
           "note": "random prompt ids with Azure-conv lengths from tests/data (300 requests); greedy, ignore_eos"}
    log(f"    {res}")
    c.summary.append(f"engine: {out_tokens / wall:.0f} output tok/s over {len(reqs)} reqs{' (PARTIAL)' if partial else ''}"
                     f" in {wall:.1f} s, {steps} steps ({graph_steps} graph); host sched {t_sched:.1f} s, "
                     f"update {t_upd:.1f} s (goal >= 12.5k on the full 1000-request run)")
    del runner, sched
    empty_cache()
    return res


def section_tune(c: Ctx) -> dict[str, Any]:
    out: dict[str, Any] = {"decode": [], "prefill": []}
    decode_cfgs = [{}, {"BLOCK_N": 128, "num_stages": 2}, {"BLOCK_N": 32, "num_stages": 4},
                   {"BLOCK_N": 64, "num_stages": 4}, {"BLOCK_N": 64, "num_warps": 8}]
    per_tok = 2 * KVH * D * 2
    for b, ctx in ((DECODE_BATCHES[0], CTXS[-1]), (DECODE_BATCHES[3], CTXS[-1])):
        variants = max(1, min(64, (256 * 2**20) // (b * ctx * per_tok)))
        p = make_paged([(ctx - 1, 1)] * b, num_variants=variants, seed=7)
        for cfg in decode_cfgs:
            if c.left() < 20:
                break
            try:
                ms = bench_ms(lambda i, p=p, cfg=cfg: paged_attention(
                    p["q"], p["kv"], p["qsl"], p["seq_lens"], p["tables"][i], D**-0.5, decode=True,
                    launch_config=cfg), variants=variants)
                out["decode"].append({"batch": b, "ctx": ctx, "config": cfg or "default", "us": ms * 1e3,
                                      "kv_gb_s": b * ctx * per_tok / (ms * 1e-3) / 1e9})
            except Exception as e:  # noqa: BLE001
                out["decode"].append({"batch": b, "ctx": ctx, "config": cfg, "error": repr(e)[:200]})
            log(f"    {out['decode'][-1]}")
        del p
    prefill_cfgs = [{}, {"num_stages": 3}, {"BLOCK_Q": 16, "num_warps": 4, "num_stages": 3},
                    {"BLOCK_N": 32, "num_stages": 3}, {"num_warps": 4}]
    L = ATTN_PREFILL_LENS[3]
    p = make_paged([(0, L)], seed=9)
    flops = 2 * L * L * D * H
    for cfg in prefill_cfgs:
        if c.left() < 15:
            break
        try:
            ms = bench_ms(lambda i, cfg=cfg: paged_attention(p["q"], p["kv"], p["qsl"], p["seq_lens"], p["tables"][0],
                                                             D**-0.5, launch_config=cfg), reps=10)
            out["prefill"].append({"tokens": L, "config": cfg or "default", "ms": ms,
                                   "tflops": flops / (ms * 1e-3) / 1e12})
        except Exception as e:  # noqa: BLE001
            out["prefill"].append({"tokens": L, "config": cfg, "error": repr(e)[:200]})
        log(f"    {out['prefill'][-1]}")
    return out


SECTIONS: dict[str, Callable[[Ctx], dict[str, Any]]] = {
    "calibrate": section_calibrate, "kernels": section_kernels, "attention": section_attention,
    "model": section_model, "decode": section_decode, "prefill": section_prefill, "profile": section_profile,
    "engine": section_engine, "tune": section_tune,
}
# a section starts only if this many seconds of the budget are left
MIN_LEFT_S = {"calibrate": 5, "kernels": 10, "attention": 20, "model": 30, "decode": 30, "prefill": 15,
              "profile": 15, "engine": 40, "tune": 20}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default=",".join(ALL_SECTIONS))
    ap.add_argument("--budget-s", type=float, default=225.0, help="wall-clock budget; later sections are skipped")
    ap.add_argument("--num-requests", type=int, default=300)
    ap.add_argument("--engine-cap-s", type=float, default=60.0)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU: checks the script only")
    args = ap.parse_args()
    if args.cpu_smoke:
        use_cpu_smoke()
        args.num_requests = min(args.num_requests, 6)
        args.budget_s = max(args.budget_s, 1200.0)
    elif not torch.cuda.is_available():
        print("needs a CUDA GPU (or --cpu-smoke)")
        return 2
    c = Ctx(args)
    if DEV.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        dev_info: dict[str, Any] = {"device": props.name, "sms": props.multi_processor_count,
                                    "memory_gib": props.total_memory / 2**30}
    else:
        dev_info = {"device": "cpu (smoke)", "sms": 0, "memory_gib": 0}
    info = {**dev_info, "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "git_commit": git_commit(), "command": " ".join(sys.argv)}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    log(f"device {info}")
    c.results["info"] = info
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    for name in ALL_SECTIONS:
        if name not in wanted:
            continue
        if c.left() < MIN_LEFT_S[name]:
            log(f"== {name}: skipped ({c.left():.0f} s of budget left)")
            c.results[name] = {"skipped": "budget"}
            c.summary.append(f"{name}: skipped (budget)")
            continue
        log(f"== {name} (t={c.elapsed():.0f} s)")
        t = time.perf_counter()
        try:
            c.results[name] = SECTIONS[name](c)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            c.results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
            c.summary.append(f"{name}: ERROR {type(e).__name__}: {str(e)[:150]}")
            try:
                sync()
                empty_cache()
            except Exception as e2:  # noqa: BLE001 - a sticky CUDA error; later sections will report it too
                log(f"    (cleanup after the error failed too: {e2!r})")
        c.results.setdefault("section_s", {})[name] = time.perf_counter() - t
    c.results["summary"] = c.summary
    c.results["total_s"] = c.elapsed()
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "gpu_kernels.json" if os.environ.get("OUT") else f"gpu_kernels-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path = out_dir / name
    path.write_text(json.dumps(c.results, indent=1, default=str))
    print(f"\n==== summary ({info['device']}, {c.elapsed():.0f} s; JSON: {path}) ====")
    for line in c.summary:
        print("  " + line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
