"""``hetserve demo``: the embedded default. Until the server lands, the offline API on a batch of prompts."""

from __future__ import annotations

import argparse
import time

_PROMPTS = [
    "The quick brown fox",
    "Once upon a time in a small village,",
    "def fibonacci(n):",
    "Heterogeneous clusters mix",
    "Le café est",
    "In 2026 the most common GPU was",
    "import torch\nx =",
    "Tell me a story about a robot",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF model directory (default: the embedded tiny model)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)


def run(args: argparse.Namespace) -> int:
    from hetserve import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(args.model)
    t_load = time.perf_counter() - t0
    prompts = [_PROMPTS[i % len(_PROMPTS)] + f" #{i}" for i in range(args.num_prompts)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    t1 = time.perf_counter()
    outs = llm.generate(prompts, params)
    dt = time.perf_counter() - t1
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    n_in = sum(len(o.prompt_token_ids) for o in outs)
    for o in outs[:4]:
        print(f"{o.prompt!r} -> {o.outputs[0].text!r}")
    print(f"model: {llm.config.model} (loaded in {t_load:.2f} s, device {llm.engine.executor.device})")
    print(f"{len(outs)} requests, {n_in} prompt + {n_out} output tokens in {dt:.2f} s: "
          f"{n_out / dt:.1f} output tokens/s, {len(outs) / dt:.2f} requests/s")
    return 0
