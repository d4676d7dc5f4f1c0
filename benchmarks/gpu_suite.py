#!/usr/bin/env python3
"""The one GPU benchmark run (issue 5): correctness, profiles, decode/prefill, offline throughput on the whole
GPU and on disjoint SM partitions, and transformers' continuous batching as the peer, in under 9 minutes.

    python benchmarks/gpu_suite.py --trace .data/azure_llm_2023_conv.csv [--only a,b] [--smoke] [--out DIR]

Sections (``--only``): correctness, kernels, profile, decode, prefill, offline, partitions, peer. Each catches
its own errors, has a time budget (``--budget-s NAME=S``), writes ``benchmarks/results/gpu-<section>.json``
(command, git commit, device, emulation, config, results) into ``OUT/_tree`` and repacks
``OUT/gpu_suite_results.tar.gz`` (unpack at the repository root) plus ``OUT/summary.json``. A short table is
printed last. ``--smoke`` runs every section at minimal size (about a minute) to check the wiring. ``--device cpu``
runs what can run on a CPU with a tiny model (a wiring check for machines without a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from suite_common import (
    MAX_PROMPT_TOKENS,
    REPO,
    BigModel,
    Results,
    build_big_model,
    copy_gbs,
    error_text,
    find_trace,
    free_cuda,
    log,
    matmul_tflops,
)

SECTIONS = ("correctness", "kernels", "profile", "decode", "prefill", "offline", "partitions", "peer")
BUDGETS_S = {"correctness": 40, "kernels": 100, "profile": 85, "decode": 25, "prefill": 15, "offline": 80,
             "partitions": 80, "peer": 85}
SMOKE_BUDGETS_S = {"correctness": 12, "kernels": 12, "profile": 10, "decode": 4, "prefill": 3, "offline": 6,
                   "partitions": 10, "peer": 25}
NEEDS_MODEL = ("decode", "prefill", "offline", "partitions", "peer")
DEFAULT_MODEL_CONFIG = REPO / "examples" / "models" / "llama-3.1-8b" / "config.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    p.add_argument("--smoke", action="store_true", help="every section at minimal size (about a minute)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default=os.environ.get("OUT") or "/tmp/hetserve-gpu-suite-out",
                   help="where summary.json and gpu_suite_results.tar.gz go (default: $OUT)")
    p.add_argument("--work", default=None, help="scratch directory (default: a new one under /tmp)")
    p.add_argument("--trace", default=None, help="Azure conv trace CSV (default: .data/ or shared/data/)")
    p.add_argument("--model-config", default=None, help="config.json of the measured shape (default Llama-3.1-8B)")
    p.add_argument("--layers", type=int, default=None, help="layers of the measured model (default: all; smoke 2)")
    p.add_argument("--num-requests", type=int, default=1000)
    p.add_argument("--partition-requests", type=int, default=200)
    p.add_argument("--peer-requests", type=int, default=64)
    p.add_argument("--peer-output-len", type=int, default=128)
    p.add_argument("--partitions", default="32,100", help="SMs of the two disjoint green contexts")
    p.add_argument("--partition-memory-gb", default="24,48", help="memory cap of each partition (GiB)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--engine-arg", action="append", default=[], help="KEY=VALUE passed to the engine config")
    p.add_argument("--budget-s", action="append", default=[], help="SECTION=SECONDS")
    p.add_argument("--deadline-s", type=float, default=530.0, help="no section starts after this (whole run)")
    p.add_argument("--kernels-args", default=None, help="arguments for benchmarks/gpu_kernels.py")
    return p.parse_args(argv)


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


class Suite:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.t_start = time.perf_counter()
        self.device = torch.device(args.device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", 0)
        self.cuda = self.device.type == "cuda"
        self.smoke = args.smoke
        self.selected = [s.strip() for s in args.only.split(",") if s.strip()]
        bad = [s for s in self.selected if s not in SECTIONS]
        if bad:
            raise SystemExit(f"unknown section(s) {bad}; choose from {', '.join(SECTIONS)}")
        self.budgets = dict(SMOKE_BUDGETS_S if self.smoke else BUDGETS_S)
        for item in args.budget_s:
            k, _, v = item.partition("=")
            self.budgets[k] = float(v)
        self.engine_extra = {k: _value(v) for k, _, v in (a.partition("=") for a in args.engine_arg)}
        self.out = Path(args.out)
        self.work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="hetserve-gpu-suite-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.dtype_name = "bfloat16" if self.cuda else "float32"
        self.info = self._device_info()
        self.results = Results(self.out, self.work / "tree",
                               "python benchmarks/gpu_suite.py " + " ".join(sys.argv[1:]), self.info)
        self.trace = find_trace(args.trace)
        self.model_config = Path(args.model_config) if args.model_config else self._default_model_config()
        self._big: BigModel | None = None
        self.graph_diag: dict[str, Any] | None = None

    # ---- setup ------------------------------------------------------------------------------------
    def _device_info(self) -> dict[str, Any]:
        if not self.cuda:
            return {"torch_name": "cpu", "catalog_name": f"cpu-{os.cpu_count()}c", "num_sms": os.cpu_count()}
        from hetserve.device import physical_device_info

        info = physical_device_info(self.device.index or 0)
        log(f"device: {info['torch_name']} ({info['catalog_name']}), {info['num_sms']} SMs, "
            f"{info['total_memory_bytes'] / 2**30:.0f} GiB")
        try:
            info["matmul_tflops_bf16_8192"] = round(matmul_tflops(self.device, 4096 if self.smoke else 8192), 1)
            info["copy_gb_s"] = round(copy_gbs(self.device, (256 << 20) if self.smoke else (2 << 30)), 1)
            log(f"ceilings: {info['matmul_tflops_bf16_8192']} TFLOP/s bf16 matmul, {info['copy_gb_s']} GB/s copy")
        except Exception as e:  # noqa: BLE001
            info["ceilings_error"] = repr(e)
        return info

    def _default_model_config(self) -> Path:
        if self.cuda:
            return DEFAULT_MODEL_CONFIG
        from hetserve.tiny.make_tiny import make_tiny_model

        return make_tiny_model(self.work / "tiny-cpu-model", "llama") / "config.json"

    @property
    def layers(self) -> int | None:
        if self.args.layers is not None:
            return self.args.layers
        return 2 if self.smoke else None

    def big(self) -> BigModel:
        if self._big is None:
            t0 = time.perf_counter()
            self._big = build_big_model(self.model_config, self.layers, self.device, self.dtype_name, self.work)
            log(f"model: {self._big.cfg.num_hidden_layers} layers of {self.model_config.parent.name}, random "
                f"{self.dtype_name}, {self._big.weight_bytes / 2**30:.1f} GiB, "
                f"built in {time.perf_counter() - t0:.1f} s")
        return self._big

    def copy_bw(self) -> float:
        return float(self.info.get("copy_gb_s") or 0.0) * 1e9

    def remaining_s(self) -> float:
        return self.args.deadline_s - (time.perf_counter() - self.t_start)

    # ---- running sections -------------------------------------------------------------------------
    def run(self) -> int:
        import gpu_sections as S

        for name in SECTIONS:
            if name not in self.selected:
                continue
            budget = min(self.budgets[name], max(0.0, self.remaining_s()))
            if budget <= 1.0:
                env = self.results.envelope(name, {"skipped": "global deadline reached"}, {}, None, 0.0, None)
                self.results.save(name, env)
                self.results.row(name, "skipped", "deadline", "")
                log(f"== {name}: skipped (deadline)")
                continue
            log(f"== {name} (budget {budget:.0f} s)")
            t0 = time.perf_counter()
            try:
                if name in NEEDS_MODEL:
                    self.big()  # built once, outside every section's budget
                    budget = min(budget, max(1.0, self.remaining_s()))
                    t0 = time.perf_counter()
                getattr(S, f"section_{name}")(self, budget)
            except Exception as e:  # noqa: BLE001 - fail-soft per section
                err = error_text(e)
                log(f"!! {name} failed: {err}")
                env = self.results.envelope(name, {}, {}, None, time.perf_counter() - t0, err)
                self.results.save(name, env)
                self.results.row(name, "ERROR", f"{type(e).__name__}: {str(e)[:60]}", "")
            free_cuda()
        total = time.perf_counter() - self.t_start
        self.results.row("suite", "wall", f"{total:.0f} s", "< 540 s")
        self.results.pack()
        print("\n" + self.results.table(), flush=True)
        print(f"\nfiles: {self.out / 'gpu_suite_results.tar.gz'} (tar xzf ... at the repo root), "
              f"{self.out / 'summary.json'}; {total:.0f} s", flush=True)
        return 0

    def save(self, section: str, results: dict[str, Any], config: dict[str, Any], t0: float,
             emulation: dict[str, Any] | None = None, name: str | None = None, error: str | None = None) -> None:
        env = self.results.envelope(section, results, config, emulation, time.perf_counter() - t0, error)
        self.results.save(section, env, name)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log(f"gpu_suite: sections {args.only}{' (smoke)' if args.smoke else ''}; out {args.out}; "
        f"prompts capped at {MAX_PROMPT_TOKENS} tokens")
    suite = Suite(args)
    if suite.trace is None and any(s in suite.selected for s in ("offline", "partitions", "peer")):
        log("no Azure trace found: offline/partitions/peer use synthetic lengths (say so in results)")
    return suite.run()


if __name__ == "__main__":
    sys.exit(main())
