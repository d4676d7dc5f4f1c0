"""``hetserve make-tiny-model DIR --arch ...``"""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out_dir", help="directory to write (created)")
    p.add_argument("--arch", choices=["llama", "qwen2", "qwen3", "mistral"], default="llama")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rope-style", choices=["rope_parameters", "rope_scaling"], default="rope_parameters",
                   help="config spelling: transformers 5 (rope_parameters) or older (rope_theta + rope_scaling)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")


def run(args: argparse.Namespace) -> int:
    from hetserve.tiny.make_tiny import make_tiny_model

    for flag in ("layers", "hidden", "heads", "kv_heads", "vocab"):
        v = getattr(args, flag)
        if v < 1:
            raise SystemExit(f"hetserve make-tiny-model: error: --{flag.replace('_', '-')} must be >= 1, got {v}")
    path = make_tiny_model(
        args.out_dir, args.arch, num_layers=args.layers, hidden_size=args.hidden, num_heads=args.heads,
        num_kv_heads=args.kv_heads, vocab_size=args.vocab, intermediate_size=args.intermediate,
        head_dim=args.head_dim, seed=args.seed, rope_style=args.rope_style, dtype=args.dtype,
    )
    print(f"wrote {path}")
    return 0
