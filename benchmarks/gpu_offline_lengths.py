"""Offline throughput of the 8B-shaped model on one GPU for several length mixes, with where the time goes.

The Azure-conv trace has ~1,000-token prompts, so its prefill FLOPs bound output tok/s far below figures
published for ShareGPT-shaped requests (~230 in / ~200 out). This script runs both side by side in one
process: the trace's first N rows and synthetic ShareGPT-shaped lengths (uniform, stated), and splits each
step's wall time into the runner (GPU work + its host preparation) and the rest (scheduler, engine books).

    python benchmarks/gpu_offline_lengths.py --trace .data/azure_llm_2023_conv.csv [--num 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from suite_common import Workload, azure_workload, build_big_model, git_commit, make_engine, run_offline  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trace", required=True)
    ap.add_argument("--num", type=int, default=1000)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--only", choices=["azure", "sharegpt"], default=None)
    args = ap.parse_args()
    dev = torch.device("cuda")
    big = build_big_model(ROOT / "examples/models/llama-3.1-8b/config.json", None, dev, "bfloat16",
                          Path(tempfile.mkdtemp()))
    vocab = big.cfg.vocab_size
    rng = random.Random(0)
    synth_lens = [(rng.randint(32, 448), rng.randint(32, 384)) for _ in range(args.num)]
    works = {
        "azure-conv (first rows, prompts <= 4096)": azure_workload(Path(args.trace), args.num, vocab, 4096, None),
        "sharegpt-shaped synthetic (in U[32,448], out U[32,384])": Workload(
            [[rng.randrange(10, 120000) for _ in range(p)] for p, _ in synth_lens], [o for _, o in synth_lens],
            "synthetic uniform lengths, mean 240 in / 208 out"),
    }
    if args.only:
        works = {k: v for k, v in works.items() if k.startswith(args.only)}
    flops_per_token = 2 * big.cfg.num_params()
    peak = 781e12
    results = {}
    for name, work in works.items():
        engine = make_engine(big, num_blocks=None, max_num_seqs=args.max_num_seqs,
                             max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=8192, extra={})
        runner = engine.executor
        spent = {"runner_s": 0.0}
        inner = runner.execute

        def timed(so, inner=inner, spent=spent):  # noqa: ANN001
            t = time.perf_counter()
            out = inner(so)
            spent["runner_s"] += time.perf_counter() - t
            return out

        runner.execute = timed  # type: ignore[method-assign]
        run_offline(engine, work.head(8, 8), 60.0, dev)  # warm-up (graphs, kernels)
        spent["runner_s"] = 0.0
        r = run_offline(engine, work, 400.0, dev)
        r["runner_s"] = spent["runner_s"]
        r["outside_runner_s"] = r["wall_s"] - spent["runner_s"]
        r["prompt_tokens"] = work.prompt_tokens
        r["prefill_flop_bound_s"] = work.prompt_tokens * flops_per_token / peak
        r["output_tok_s_bound_from_prefill_alone"] = r["output_tokens"] / r["prefill_flop_bound_s"]
        results[name] = r
        print(f"{name}: {r['output_tok_s']:.0f} out tok/s, {r['total_tok_s']:.0f} total tok/s, wall {r['wall_s']:.1f} s, "
              f"runner {r['runner_s']:.1f} s, outside runner {r['outside_runner_s']:.1f} s, steps {r['steps']}, "
              f"prefill at 781 TFLOP/s alone needs {r['prefill_flop_bound_s']:.1f} s "
              f"(bound {r['output_tok_s_bound_from_prefill_alone']:.0f} out tok/s)", flush=True)
        runner.execute = inner  # type: ignore[method-assign]
        del engine, runner, timed, inner
        import gc

        gc.collect()
        torch.cuda.empty_cache()
    out = {"benchmark": "offline throughput by length mix", "command": " ".join(sys.argv), "git_commit": git_commit(),
           "device": torch.cuda.get_device_name(), "emulation": None, "emulated": False,
           "config": {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
                      "model": "llama-3.1-8b shape, random bf16", "sampling": "greedy, ignore_eos, detokenize off"},
           "results": results}
    dst = Path(os.environ.get("OUT", ROOT / "benchmarks/results")) / "gpu-offline-lengths.json"
    dst.write_text(json.dumps(out, indent=2))
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
