"""Pieces of benchmarks/gpu_suite.py: the random-weight model, engines on it, offline runs, result files.

Kept free of fastapi/uvicorn/pydantic/pyzmq/msgspec: the GPU image lacks them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import statistics
import subprocess
import tarfile
import time
import traceback
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from hetserve.core.config import CacheConfig, DeviceConfig, EngineConfig, SchedulerConfig
from hetserve.core.model_config import ModelConfig
from hetserve.core.outputs import SchedulerOutput
from hetserve.core.sampling_params import SamplingParams

REPO = Path(__file__).resolve().parents[1]
MAX_PROMPT_TOKENS = 4096  # Azure-conv prompts are capped here (the setting, as the peer probe did)
_TRACE_CANDIDATES = (".data/azure_llm_2023_conv.csv", "shared/data/azure_llm_2023_conv.csv",
                     "../shared/data/azure_llm_2023_conv.csv", "data/azure_llm_2023_conv.csv")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def git_commit() -> str:
    from hetserve.cli.profile import git_commit as gc

    return gc(REPO)


def find_trace(given: str | None) -> Path | None:
    if given:
        p = Path(given)
        return p if p.is_file() else None
    for c in _TRACE_CANDIDATES:
        p = (REPO / c).resolve()
        if p.is_file():
            return p
    return None


def versions() -> dict[str, str]:
    out = {"torch": torch.__version__, "cuda": str(torch.version.cuda)}
    for mod in ("triton", "transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - absent is fine
            out[mod] = "absent"
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_cuda() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------- the model


@dataclass
class BigModel:
    """A model of the given shape with random weights, made on the device, plus a directory for the engine
    (its config.json and a stand-in tokenizer: prompts are token ids and outputs are not detokenised)."""

    cfg: ModelConfig
    model: Any
    model_dir: Path
    tokenizer_dir: Path
    device: torch.device
    dtype_name: str

    @property
    def weight_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


def build_big_model(config_path: Path, num_layers: int | None, device: torch.device, dtype_name: str,
                    work: Path, seed: int = 0) -> BigModel:
    from hetserve.engine.model.loader import init_random_model
    from hetserve.profiling import truncated_config
    from hetserve.tiny.make_tiny import make_tiny_model

    cfg = ModelConfig.from_path(config_path)
    if num_layers is not None and num_layers < cfg.num_hidden_layers:
        cfg = truncated_config(cfg, num_layers)
    model_dir = work / f"model-{cfg.num_hidden_layers}l"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(cfg.raw, indent=1))
    tok_dir = work / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        make_tiny_model(tok_dir, "llama")
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype_name]
    model = init_random_model(cfg, device, dtype, seed=seed)
    sync(device)
    return BigModel(cfg, model, model_dir, tok_dir, device, dtype_name)


def engine_field_names() -> set[str]:
    return {f.name for k in (CacheConfig, SchedulerConfig, DeviceConfig) for f in fields(k)}


def eager_switch() -> dict[str, Any]:
    """The engine option that turns CUDA graphs off, if the engine has one (names vLLM and others use)."""
    names = engine_field_names()
    for name, value in (("enforce_eager", True), ("use_cuda_graphs", False), ("cuda_graphs", False),
                        ("enable_cuda_graphs", False), ("cuda_graph", False)):
        if name in names:
            return {name: value}
    return {}


def make_runner(big: BigModel, num_blocks: int | None, extra: dict[str, Any] | None = None, **kw: Any) -> Any:
    from hetserve.engine.runner import ModelRunner

    kwargs: dict[str, Any] = dict(device=str(big.device), dtype=big.dtype_name, **kw)
    if num_blocks is not None:
        kwargs["num_blocks"] = num_blocks
    kwargs.update(extra or {})
    config = EngineConfig.from_kwargs(str(big.model_dir), tokenizer=str(big.tokenizer_dir), **kwargs)
    return ModelRunner(config, model=big.model, model_config=big.cfg), config


def make_engine(big: BigModel, *, num_blocks: int | None, max_num_seqs: int, max_num_batched_tokens: int,
                max_model_len: int, extra: dict[str, Any] | None = None) -> Any:
    from hetserve.engine.llm_engine import LLMEngine

    runner, config = make_runner(big, num_blocks, extra, max_num_seqs=max_num_seqs,
                                 max_num_batched_tokens=max_num_batched_tokens, max_model_len=max_model_len,
                                 enable_prefix_caching=False)
    return LLMEngine(config, executor=runner)


def kv_bytes_per_token(cfg: ModelConfig, elt_bytes: int) -> int:
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * elt_bytes


# ---------------------------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]
    source: str

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    def head(self, n: int, output_len: int | None = None) -> Workload:
        outs = self.output_lens[:n] if output_len is None else [output_len] * min(n, len(self.prompts))
        return Workload(self.prompts[:n], outs, f"{self.source}, first {min(n, len(self.prompts))}")


def azure_workload(trace: Path | None, num: int, vocab_size: int, max_prompt: int, max_output: int | None,
                   seed: int = 0) -> Workload:
    """The first ``num`` rows of an Azure trace (prompt lengths capped at ``max_prompt``), or, without a trace,
    synthetic lengths (said so in ``source``). Prompt ids are random in [10, min(vocab, 120000))."""
    rng = random.Random(seed)
    hi = min(vocab_size, 120_000)
    if trace is not None:
        from hetserve.bench.datasets import read_azure_trace

        rows = read_azure_trace(trace)[:num]
        lens = [(min(r.context_tokens, max_prompt), r.generated_tokens) for r in rows]
        source = f"{trace.name}: first {len(rows)} rows, prompts capped at {max_prompt} tokens"
    else:
        lens = [(rng.randint(16, max_prompt), rng.randint(8, 256)) for _ in range(num)]
        source = f"synthetic lengths (no trace given), prompts <= {max_prompt}"
    if max_output is not None:
        lens = [(p, min(o, max_output)) for p, o in lens]
        source += f", outputs capped at {max_output}"
    prompts = [[rng.randrange(10, hi) for _ in range(max(1, p))] for p, _ in lens]
    return Workload(prompts, [max(1, o) for _, o in lens], source)


def run_offline(engine: Any, work: Workload, deadline_s: float, device: torch.device,
                stream: Any = None) -> dict[str, Any]:
    """Send every request at once, step until done or ``deadline_s`` (then abort the rest: a partial run,
    throughput over what finished and what was produced)."""
    ctx = torch.cuda.stream(stream) if stream is not None else nullcontext()
    produced: dict[str, int] = {}
    finished: set[str] = set()
    steps = 0
    with ctx:
        ids = []
        for i, (p, n) in enumerate(zip(work.prompts, work.output_lens, strict=True)):
            sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, detokenize=False)
            ids.append(engine.add_request(f"r{i}", p, sp))
        sync(device)
        t0 = time.perf_counter()
        partial = False
        while engine.has_unfinished_requests():
            for out in engine.step():
                produced[out.request_id] = len(out.outputs[0].token_ids)
                if out.finished:
                    finished.add(out.request_id)
            steps += 1
            if time.perf_counter() - t0 > deadline_s:
                partial = True
                engine.abort_request([i for i in ids if i not in finished])
                break
        sync(device)
        wall = time.perf_counter() - t0
    out_tokens = sum(produced.values())
    done_prompt = sum(len(work.prompts[int(r[1:])]) for r in finished)
    return {
        "num_requests": len(work.prompts),
        "completed": len(finished),
        "partial": partial,
        "output_tokens": out_tokens,
        "prompt_tokens_completed": done_prompt,
        "wall_s": wall,
        "steps": steps,
        "output_tok_s": out_tokens / wall if wall > 0 else 0.0,
        "total_tok_s": (out_tokens + done_prompt) / wall if wall > 0 else 0.0,
        "workload": work.source,
    }


def runner_step_times(runner: Any, seqs: Sequence[tuple[int, int]], vocab: int, device: torch.device,
                      warmup: int, repeat: int, tag: str, stream: Any = None,
                      launch_times: list[float] | None = None) -> list[float]:
    """Wall times of ``runner.execute`` for one synthetic step (per request: new tokens, cached tokens);
    ``launch_times`` also gets the host seconds until ``execute_async`` returned (the launch alone)."""
    from hetserve.profiling import synthetic_step

    named = [(f"{tag}{i}", n, c) for i, (n, c) in enumerate(seqs)]
    bs = runner.block_size
    pool = runner.num_kv_blocks
    first = synthetic_step(named, bs, new=True, vocab_size=vocab, num_pool_blocks=pool)
    again = synthetic_step(named, bs, new=False, vocab_size=vocab, num_pool_blocks=pool)
    decode = all(n == 1 for n, _ in seqs)
    times = []
    with torch.cuda.stream(stream) if stream is not None else nullcontext():
        runner.execute(first)
        sync(device)
        for i in range(warmup + repeat):
            t0 = time.perf_counter()
            res = runner.execute_async(again if decode else first)
            t1 = time.perf_counter()
            res.result()
            sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
                if launch_times is not None:
                    launch_times.append(t1 - t0)
        runner.execute(SchedulerOutput([], 0, finished_req_ids={r for r, _, _ in named}))
    return times


def write_result(name: str, doc: dict[str, Any]) -> Path:
    """Write a benchmark's result JSON under ``$OUT`` (a device run) or ``benchmarks/results/``; print where."""
    dst = Path(os.environ.get("OUT", Path(__file__).resolve().parent / "results")) / name
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text(json.dumps(doc, indent=1))
    print(f"wrote {dst}")
    return dst


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def matmul_tflops(device: torch.device, n: int = 8192, iters: int = 20, stream: Any = None,
                  graph: str | None = None) -> float:
    """bf16 n^3 matmul rate on ``stream``: eager, or replayed there from a CUDA graph captured on that same
    stream (``graph="stream"``) or on a fresh side stream (``graph="side"``, as a side-stream graph runner does)."""
    from hetserve.device.emulation import matmul_tflops_on

    s = stream or torch.cuda.current_stream(device)
    capture = None
    if graph is not None:
        capture = "partition" if graph == "stream" and s != torch.cuda.default_stream(device) else "side"
    return matmul_tflops_on(s, device, n, iters, capture)


def graph_partition_diag(device: torch.device, gcs: Sequence[Any]) -> dict[str, Any]:
    """``hetserve.device.graph_replay_check`` for every partition, and whether graphs stay inside all of them."""
    from hetserve.device import graph_replay_check

    out: dict[str, Any] = {"whole_eager_tflops": matmul_tflops(device, 4096, 10)}
    for gc in gcs:
        out[gc.name] = graph_replay_check(gc)
    out["graph_captured_on_partition_stays_inside"] = all(
        out[gc.name]["captured_on_partition_stays_inside"] for gc in gcs)
    out["graph_captured_on_side_stream_stays_inside"] = all(
        out[gc.name]["captured_on_side_stream_stays_inside"] for gc in gcs)
    return out


def copy_gbs(device: torch.device, nbytes: int = 2 << 30, iters: int = 20, stream: Any = None) -> float:
    s = stream or torch.cuda.current_stream(device)
    with torch.cuda.stream(s):
        g = torch.Generator(device=device)
        g.manual_seed(0)
        x = torch.empty(nbytes // 2, device=device, dtype=torch.bfloat16).normal_(generator=g)
        y = torch.empty_like(x)
        for _ in range(3):
            y.copy_(x)
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record(s)
        for _ in range(iters):
            y.copy_(x)
        e1.record(s)
        s.synchronize()
    del x, y
    return 2 * nbytes * iters / (e0.elapsed_time(e1) / 1e3) / 1e9


# ---------------------------------------------------------------------------------------------- results


class Results:
    """One JSON per section under ``tree/benchmarks/results``, profiles under ``tree/profiles``; after each
    section the tree is packed into ``out/gpu_suite_results.tar.gz`` and everything into ``out/summary.json``.
    ``tree`` lies outside ``out``: the device tool brings back at most 8 files, none deeper than two folders,
    so only the archive and the summary go into ``out``."""

    def __init__(self, out: Path, tree: Path, command: str, device_info: dict[str, Any]) -> None:
        self.out = out
        self.out.mkdir(parents=True, exist_ok=True)
        self.tree = tree
        self.results_dir = self.tree / "benchmarks" / "results"
        self.profiles_dir = self.tree / "profiles"
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.profiles_dir.mkdir(parents=True, exist_ok=True)
        self.command = command
        self.device_info = device_info
        self.commit = git_commit()
        self.sections: dict[str, dict[str, Any]] = {}
        self.rows: list[tuple[str, str, str, str]] = []

    def envelope(self, section: str, results: dict[str, Any], config: dict[str, Any],
                 emulation: dict[str, Any] | None, wall_s: float, error: str | None) -> dict[str, Any]:
        return {
            "section": section,
            "command": self.command,
            "git_commit": self.commit,
            "device": self.device_info,
            "emulation": emulation,
            "emulated": bool(emulation and emulation.get("emulated")),
            "config": config,
            "results": results,
            "wall_s": round(wall_s, 2),
            "error": error,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": versions(),
        }

    def save(self, section: str, env: dict[str, Any], name: str | None = None) -> None:
        self.sections[name or section] = env
        path = self.results_dir / f"gpu-{name or section}.json"
        path.write_text(json.dumps(env, indent=1, default=str) + "\n")
        self.pack()

    def row(self, section: str, metric: str, value: str, goal: str = "") -> None:
        self.rows.append((section, metric, value, goal))

    def pack(self) -> None:
        (self.out / "summary.json").write_text(
            json.dumps({"sections": self.sections, "table": self.rows}, indent=1, default=str) + "\n")
        tmp = self.out / "gpu_suite_results.tar.gz.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            for f in sorted(self.tree.rglob("*")):
                if f.is_file():
                    tar.add(f, arcname=str(f.relative_to(self.tree)))
        os.replace(tmp, self.out / "gpu_suite_results.tar.gz")

    def table(self) -> str:
        rows = [("section", "metric", "value", "goal")] + self.rows
        w = [max(len(r[i]) for r in rows) for i in range(4)]
        lines = [" | ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows]
        lines.insert(1, "-+-".join("-" * x for x in w))
        return "\n".join(lines)


def run_subprocess(argv: list[str], timeout_s: float, env: dict[str, str] | None = None,
                   cwd: Path | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=cwd or REPO,
                           check=False)
        return {"rc": r.returncode, "wall_s": time.perf_counter() - t0, "stdout_tail": r.stdout[-4000:],
                "stderr_tail": r.stderr[-3000:]}
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return {"rc": None, "timed_out": True, "wall_s": time.perf_counter() - t0, "stdout_tail": out[-4000:],
                "stderr_tail": err[-3000:]}


def error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}"


def copy_into(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
