"""The sections of benchmarks/gpu_suite.py; each is ``section_<name>(suite, budget_s)`` and saves its own JSON."""

from __future__ import annotations

import copy
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from suite_common import (
    MAX_PROMPT_TOKENS,
    REPO,
    azure_workload,
    eager_switch,
    error_text,
    free_cuda,
    graph_partition_diag,
    kv_bytes_per_token,
    log,
    make_engine,
    make_runner,
    median,
    run_offline,
    run_subprocess,
    runner_step_times,
)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


# ---------------------------------------------------------------------------------------------- correctness


def _greedy_tiny(suite: Any, num_new: int) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    from hetserve import LLM, SamplingParams
    from hetserve.tiny.make_tiny import make_tiny_model

    tiny = make_tiny_model(suite.work / "tiny-fp32", "llama", dtype="float32")
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, 512, (n,), generator=g).tolist() for n in (5, 17, 33, 64)]
    llm = LLM(str(tiny), device=str(suite.device), dtype="float32", **suite.engine_extra)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=num_new, ignore_eos=True, detokenize=False))
    ours = [list(o.outputs[0].token_ids) for o in outs]
    del llm
    hf = AutoModelForCausalLM.from_pretrained(str(tiny), dtype=torch.float32).to(suite.device).eval()
    per: list[dict[str, Any]] = []
    with torch.no_grad():
        for p, o in zip(prompts, ours, strict=True):
            ids = list(p)
            ref, margins = [], []
            for _ in range(num_new):
                logits = hf(torch.tensor([ids], device=suite.device)).logits[0, -1].float()
                top = torch.topk(logits, 2)
                ref.append(int(top.indices[0]))
                margins.append(float(top.values[0] - top.values[1]))
                ids.append(ref[-1])
            first = next((i for i, (a, b) in enumerate(zip(o, ref, strict=False)) if a != b), None)
            per.append({"prompt_len": len(p), "equal": o == ref, "first_divergence": first,
                        "hf_margin_at_divergence": None if first is None else margins[first]})
    return {"num_prompts": len(prompts), "num_new_tokens": num_new, "exact": sum(r["equal"] for r in per),
            "per_prompt": per, "reference": "HF transformers fp32, full forward per token, argmax"}


def _bf16_logits(suite: Any, num_layers: int) -> dict[str, Any]:
    from transformers import AutoConfig, AutoModelForCausalLM

    from hetserve.core.model_config import ModelConfig
    from hetserve.engine.model.loader import init_random_model
    from hetserve.profiling import build_metadata, truncated_config

    cfg = truncated_config(ModelConfig.from_path(suite.model_config), num_layers)
    raw = dict(cfg.raw)
    model_type = raw.pop("model_type", "llama")
    for k in ("architectures", "torch_dtype", "dtype", "transformers_version"):
        raw.pop(k, None)
    dtype = torch.bfloat16
    with torch.device(suite.device):
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **raw), dtype=dtype).eval()
    ours = init_random_model(cfg, suite.device, dtype)
    sd = hf.state_dict()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.copy_(sd[name])
    from hetserve.core.config import CacheConfig, DeviceConfig, EngineConfig
    from hetserve.engine.runner import ModelRunner

    eager = eager_switch()  # graphs add nothing to a logits check
    ecfg = EngineConfig(model=str(suite.model_config.parent), cache=CacheConfig(num_blocks=64),
                        device=DeviceConfig(device=str(suite.device), dtype="bfloat16", **eager))
    runner = ModelRunner(ecfg, model=ours, model_config=cfg)
    backend_name = getattr(runner.backend, "name", type(runner.backend).__name__)
    g = torch.Generator().manual_seed(2)
    seq = torch.randint(10, min(cfg.vocab_size, 120000), (64,), generator=g)
    chunks = [(0, 40), (40, 56)] + [(i, i + 1) for i in range(56, 64)]  # prefill, chunk with context, decodes
    rows = []
    with torch.inference_mode():
        for a, b in chunks:
            meta = build_metadata([(b - a, a)], runner.block_size, suite.device, runner.num_kv_blocks)
            ids = seq[a:b].to(suite.device)
            hidden = ours(ids, meta.positions, runner.kv_caches, meta, runner.backend)
            rows.append(ours.compute_logits(hidden).float())
        ours_logits = torch.cat(rows)
        x = seq[None].to(suite.device)
        hf_bf16 = hf(x).logits[0].float()
        hf32 = copy.deepcopy(hf).float()
        ref = hf32(x).logits[0].float()
    del hf32, hf, runner, ours
    ours_err, hf_err = _rel(ours_logits, ref), _rel(hf_bf16, ref)
    top1 = float((ours_logits.argmax(-1) == hf_bf16.argmax(-1)).float().mean())
    ok = ours_err <= 2 * hf_err + 5e-3
    return {"layers": num_layers, "tokens": 64, "path": "prefill 40, chunk 16 after 40 cached, 8 decode steps",
            "rel_err_vs_fp32": ours_err, "hf_bf16_rel_err_vs_fp32": hf_err, "top1_agree_with_hf_bf16": top1,
            "pass": ok, "criterion": "ours_err <= 2 * hf_bf16_err + 5e-3 (both against HF fp32, same weights)",
            "backend": backend_name}


def section_correctness(suite: Any, budget: float) -> None:
    t0 = time.perf_counter()
    res: dict[str, Any] = {}
    try:
        res["tiny_fp32_greedy"] = r = _greedy_tiny(suite, 8 if suite.smoke else 16)
        suite.results.row("correctness", "tiny fp32 greedy == HF", f"{r['exact']}/{r['num_prompts']} exact", "exact")
    except Exception as e:  # noqa: BLE001
        res["tiny_fp32_greedy"] = {"error": error_text(e)}
        suite.results.row("correctness", "tiny fp32 greedy", f"ERROR {type(e).__name__}", "exact")
    free_cuda()
    try:
        res["bf16_logits"] = r = _bf16_logits(suite, 2)
        suite.results.row("correctness", f"{suite.model_config.parent.name} 2L bf16 logits rel err",
                          f"{r['rel_err_vs_fp32']:.2e} (HF {r['hf_bf16_rel_err_vs_fp32']:.2e}) "
                          f"{'ok' if r['pass'] else 'FAIL'}", "bf16 tolerance")
    except Exception as e:  # noqa: BLE001
        res["bf16_logits"] = {"error": error_text(e)}
        suite.results.row("correctness", "bf16 logits", f"ERROR {type(e).__name__}", "bf16 tolerance")
    suite.save("correctness", res, {"model_config": str(suite.model_config)}, t0)


# ---------------------------------------------------------------------------------------------- kernels


def section_kernels(suite: Any, budget: float) -> None:
    t0 = time.perf_counter()
    script = REPO / "benchmarks" / "gpu_kernels.py"
    if not script.is_file():
        suite.save("kernels", {"skipped": "benchmarks/gpu_kernels.py not present"}, {}, t0)
        suite.results.row("kernels", "gpu_kernels.py", "absent", "")
        return
    kout = suite.results.results_dir / "kernels"
    kout.mkdir(parents=True, exist_ok=True)
    args = suite.args.kernels_args
    if args is None:
        # its own budget ends it cleanly before the hard timeout; its engine/model/tune sections overlap the
        # suite's offline run and are left to a run of their own
        help_text = run_subprocess([sys.executable, str(script), "--help"], 30).get("stdout_tail", "")
        sections = "calibrate,kernels" if suite.smoke else "calibrate,kernels,attention,decode,prefill,profile"
        args = ""
        if "--sections" in help_text:
            args += f"--sections {sections} "
        if "--budget-s" in help_text:
            args += f"--budget-s {max(5.0, budget - (5 if suite.smoke else 25)):.0f}"
    env = dict(os.environ, OUT=str(kout))
    r = run_subprocess([sys.executable, str(script), *args.split()], budget, env=env)
    r["args"] = args
    suite.save("kernels", r, {"script": str(script.relative_to(REPO))}, t0)
    state = "timed out" if r.get("timed_out") else f"rc {r['rc']}"
    suite.results.row("kernels", "gpu_kernels.py", f"{state}, {r['wall_s']:.0f} s (see results/kernels)", "")
    print(r.get("stdout_tail", "")[-2500:], flush=True)


# ---------------------------------------------------------------------------------------------- profiles


def section_profile(suite: Any, budget: float) -> None:
    from hetserve.core.model_config import ModelConfig
    from hetserve.device import create_green_contexts
    from hetserve.profiling import ProfileGrid, ProfileOptions, Profiler

    t0 = time.perf_counter()
    cfg = ModelConfig.from_path(suite.model_config)
    model_name = suite.model_config.parent.name
    physical = suite.info["catalog_name"]
    targets: list[tuple[str, Any]] = [("whole", None)]
    gcs = []
    if suite.cuda:
        try:
            gcs = create_green_contexts(_partition_list(suite), physical)
            targets += [(gc.partition.label, gc) for gc in gcs]
            suite.graph_diag = graph_partition_diag(suite.device, gcs)
            log(f"  graphs on partitions: {json.dumps(suite.graph_diag, default=str)}")
        except Exception as e:  # noqa: BLE001
            targets.append(("partitions", e))
    per = budget / max(1, len(targets))
    out: dict[str, Any] = {}
    try:
        for label, gc in targets:
            if isinstance(gc, Exception):
                out[label] = {"error": repr(gc)}
                continue
            t1 = time.perf_counter()
            # timings replayed from graphs only where graphs captured on the partition's stream stay on it
            graphs = gc is None or bool((suite.graph_diag or {}).get("graph_captured_on_partition_stays_inside"))
            opts = ProfileOptions(num_layers=1 if suite.smoke else 2, warmup=1 if suite.smoke else 2,
                                  repeat=3 if suite.smoke else 10, table_budget_s=max(1.0, per / 5),
                                  use_cuda_graphs=graphs)
            grid = ProfileGrid.default(suite.device.type, quick=suite.smoke)
            name = gc.name if gc is not None else (physical if suite.cuda else f"cpu-{suite.info['num_sms']}c")
            emulation = gc.emulation_string() if gc is not None else None
            meta = {"command": suite.results.command, "git_commit": suite.results.commit,
                    "partition": gc.describe() if gc is not None else {"emulated": False, "partition": "whole"},
                    "physical_device": suite.info}
            try:
                prof = Profiler(cfg, device=str(suite.device), dtype=suite.dtype_name, grid=grid, options=opts,
                                stream=gc.stream if gc is not None else None,
                                log=lambda m, lb=label: log(f"  [{lb}] {m}"))
                p = prof.run(device_name=name, model_name=model_name, emulation=emulation, meta=meta,
                             path_hint=str(suite.model_config.parent))
            except Exception as e:  # noqa: BLE001
                out[label] = {"error": error_text(e)}
                suite.results.row("profile", label, f"ERROR {type(e).__name__}", "")
                continue
            fname = f"{name.lower()}-{model_name}{'-smoke' if suite.smoke else ''}.json"
            path = suite.results.profiles_dir / fname
            p.save(path)
            d64 = p.decode_attn(64, 4096) if p.decode_attn is not None else float("nan")
            out[label] = {"profile": f"profiles/{fname}", "device_name": name, "emulation": emulation,
                          "cuda_graphs": graphs,
                          "dense_us_1tok": p.dense(1) * 1e6, "dense_ms_4096tok": p.dense(4096) * 1e3,
                          "decode_attn_us_64x4096": d64 * 1e6, "copy_gb_s": (p.copy_bytes_per_s or 0) / 1e9,
                          "step_overhead_us": p.step_overhead_s * 1e6, "timing": p.meta.get("timing"),
                          "truncated": p.meta.get("truncated"), "validation": p.meta.get("validation"),
                          "wall_s": time.perf_counter() - t1}
            suite.results.row("profile", name, f"dense/L {p.dense(1) * 1e6:.0f} us@1, {p.dense(4096) * 1e3:.2f} ms@4k; "
                              f"copy {out[label]['copy_gb_s']:.0f} GB/s; {time.perf_counter() - t1:.0f} s", "")
            free_cuda()
    finally:
        for gc in gcs:
            gc.close()
    out["graph_diag"] = suite.graph_diag
    suite.save("profile", out, {"model_config": str(suite.model_config)}, t0)


def _partition_list(suite: Any) -> list[Any]:
    from hetserve.device import Partition

    sms = [int(x) for x in suite.args.partitions.split(",")]
    mems = [float(x) for x in suite.args.partition_memory_gb.split(",")]
    total = suite.info["num_sms"]
    if sum(sms) > total:
        sms[-1] = total - sum(sms[:-1])
    return [Partition("green_context", n, int(m * 2**30)) for n, m in zip(sms, mems, strict=False)]


# ---------------------------------------------------------------------------------------------- decode / prefill


def _runner_limits(big: Any) -> dict[str, int]:
    """Engine limits wide enough for every synthetic step below (runners may size buffers by them)."""
    return {"max_num_seqs": 256, "max_num_batched_tokens": 8192,
            "max_model_len": min(16384, big.cfg.max_position_embeddings)}


def section_decode(suite: Any, budget: float) -> None:
    t0 = time.perf_counter()
    big = suite.big()
    runner, _ = make_runner(big, None, suite.engine_extra, **_runner_limits(big))
    batches = (1, 8) if suite.smoke else (1, 8, 32, 64, 128, 256)
    ctxs = (1024,) if suite.smoke else (1024, 4096)
    elt = 2 if suite.cuda else 4
    kvt = kv_bytes_per_token(big.cfg, elt)
    bw = suite.copy_bw()
    # a decode step reads every weight but the embedding table (only its batch's rows are gathered)
    embed_bytes = 0 if big.cfg.tie_word_embeddings else big.cfg.vocab_size * big.cfg.hidden_size * elt
    weights_read = big.weight_bytes - embed_bytes
    pts = []
    for ctx in ctxs:
        for b in batches:
            if time.perf_counter() - t0 > budget:
                pts.append({"num_seqs": b, "context_len": ctx, "skipped": "budget"})
                continue
            ts = runner_step_times(runner, [(1, ctx)] * b, big.cfg.vocab_size, suite.device,
                                   1 if suite.smoke else 3, 3 if suite.smoke else 10, "d")
            t = median(ts)
            need_blocks = b * math.ceil((ctx + 1) / runner.block_size)
            moved = weights_read + b * ctx * kvt
            pt = {"num_seqs": b, "context_len": ctx, "step_ms": t * 1e3, "bytes_read": moved,
                  "gb_s": moved / t / 1e9, "bandwidth_utilisation": moved / t / bw if bw else None,
                  "kv_aliased": need_blocks > runner.num_kv_blocks - 1, "times_ms": [x * 1e3 for x in ts]}
            pts.append(pt)
            if b in (1, 64):
                goal = ">= 85%" if b == 1 else ">= 70%"
                util = f"{pt['bandwidth_utilisation'] * 100:.0f}%" if bw else "n/a"
                suite.results.row("decode", f"bs {b} ctx {ctx}", f"{t * 1e3:.2f} ms, {util} of copy bw", goal)
    cfg = {"layers": big.cfg.num_hidden_layers, "weight_bytes": big.weight_bytes, "weight_bytes_read": weights_read,
           "kv_bytes_per_token": kvt,
           "copy_gb_s": bw / 1e9, "kv_pool_blocks": runner.num_kv_blocks, "block_size": runner.block_size,
           "engine_extra": suite.engine_extra,
           "method": "ModelRunner.execute on synthetic decode steps (random KV); wall time with sync; block "
                     "tables wrap around the pool when the batch's KV exceeds it (reuse distance >> L2)"}
    del runner
    suite.save("decode", {"points": pts}, cfg, t0)


def section_prefill(suite: Any, budget: float) -> None:
    t0 = time.perf_counter()
    big = suite.big()
    runner, _ = make_runner(big, None, suite.engine_extra, **_runner_limits(big))
    c = big.cfg
    L, h, H, D = c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.head_dim
    linear = h * c.q_size + 2 * h * c.kv_size + c.q_size * h + 3 * h * c.intermediate_size
    peak = float(suite.info.get("matmul_tflops_bf16_8192") or 0.0) * 1e12
    pts = []
    for n in ((512,) if suite.smoke else (512, 2048, 4096, 8192)):
        if time.perf_counter() - t0 > budget:
            pts.append({"num_tokens": n, "skipped": "budget"})
            continue
        ts = runner_step_times(runner, [(n, 0)], c.vocab_size, suite.device, 1, 2 if suite.smoke else 5, "p")
        t = median(ts)
        flops = 2 * n * L * linear + L * 4 * H * D * n * (n + 1) / 2 + 2 * h * c.vocab_size
        pt = {"num_tokens": n, "step_ms": t * 1e3, "tflop_s": flops / t / 1e12,
              "utilisation_vs_measured_matmul": flops / t / peak if peak else None,
              "utilisation_vs_781": flops / t / 781e12, "times_ms": [x * 1e3 for x in ts]}
        pts.append(pt)
        if n in (512, 4096):
            suite.results.row("prefill", f"{n} tokens", f"{t * 1e3:.1f} ms, {pt['tflop_s']:.0f} TFLOP/s "
                              f"({pt['utilisation_vs_781'] * 100:.0f}% of 781)", ">= 60% at 4k")
    del runner
    suite.save("prefill", {"points": pts}, {"layers": L, "flops": "2 n L P_linear + L 4 H d n(n+1)/2 + 2 h V",
                                            "measured_matmul_tflops": peak / 1e12}, t0)


# ---------------------------------------------------------------------------------------------- serving


def _workload(suite: Any, num: int) -> Any:
    vocab = suite.big().cfg.vocab_size
    if suite.smoke:
        return azure_workload(suite.trace, num, vocab, 256, 16)
    return azure_workload(suite.trace, num, vocab, MAX_PROMPT_TOKENS, None)


def _engine(suite: Any, num_blocks: int | None, extra: dict[str, Any] | None = None) -> Any:
    a = suite.args
    big = suite.big()
    return make_engine(big, num_blocks=num_blocks, max_num_seqs=a.max_num_seqs,
                       max_num_batched_tokens=a.max_num_batched_tokens,
                       max_model_len=min(a.max_model_len, big.cfg.max_position_embeddings),
                       extra={**suite.engine_extra, **(extra or {})})


def _warm(engine: Any, suite: Any, stream: Any = None) -> float:
    t = time.perf_counter()
    w = azure_workload(None, 4, suite.big().cfg.vocab_size, 64, 8, seed=7)
    run_offline(engine, w, 60.0, suite.device, stream)
    return time.perf_counter() - t


def section_offline(suite: Any, budget: float) -> None:
    t0 = time.perf_counter()
    work = _workload(suite, 16 if suite.smoke else suite.args.num_requests)
    engine = _engine(suite, None)
    warm = _warm(engine, suite)
    r = run_offline(engine, work, budget - (time.perf_counter() - t0), suite.device)
    r["warmup_s"] = warm
    del engine
    suite.save("offline", r, _offline_config(suite, work), t0)
    suite.results.row("offline", f"{r['completed']}/{r['num_requests']} reqs{' PARTIAL' if r['partial'] else ''}",
                      f"{r['output_tok_s']:.0f} out tok/s ({r['total_tok_s']:.0f} total)", ">= 12.5k out tok/s")


def _offline_config(suite: Any, work: Any) -> dict[str, Any]:
    a = suite.args
    return {"workload": work.source, "num_requests": len(work.prompts), "prompt_tokens": work.prompt_tokens,
            "output_tokens_requested": sum(work.output_lens), "sampling": "greedy, ignore_eos, forced lengths",
            "max_num_seqs": a.max_num_seqs, "max_num_batched_tokens": a.max_num_batched_tokens,
            "max_model_len": a.max_model_len, "engine_extra": suite.engine_extra,
            "model": f"{suite.model_config.parent.name}, {suite.big().cfg.num_hidden_layers} layers, "
                     f"random {suite.dtype_name}"}


def section_partitions(suite: Any, budget: float) -> None:
    from hetserve.device import create_green_contexts, kv_blocks_for_memory_cap

    t0 = time.perf_counter()
    if not suite.cuda:
        raise RuntimeError("partitions need a CUDA GPU")
    big = suite.big()
    gcs = create_green_contexts(_partition_list(suite), suite.info["catalog_name"])
    try:
        diag = suite.graph_diag or graph_partition_diag(suite.device, gcs)
        suite.graph_diag = diag
        # the engine captures its decode graphs on a side stream and replays them on the current one
        graphs_ok = bool(diag["graph_captured_on_side_stream_stays_inside"])
        extra = {} if graphs_ok else eager_switch()
        note = ("engine run as is" if graphs_ok else
                (f"graph replay escaped the partition: engine run with {extra}" if extra else
                 "graph replay escaped the partition and the engine has no eager switch: its CUDA graphs (if any) "
                 "may use SMs outside the partition"))
        diag["engine_mode"] = note
        per = (budget - (time.perf_counter() - t0)) / len(gcs)
        n = 8 if suite.smoke else suite.args.partition_requests
        work = _workload(suite, n)
        elt = 2 if suite.cuda else 4
        per_block = kv_bytes_per_token(big.cfg, elt) * 16
        for gc in gcs:
            t1 = time.perf_counter()
            res: dict[str, Any] = {"diag": diag}
            try:
                cap = gc.memory_cap_bytes
                blocks = None if cap is None else kv_blocks_for_memory_cap(cap, big.weight_bytes, per_block)
                with gc.activate():
                    torch.cuda.synchronize()
                    engine = _engine(suite, blocks, extra)
                    res["warmup_s"] = _warm(engine, suite, gc.stream)
                    res.update(run_offline(engine, work, per - (time.perf_counter() - t1), suite.device, gc.stream))
                    del engine
                res["kv_blocks"] = blocks
                suite.results.row("partitions", f"{gc.name} {res['completed']}/{res['num_requests']}"
                                  f"{' PARTIAL' if res['partial'] else ''}", f"{res['output_tok_s']:.0f} out tok/s",
                                  "reported")
                err = None
            except Exception as e:  # noqa: BLE001
                err = error_text(e)
                suite.results.row("partitions", gc.name, f"ERROR {type(e).__name__}", "reported")
            free_cuda()
            suite.save("partitions", res, _offline_config(suite, work) | {"partition": gc.describe()}, t1,
                       emulation=gc.describe(), name=f"partitions-{gc.partition.label}", error=err)
    finally:
        for gc in gcs:
            gc.close()


def section_peer(suite: Any, budget: float) -> None:
    t0 = time.perf_counter()
    big = suite.big()
    n = 4 if suite.smoke else suite.args.peer_requests
    new = 8 if suite.smoke else suite.args.peer_output_len
    work = _workload(suite, n).head(n, output_len=new)
    engine = _engine(suite, None)
    _warm(engine, suite)
    ours = run_offline(engine, work, budget / 3, suite.device)
    del engine
    free_cuda()
    spec = {"config": json.loads((big.model_dir / "config.json").read_text()), "prompts": work.prompts,
            "max_new_tokens": new, "device": str(suite.device), "dtype": suite.dtype_name,
            "cb": {"max_batch_tokens": 4096, "max_memory_percent": 0.5, "use_cuda_graph": True}}
    inp, outp = suite.work / "peer_in.json", suite.work / "peer_out.json"
    inp.write_text(json.dumps(spec))
    outp.unlink(missing_ok=True)
    left = max(10.0, budget - (time.perf_counter() - t0))
    proc = run_subprocess([sys.executable, str(Path(__file__).with_name("peer_worker.py")), str(inp), str(outp)], left)
    peer = json.loads(outp.read_text()) if outp.is_file() else {"error": "no result", **proc}
    res = {"ours": ours, "peer": peer, "peer_process": {k: proc.get(k) for k in ("rc", "timed_out", "wall_s")}}
    if "output_tok_s" in peer and ours["output_tok_s"]:
        res["ratio_output_tok_s"] = ours["output_tok_s"] / peer["output_tok_s"]
    else:
        res["peer_stderr_tail"] = proc.get("stderr_tail", "")[-1500:]
    suite.save("peer", res, _offline_config(suite, work) | {"peer": "transformers generate_batch",
                                                              "subset": work.source, "output_len": new}, t0)
    ratio = res.get("ratio_output_tok_s")
    suite.results.row("peer", f"{len(work.prompts)} reqs x {new} tok",
                      f"ours {ours['output_tok_s']:.0f} vs HF {peer.get('output_tok_s', float('nan')):.0f} tok/s"
                      f" = {ratio:.1f}x" if ratio else f"ours {ours['output_tok_s']:.0f}; peer failed", ">= 3x")


