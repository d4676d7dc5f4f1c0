"""gpu_kernels.py's kernel-level sections: calibrate (copy bandwidth, matmul rate), kernels (each Triton kernel
against its torch reference), attention (decode / prefill / mixed-step timings) and tune (attention tile configs)."""

from __future__ import annotations

from typing import Any

import gpu_kernels_common as gk
import torch
from gpu_kernels_common import BLOCK, LLAMA_8B, Ctx, bench_ms, empty_cache, log, make_paged, max_err, rel_err

from hetserve.kernels.attention import paged_attention_torch, write_kv_cache
from hetserve.kernels.attention_launch import paged_attention


def section_calibrate(c: Ctx) -> dict[str, Any]:
    n = 2**30 // 2 if not gk.SMOKE else 2**20
    mm = 8192 if not gk.SMOKE else 256
    bufs = [torch.randn(n, device=gk.DEV, dtype=gk.BF16), torch.empty(n, device=gk.DEV, dtype=gk.BF16)]
    ms = bench_ms(lambda i: bufs[1].copy_(bufs[0]), graph=False, reps=10)
    c.copy_bps = 2 * n * 2 / (ms * 1e-3)
    mats = [torch.randn(mm, mm, device=gk.DEV, dtype=gk.BF16) for _ in range(2)]
    ms_mm = bench_ms(lambda i: mats[0] @ mats[1], graph=False, reps=10)
    c.matmul_flops = 2 * mm**3 / (ms_mm * 1e-3)
    bufs.clear()
    mats.clear()
    empty_cache()
    c.summary.append(f"calibrate: copy {c.copy_bps / 1e9:.0f} GB/s, bf16 matmul {c.matmul_flops / 1e12:.0f} TFLOP/s")
    return {"copy_gb_s": c.copy_bps / 1e9, "matmul_tflops": c.matmul_flops / 1e12}


def section_kernels(c: Ctx) -> dict[str, Any]:
    from hetserve.engine.model.layers import RotaryEmbedding
    from hetserve.kernels.activation import silu_and_mul
    from hetserve.kernels.norm import fused_add_rms_norm, rms_norm, rms_norm_torch
    from hetserve.kernels.rotary import apply_rotary_, rotary_and_store_kv, rotary_torch

    out: dict[str, Any] = {}
    g = torch.Generator(device=gk.DEV).manual_seed(0)
    T = 333
    x = torch.randn(T, 4096, device=gk.DEV, dtype=gk.BF16, generator=g)
    r = torch.randn(T, 4096, device=gk.DEV, dtype=gk.BF16, generator=g)
    w = (1 + 0.1 * torch.randn(4096, device=gk.DEV, generator=g)).to(gk.BF16)
    out["rms_norm"] = rel_err(rms_norm(x, w, 1e-5), rms_norm_torch(x.float(), w.float(), 1e-5))
    out["rms_norm_max_abs"] = max_err(rms_norm(x, w, 1e-5), rms_norm_torch(x.float(), w.float(), 1e-5))
    r2 = r.clone()
    y = fused_add_rms_norm(x, r2, w, 1e-5)
    s = (x.float() + r.float()).to(gk.BF16)
    out["fused_add_rms_norm"] = rel_err(y, rms_norm_torch(s.float(), w.float(), 1e-5))
    out["fused_add_residual_exact"] = bool(torch.equal(r2, s))
    gu = torch.randn(T, 2 * 14336, device=gk.DEV, dtype=gk.BF16, generator=g)
    ref = torch.nn.functional.silu(gu[:, :14336].float()) * gu[:, 14336:].float()
    out["silu_and_mul"] = rel_err(silu_and_mul(gu), ref)
    out["silu_and_mul_max_abs"] = max_err(silu_and_mul(gu), ref)
    rot = RotaryEmbedding(gk.D, 500000.0, LLAMA_8B["rope_scaling"], 131072)
    cs = rot.cos_sin_cache(gk.DEV)
    qkv = torch.randn(T, (gk.H + 2 * gk.KVH) * gk.D, device=gk.DEV, dtype=gk.BF16, generator=g)
    q, k, v = qkv.split([gk.H * gk.D, gk.KVH * gk.D, gk.KVH * gk.D], -1)
    q, k, v = q.view(T, gk.H, gk.D), k.view(T, gk.KVH, gk.D), v.view(T, gk.KVH, gk.D)
    pos = torch.randint(0, 131072, (T,), device=gk.DEV, generator=g)
    hq, hk = rot(pos, q.float(), k.float())  # HF formula in fp32
    tq, _ = rotary_torch(q.float(), k.float(), pos, cs)
    qq, kk = q.clone(), k.clone()
    apply_rotary_(qq, kk, pos, cs)
    out["rotary_q_vs_hf_fp32"] = rel_err(qq, hq)
    out["rotary_k_vs_hf_fp32"] = rel_err(kk, hk)
    out["rotary_ref_vs_hf_fp32"] = rel_err(tq, hq)
    out["rotary_q_max_abs"] = max_err(qq, hq)
    cache = torch.zeros(2, 64, BLOCK, gk.KVH, gk.D, device=gk.DEV, dtype=gk.BF16)
    slots = torch.randperm(64 * BLOCK, device=gk.DEV, generator=g)[:T]
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
        args = (p["q"], p["kv"], p["qsl"], p["seq_lens"], p["tables"][0], gk.D**-0.5)
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
    per_tok = 2 * gk.KVH * gk.D * 2  # K and V bytes of one token in one layer
    for ctx in gk.CTXS:
        for b in gk.DECODE_BATCHES:
            need_bytes = b * ctx * per_tok
            variants = max(1, min(64, (256 * 2**20) // need_bytes))  # >= 256 MiB touched: past the 50 MB L2
            p = make_paged([(ctx - 1, 1)] * b, num_variants=variants, seed=b + ctx)
            out = torch.empty_like(p["q"])

            def run(i: int, p: dict[str, Any] = p, out: torch.Tensor = out) -> None:
                paged_attention(p["q"], p["kv"], p["qsl"], p["seq_lens"], p["tables"][i], gk.D**-0.5, decode=True,
                                out=out)

            ms = bench_ms(run, variants=variants)
            gbs = need_bytes / (ms * 1e-3) / 1e9
            res["decode"].append({"batch": b, "ctx": ctx, "us": ms * 1e3, "kv_gb_s": gbs,
                                  "kv_bw_util": gbs * 1e9 / c.copy_bps, "rotated_variants": variants})
            log(f"    decode attn b={b:3d} ctx={ctx}: {ms * 1e3:8.1f} us  {gbs:7.0f} GB/s")
            del p, out
        empty_cache()
    for L in gk.ATTN_PREFILL_LENS:
        p = make_paged([(0, L)], seed=L)
        flops = 2 * L * L * gk.D * gk.H  # causal: QK^T and PV, half of each
        ms = bench_ms(lambda i, p=p: paged_attention(p["q"], p["kv"], p["qsl"], p["seq_lens"], p["tables"][0],
                                                     gk.D**-0.5), reps=10)
        entry = {"tokens": L, "ms": ms, "tflops": flops / (ms * 1e-3) / 1e12}
        try:
            qh = p["q"].transpose(0, 1).unsqueeze(0)
            kh = torch.randn(1, gk.H, L, gk.D, device=gk.DEV, dtype=gk.BF16)
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
    n_dec = gk.DECODE_BATCHES[-1] - 1
    chunks = [(gk.CTXS[0] - 1, 1)] * n_dec + [(0, gk.ATTN_PREFILL_LENS[2])]
    p = make_paged(chunks, seed=5)
    for label, prefix in (("one_launch_prefill_tiles", None), ("decode_prefix_split", (n_dec, n_dec))):
        ms = bench_ms(lambda i, p=p, prefix=prefix: paged_attention(
            p["q"], p["kv"], p["qsl"], p["seq_lens"], p["tables"][0], gk.D**-0.5, decode_prefix=prefix), reps=10)
        res.setdefault("mixed", []).append({"decodes": n_dec, "ctx": gk.CTXS[0], "prefill_tokens": gk.ATTN_PREFILL_LENS[2],
                                            "variant": label, "ms": ms})
        log(f"    mixed step attn ({n_dec} decodes @{gk.CTXS[0]} + {gk.ATTN_PREFILL_LENS[2]} prefill), {label}: {ms:.3f} ms")
    del p
    empty_cache()
    d = {(e["batch"], e["ctx"]): e for e in res["decode"]}
    p4 = res["prefill"][3]
    short, long = gk.CTXS
    b1, b64, b256 = gk.DECODE_BATCHES[0], gk.DECODE_BATCHES[3], gk.DECODE_BATCHES[-1]
    c.summary.append(
        f"attention: decode b{b1}/{short} {d[(b1, short)]['us']:.0f} us, b{b64}/{long} "
        f"{d[(b64, long)]['kv_bw_util'] * 100:.0f}% bw, b{b256}/{long} "
        f"{d[(b256, long)]['kv_bw_util'] * 100:.0f}% bw; "
        f"prefill {p4['tokens']} {p4['tflops']:.0f} TFLOP/s (SDPA {p4.get('sdpa_tflops', float('nan')):.0f}); mixed "
        + " vs ".join(f"{e['variant']} {e['ms']:.2f} ms" for e in res["mixed"]))
    return res


def section_tune(c: Ctx) -> dict[str, Any]:
    out: dict[str, Any] = {"decode": [], "prefill": []}
    decode_cfgs = [{}, {"BLOCK_N": 128, "num_stages": 2}, {"BLOCK_N": 32, "num_stages": 4},
                   {"BLOCK_N": 64, "num_stages": 4}, {"BLOCK_N": 64, "num_warps": 8}, {"BLOCK_N": 32, "num_stages": 3},
                   {"BLOCK_N": 32, "num_stages": 5}, {"BLOCK_N": 128, "num_stages": 3}]
    per_tok = 2 * gk.KVH * gk.D * 2
    shapes = [(gk.DECODE_BATCHES[0], gk.CTXS[-1]), (gk.DECODE_BATCHES[3], gk.CTXS[-1])]
    if gk.DEV.type == "cuda":  # the offline run's mixed steps: hundreds of short sequences
        shapes += [(1, 1024), (64, 1024), (384, 512), (256, 1024)]
    for b, ctx in shapes:
        variants = max(1, min(64, (256 * 2**20) // (b * ctx * per_tok)))
        p = make_paged([(ctx - 1, 1)] * b, num_variants=variants, seed=7)
        for cfg in decode_cfgs:
            if c.left() < 20:
                break
            try:
                ms = bench_ms(lambda i, p=p, cfg=cfg: paged_attention(
                    p["q"], p["kv"], p["qsl"], p["seq_lens"], p["tables"][i], gk.D**-0.5, decode=True,
                    launch_config=cfg), variants=variants)
                out["decode"].append({"batch": b, "ctx": ctx, "config": cfg or "default", "us": ms * 1e3,
                                      "kv_gb_s": b * ctx * per_tok / (ms * 1e-3) / 1e9})
            except Exception as e:  # noqa: BLE001
                out["decode"].append({"batch": b, "ctx": ctx, "config": cfg, "error": repr(e)[:200]})
            log(f"    {out['decode'][-1]}")
        del p
    # split-KV counts for small decode batches (the graphs' shapes): auto vs fixed counts
    out["splits"] = []
    if gk.DEV.type == "cuda":
        from hetserve.kernels import device_num_sms
        from hetserve.kernels.attention import decode_num_splits

        sms = device_num_sms(gk.DEV)
        for b in (1, 2, 4, 8, 16):
            for ctx in (1024, 4096):
                variants = max(1, min(64, (256 * 2**20) // (b * ctx * per_tok)))
                p = make_paged([(ctx - 1, 1)] * b, num_variants=variants, seed=11)
                auto = decode_num_splits(b, gk.KVH, sms)
                for ns in sorted({auto, 8, 16, 24, 32, 48, 64}):
                    ms = bench_ms(lambda i, p=p, ns=ns: paged_attention(
                        p["q"], p["kv"], p["qsl"], p["seq_lens"], p["tables"][i], gk.D**-0.5, decode=True,
                        num_splits=ns), variants=variants)
                    out["splits"].append({"batch": b, "ctx": ctx, "num_splits": ns, "auto": ns == auto,
                                          "us": ms * 1e3})
                best = min((r for r in out["splits"] if r["batch"] == b and r["ctx"] == ctx), key=lambda r: r["us"])
                log(f"    splits b={b} ctx={ctx}: auto {auto} -> best {best['num_splits']} ({best['us']:.1f} us)")
                del p
    prefill_cfgs = [{}, {"num_stages": 3}, {"BLOCK_Q": 16, "num_warps": 4, "num_stages": 3},
                    {"BLOCK_N": 32, "num_stages": 3}, {"num_warps": 4}]
    L = gk.ATTN_PREFILL_LENS[3]
    p = make_paged([(0, L)], seed=9)
    flops = 2 * L * L * gk.D * gk.H
    for cfg in prefill_cfgs:
        if c.left() < 15:
            break
        try:
            ms = bench_ms(lambda i, cfg=cfg: paged_attention(p["q"], p["kv"], p["qsl"], p["seq_lens"], p["tables"][0],
                                                             gk.D**-0.5, launch_config=cfg), reps=10)
            out["prefill"].append({"tokens": L, "config": cfg or "default", "ms": ms,
                                   "tflops": flops / (ms * 1e-3) / 1e12})
        except Exception as e:  # noqa: BLE001
            out["prefill"].append({"tokens": L, "config": cfg, "error": repr(e)[:200]})
        log(f"    {out['prefill'][-1]}")
    return out
