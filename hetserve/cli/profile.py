"""``hetserve profile --model DIR_OR_CONFIG --device cuda|cpu [--partition sm:32|mps:25] [--quick] ...``

Writes a device profile JSON (``hetserve.planner.profile``) for the cost model. ``--partition sm:N`` runs on a
disjoint green context of N SMs in this process; ``--partition mps:P`` starts an MPS control daemon, runs the
same command again as an MPS client limited to P% of the SMs, and quits the daemon.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

_MPS_WORKER_ENV = "HETSERVE_MPS_WORKER"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="HF model directory or config.json (only the shapes are used)")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--partition", default=None,
                   help="whole (default), sm:N (disjoint green context), mps:P (MPS client); add ,mem:GIB for a cap")
    p.add_argument("--dtype", default="auto", help="auto (fp32 on CPU, bf16 on GPU), bf16, fp16, fp32")
    p.add_argument("--output", default=None, help="profile JSON path (default: profiles/<device>-<model>.json)")
    p.add_argument("--quick", action="store_true", help="a small grid and few repeats (CI, smoke runs)")
    p.add_argument("--layers", type=int, default=2, help="layers instantiated (1-8); the profile is per layer")
    p.add_argument("--device-name", default=None, help="the device name the cost model will match (default: "
                   "catalog name of the GPU, H100-32SM style for partitions, cpu-<cores>c for the CPU)")
    p.add_argument("--model-name", default=None, help="default: the model directory's name")
    p.add_argument("--attention-backend", default="auto")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeat", type=int, default=None)
    p.add_argument("--table-budget-s", type=float, default=None, help="seconds per table before rows are dropped")
    p.add_argument("--kv-pool-gb", type=float, default=None, help="KV pool for the attention tables (GiB)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="time every call eagerly")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--statistic", choices=["auto", "median", "min"], default="auto",
                   help="reduce repeats by median (what a serving step typically costs) or min (least noise); "
                        "auto: median on GPU, min on CPU")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own choice)")
    p.add_argument("--sustained", action="store_true",
                   help="then serve a request stream of its own on the whole model (random weights) and store this "
                        "machine's sustained speed against the tables in the profile (hetserve/profiling/sustained.py)")
    p.add_argument("--sustained-requests", type=int, default=None,
                   help="requests in that stream (default 160: ~25 s on an H100 with an 8B model)")


def git_commit(repo_root: Path | None = None) -> str:
    """``benchmarks/.commit`` if present (written where the tree has no .git), else ``git rev-parse HEAD``."""
    root = repo_root or Path(__file__).resolve().parents[2]
    f = root / "benchmarks" / ".commit"
    if f.is_file():
        text = f.read_text().strip()
        if text:
            return text.split()[0]
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10,
                           check=False)
        if r.returncode == 0 and r.stdout.strip():
            return r.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return "unknown"


def _model_name(model: str) -> str:
    p = Path(model).resolve()
    return (p.parent.name if p.is_file() else p.name) or "model"


def _argv_of(args: argparse.Namespace) -> list[str]:
    """The flags of this invocation, to run it again as an MPS client."""
    out = ["--model", args.model, "--device", args.device, "--dtype", args.dtype, "--layers", str(args.layers),
           "--attention-backend", args.attention_backend, "--seed", str(args.seed)]
    if args.partition:
        out += ["--partition", args.partition]
    for flag, v in (("--output", args.output), ("--device-name", args.device_name), ("--model-name", args.model_name),
                    ("--warmup", args.warmup), ("--repeat", args.repeat), ("--table-budget-s", args.table_budget_s),
                    ("--kv-pool-gb", args.kv_pool_gb)):
        if v is not None:
            out += [flag, str(v)]
    if args.quick:
        out.append("--quick")
    if args.no_cuda_graphs:
        out.append("--no-cuda-graphs")
    if args.threads is not None:
        out += ["--threads", str(args.threads)]
    return out


def _run_as_mps_client(args: argparse.Namespace, partition: Any) -> int:
    from hetserve.device import MpsDaemon

    argv = [sys.executable, "-m", "hetserve.cli.main", "profile", *_argv_of(args)]
    with MpsDaemon() as mps:
        print(f"hetserve profile: MPS daemon up ({mps.root}); client at {partition.amount:g}% of the SMs", flush=True)
        proc = mps.launch(argv, thread_percentage=partition.amount, memory_limit_bytes=partition.memory_cap_bytes,
                          device_index=partition.device_index, extra_env={_MPS_WORKER_ENV: "1"})
        rc = proc.wait()
        if rc != 0:
            print(f"hetserve profile: MPS client exited {rc}; daemon log: {mps.log_tail(800)}", file=sys.stderr)
        return rc


def run(args: argparse.Namespace) -> int:
    import torch

    from hetserve.core.errors import ValidationError
    from hetserve.core.model_config import ModelConfig
    from hetserve.device import (
        EmulationError,
        create_green_contexts,
        graph_replay_check,
        parse_partition,
        physical_device_info,
    )
    from hetserve.profiling import ProfileGrid, ProfileOptions, Profiler

    device = torch.device(args.device)
    if args.sustained_requests is not None and (args.sustained_requests < 1 or not args.sustained):
        raise ValidationError("--sustained-requests", f"must be >= 1 and go with --sustained, got "
                                                      f"{args.sustained_requests}")
    if args.threads is not None:
        if args.threads < 1:
            raise ValidationError("--threads", f"must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    partition = parse_partition(args.partition, device.index or 0)
    if partition.emulated and device.type != "cuda":
        raise ValidationError("--partition", f"{partition.label} needs --device cuda; the CPU has no partitions")
    if partition.kind == "mps" and os.environ.get(_MPS_WORKER_ENV) != "1":
        return _run_as_mps_client(args, partition)
    cfg = ModelConfig.from_path(args.model)
    model_name = args.model_name or _model_name(args.model)
    grid = ProfileGrid.default(device.type, quick=args.quick)
    quick_reps = (1, 3) if device.type == "cpu" else (2, 5)
    full_reps = (2, 7) if device.type == "cpu" else (3, 15)
    warmup, repeat = quick_reps if args.quick else full_reps
    options = ProfileOptions(
        num_layers=args.layers,
        warmup=warmup if args.warmup is None else args.warmup,
        repeat=repeat if args.repeat is None else args.repeat,
        use_cuda_graphs=not args.no_cuda_graphs,
        attention_backend=args.attention_backend,
        seed=args.seed,
        statistic=args.statistic,
        table_budget_s=args.table_budget_s if args.table_budget_s is not None else (20.0 if args.quick else 90.0),
        kv_pool_bytes=None if args.kv_pool_gb is None else int(args.kv_pool_gb * 2**30),
    )
    meta: dict[str, Any] = {
        "command": "hetserve profile " + " ".join(_argv_of(args)),
        "git_commit": git_commit(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "partition": partition.describe(f"cpu-{os.cpu_count()}c" if device.type == "cpu" else "GPU"),
    }
    gcs = []
    stream = None
    if device.type == "cuda":
        try:
            info = physical_device_info(device.index or 0)
        except EmulationError as e:
            raise ValidationError("--device", str(e)) from None
        physical = info["catalog_name"]
        meta["physical_device"] = info
        device_name = args.device_name or partition.device_name(physical)
        emulation = partition.emulation_string(physical, info["num_sms"])
        meta["partition"] = partition.describe(physical, info["num_sms"])
        if partition.kind == "green_context":
            gcs = create_green_contexts([partition], physical)
            stream = gcs[0].stream
            emulation = gcs[0].emulation_string()
            meta["partition"] = gcs[0].describe()
            check = graph_replay_check(gcs[0])
            meta["partition"]["graph_replay_check"] = check
            if not check["captured_on_partition_stays_inside"] and options.use_cuda_graphs:
                print("[profile] CUDA graph replay left the partition's SMs: timing eagerly", flush=True)
                options = dataclasses.replace(options, use_cuda_graphs=False)
        elif partition.kind == "mps":
            meta["partition"]["mps_client_env"] = {
                k: v for k, v in os.environ.items() if k.startswith("CUDA_MPS_")
            }
            if partition.memory_cap_bytes is not None:
                torch.cuda.set_per_process_memory_fraction(
                    min(1.0, partition.memory_cap_bytes / info["total_memory_bytes"]), device.index or 0
                )
    else:
        device_name = args.device_name or f"cpu-{os.cpu_count()}c"
        emulation = None
        meta["cpu"] = platform.processor() or platform.machine()
        meta["torch_threads"] = torch.get_num_threads()
    out = Path(args.output) if args.output else Path("profiles") / f"{device_name.lower()}-{model_name}.json"
    t0 = time.perf_counter()
    try:
        profiler = Profiler(cfg, device=args.device, dtype=args.dtype, grid=grid, options=options, stream=stream,
                            log=lambda m: print(f"[profile] {m}", flush=True))
        profile = profiler.run(device_name=device_name, model_name=model_name, emulation=emulation, meta=meta,
                               path_hint=str(args.model))
    finally:
        for gc in gcs:
            gc.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    profile.save(out)
    if args.sustained:
        cal = _sustained(args, cfg, out, profile.device_name)
        print(f"[profile] sustained: {cal['meta']} (steps: mixed {cal['mixed']['steps']}, decode "
              f"{cal['decode']['steps']})", flush=True)
    d = profile.dense
    print(f"wrote {out} ({time.perf_counter() - t0:.1f} s): {device_name}"
          f"{' [' + emulation + ']' if emulation else ''}, dense/layer {d.ys[0] * 1e6:.1f} us at {d.xs[0]:g} tokens"
          f" .. {d.ys[-1] * 1e3:.2f} ms at {d.xs[-1]:g}; copy {(profile.copy_bytes_per_s or 0) / 1e9:.1f} GB/s; "
          f"step overhead {profile.step_overhead_s * 1e6:.0f} us")
    return 0


def _sustained(args: argparse.Namespace, cfg: Any, out: Path, device_name: str) -> dict[str, Any]:
    """The whole model with random weights in an engine, the calibration stream through it, the scales written
    into the profile at ``out`` (``profiling/sustained.py``)."""
    import json
    import tempfile

    import torch

    from hetserve.core.config import EngineConfig
    from hetserve.core.devices import cpu_host_spec, get_device
    from hetserve.core.errors import ValidationError
    from hetserve.engine.llm_engine import LLMEngine
    from hetserve.engine.model.loader import init_random_model
    from hetserve.engine.runner import ModelRunner, resolve_dtype
    from hetserve.planner.costmodel import CostModel
    from hetserve.planner.profile import load_profile
    from hetserve.profiling.sustained import NUM_REQUESTS, measure, write_scales
    from hetserve.tiny.make_tiny import make_tiny_model

    n = NUM_REQUESTS if args.sustained_requests is None else args.sustained_requests
    device = torch.device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    dtype_name = str(dtype).removeprefix("torch.")
    prof = load_profile(out)
    if device.type == "cpu":
        spec = cpu_host_spec(os.cpu_count() or 1, 8 * 2**30, name=device_name)
    else:
        try:
            spec = get_device(device_name)
        except ValidationError:
            raise ValidationError("--device-name", f"{device_name!r} is not in the device catalog: the sustained "
                                  "calibration needs the cost model's device (name a catalog device)") from None
    cm = CostModel(cfg, spec, dtype_name, profile=prof)
    max_in = min(2048, max(16, cfg.max_position_embeddings // 2))
    max_out = min(256, max(4, cfg.max_position_embeddings // 8))
    with tempfile.TemporaryDirectory(prefix="hetserve-sustained-") as tmp:
        work = Path(tmp)
        (work / "model").mkdir()
        (work / "model" / "config.json").write_text(json.dumps(cfg.raw))
        make_tiny_model(work / "tok", "llama")  # a tokenizer for the engine; the prompts are token ids
        model = init_random_model(cfg, device, dtype, seed=args.seed)
        kw: dict[str, Any] = {"num_blocks": 64 * -(-(max_in + max_out) // 16)} if device.type == "cpu" else {}
        config = EngineConfig.from_kwargs(str(work / "model"), tokenizer=str(work / "tok"), device=args.device,
                                          dtype=dtype_name, max_num_seqs=256, max_num_batched_tokens=8192,
                                          max_model_len=max_in + max_out + 16, enable_prefix_caching=False, **kw)
        engine = LLMEngine(config, executor=ModelRunner(config, model=model, model_config=cfg))
        # the engine's own loop: async scheduling overlaps host and device on a GPU; on a CPU the host is the device
        cm.async_scheduling = bool(engine.core.async_scheduling) and device.type == "cuda"
        cm.schedules_ahead = bool(engine.core.async_scheduling)
        vocab_hi = min(cfg.vocab_size, 120000)
        cal = measure(engine, cm, max_in, max_out, vocab_hi, num_requests=n)
    write_scales(out, cal, out, git_commit())
    return cal
