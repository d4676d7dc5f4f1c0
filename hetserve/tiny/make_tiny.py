"""Write tiny random-weight checkpoints in real Hugging Face form (config, safetensors, tokenizer, templates).

They load with ``transformers.AutoModelForCausalLM`` / ``AutoTokenizer`` and with our loader, so tests and the
default server run without downloads. ``python -m hetserve.tiny.make_tiny OUT_DIR --arch qwen3`` writes one.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

Arch = Literal["llama", "qwen2", "qwen3", "mistral"]
RopeStyle = Literal["rope_scaling", "rope_parameters"]

BOS, EOS, IM_START, IM_END = "<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (BOS, EOS, IM_START, IM_END)  # trained first, so their ids are 0..3
BOS_ID, EOS_ID, IM_START_ID, IM_END_ID = range(4)
CORPUS_PATH = Path(__file__).with_name("corpus.txt")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MIN_VOCAB = 256 + len(SPECIAL_TOKENS) + 1  # byte alphabet + specials + at least one merge


@dataclass(frozen=True)
class _ArchSpec:
    hf_class: str
    rope_theta: float
    tie_word_embeddings: bool
    add_bos: bool  # whether the tokenizer prepends <|begin_of_text|>
    eos_token_ids: tuple[int, ...]  # first: the config's eos (end of turn); all: generation_config stop tokens


_ARCH_SPECS: dict[str, _ArchSpec] = {
    "llama": _ArchSpec("LlamaForCausalLM", 500000.0, False, True, (EOS_ID, IM_END_ID)),
    "mistral": _ArchSpec("MistralForCausalLM", 1000000.0, False, True, (EOS_ID,)),
    "qwen2": _ArchSpec("Qwen2ForCausalLM", 1000000.0, True, False, (IM_END_ID, EOS_ID)),
    "qwen3": _ArchSpec("Qwen3ForCausalLM", 1000000.0, False, False, (IM_END_ID, EOS_ID)),
}


def llama3_rope(max_position_embeddings: int) -> dict[str, Any]:
    """Llama 3.1-style scaling from a pre-training length of a quarter of the context. With head_dim 16,
    theta 5e5 and 2048 positions, all three frequency bands (kept, blended, divided by factor) are non-empty."""
    return {
        "rope_type": "llama3",
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": max(1, max_position_embeddings // 4),
    }


_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


# Pre-tokenizer split patterns in the style of Llama 3 (digits in runs of up to three) and Qwen2 (single
# digits, NFC-normalised). transformers 5 rebuilds Qwen2's pipeline from vocab + merges with exactly the Qwen2
# pattern, so our tokenizer.json must use it too for both loaders to agree.
_SPLIT_PATTERNS = {
    "llama": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
    "qwen": r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""",
}


def _pipeline_style(arch: str) -> str:
    return "qwen" if arch in ("qwen2", "qwen3") else "llama"


@functools.lru_cache(maxsize=8)
def _trained_tokenizer_json(vocab_size: int, style: str = "llama") -> str:
    """Byte-level BPE trained on the bundled corpus; deterministic, ~0.05 s, cached per (vocab size, style)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    if style == "qwen":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_SPLIT_PATTERNS[style]), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    paragraphs = CORPUS_PATH.read_text(encoding="utf-8").split("\n\n")
    tok.train_from_iterator(paragraphs, trainer=trainer)
    return tok.to_str()


def tokenizer_json(vocab_size: int, arch: str) -> str:
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_str(_trained_tokenizer_json(vocab_size, _pipeline_style(arch)))
    byte_level = processors.ByteLevel(trim_offsets=False)
    if _ARCH_SPECS[arch].add_bos:
        template = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, BOS_ID)]
        )
        tok.post_processor = processors.Sequence([byte_level, template])
    else:
        tok.post_processor = byte_level
    return tok.to_str(pretty=True)


def _rope_fields(style: RopeStyle, theta: float, scaling: dict[str, Any] | None) -> dict[str, Any]:
    if style == "rope_parameters":
        return {"rope_parameters": {"rope_theta": theta, "rope_type": "default", **(scaling or {})}}
    return {"rope_theta": theta, "rope_scaling": dict(scaling) if scaling else None}


def build_config(
    arch: Arch,
    *,
    num_layers: int,
    hidden_size: int,
    num_heads: int,
    num_kv_heads: int,
    vocab_size: int,
    intermediate_size: int,
    head_dim: int | None,
    tie_word_embeddings: bool,
    rope_style: RopeStyle,
    rope_scaling: dict[str, Any] | None,
    max_position_embeddings: int,
    sliding_window: int | None,
    dtype: str,
) -> dict[str, Any]:
    """config.json as transformers writes it for ``arch`` (transformers 5 form for ``rope_parameters``)."""
    spec = _ARCH_SPECS[arch]
    cfg: dict[str, Any] = {
        "architectures": [spec.hf_class],
        "model_type": arch,
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-5 if arch in ("llama", "mistral") else 1e-6,
        "tie_word_embeddings": tie_word_embeddings,
        "bos_token_id": BOS_ID if spec.add_bos else EOS_ID,
        "eos_token_id": spec.eos_token_ids[0],
        "attention_dropout": 0.0,
        "use_cache": True,
    }
    if head_dim is not None or arch != "qwen2":
        cfg["head_dim"] = head_dim if head_dim is not None else hidden_size // num_heads
    if arch in ("llama", "qwen3"):
        cfg["attention_bias"] = False
    if arch == "llama":
        cfg["mlp_bias"] = False
    if arch == "mistral":
        cfg["sliding_window"] = sliding_window
    if arch in ("qwen2", "qwen3"):
        # every layer windowed when a window is asked for, as max_window_layers=0 says
        cfg["use_sliding_window"] = sliding_window is not None
        cfg["sliding_window"] = sliding_window
        cfg["max_window_layers"] = 0 if sliding_window is not None else num_layers
        kind = "sliding_attention" if sliding_window is not None else "full_attention"
        cfg["layer_types"] = [kind] * num_layers
    cfg.update(_rope_fields(rope_style, spec.rope_theta, rope_scaling))
    if rope_style == "rope_parameters":
        cfg.update({"dtype": dtype, "transformers_version": "5.0.0"})
    else:
        cfg.update({"torch_dtype": dtype, "transformers_version": "4.46.0"})
    return cfg


def weight_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """HF tensor names and shapes for a config written by :func:`build_config`, in checkpoint order."""
    arch = cfg["model_type"]
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes[p + "input_layernorm.weight"] = (h,)
        for name, out_dim in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            shapes[p + f"self_attn.{name}.weight"] = (out_dim, h)
            if arch == "qwen2":
                shapes[p + f"self_attn.{name}.bias"] = (out_dim,)
        shapes[p + "self_attn.o_proj.weight"] = (h, q)
        if arch == "qwen3":
            shapes[p + "self_attn.q_norm.weight"] = (hd,)
            shapes[p + "self_attn.k_norm.weight"] = (hd,)
        shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes[p + "mlp.gate_proj.weight"] = (i, h)
        shapes[p + "mlp.up_proj.weight"] = (i, h)
        shapes[p + "mlp.down_proj.weight"] = (h, i)
    shapes["model.norm.weight"] = (h,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, h)
    return shapes


def random_weights(cfg: dict[str, Any], seed: int, init_std: float, dtype: str) -> dict[str, torch.Tensor]:
    """Norm weights near 1 (not exactly 1, so a skipped norm weight shows up in tests); the rest N(0, std)."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, shape in weight_shapes(cfg).items():
        noise = torch.randn(shape, generator=gen, dtype=torch.float32)
        if name.endswith("norm.weight"):
            tensor = 1.0 + 0.1 * noise
        elif name == "model.embed_tokens.weight":
            # large enough that the residual stream carries the token, small enough that (tied) logits do
            # not just echo the input token: greedy decoding then wanders instead of repeating one token
            tensor = 0.5 * noise
        else:
            tensor = init_std * noise
        out[name] = tensor.to(_DTYPES[dtype]).contiguous()
    return out


def _write_weights(out: Path, tensors: dict[str, torch.Tensor], shard_bytes: int | None) -> None:
    meta = {"format": "pt"}
    if shard_bytes is None:
        save_file(tensors, str(out / "model.safetensors"), metadata=meta)
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map: dict[str, str] = {}
    for k, shard in enumerate(shards, start=1):
        fname = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / fname), metadata=meta)
        weight_map.update({name: fname for name in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _write_json(out / "model.safetensors.index.json", index)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_tokenizer(out: Path, arch: Arch, vocab_size: int, rope_style: RopeStyle, max_len: int) -> None:
    add_bos = _ARCH_SPECS[arch].add_bos
    (out / "tokenizer.json").write_text(tokenizer_json(vocab_size, arch), encoding="utf-8")
    template = ("{{ bos_token }}" if add_bos else "") + _CHATML
    eos = SPECIAL_TOKENS[_ARCH_SPECS[arch].eos_token_ids[0]]
    # unk_token null: otherwise transformers' Qwen2Tokenizer appends its own "<|endoftext|>" past the vocab
    special = {"bos_token": BOS if add_bos else None, "eos_token": eos, "pad_token": EOS, "unk_token": None}
    tok_cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(i): {
                "content": t,
                "special": True,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "single_word": False,
            }
            for i, t in enumerate(SPECIAL_TOKENS)
        },
    }
    if rope_style == "rope_parameters":
        (out / "chat_template.jinja").write_text(template, encoding="utf-8")  # transformers 5 layout
    else:
        tok_cfg["chat_template"] = template
    _write_json(out / "tokenizer_config.json", tok_cfg)
    _write_json(out / "special_tokens_map.json", {k: v for k, v in special.items() if v is not None})


def make_tiny_model(
    out_dir: str | Path,
    arch: Arch,
    *,
    num_layers: int = 2,
    hidden_size: int = 64,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 512,
    intermediate_size: int | None = None,
    head_dim: int | None = None,
    tie_word_embeddings: bool | None = None,
    seed: int = 0,
    rope_style: RopeStyle = "rope_parameters",
    max_position_embeddings: int = 2048,
    dtype: str = "float32",
    shard_bytes: int | None = None,
    rope_scaling: dict[str, Any] | None = None,
    sliding_window: int | None = None,
    init_std: float = 0.25,
) -> Path:
    """Write a complete checkpoint directory for ``arch`` and return its path.

    ``rope_scaling`` (e.g. ``{"rope_type": "yarn", "factor": 4.0, ...}``) replaces the arch default (llama3
    scaling for llama, plain rope otherwise); ``{"rope_type": "default"}`` turns llama's off.
    ``sliding_window`` windows every layer (mistral, qwen2, qwen3).
    """
    if arch not in _ARCH_SPECS:
        raise ValueError(f"arch must be one of {sorted(_ARCH_SPECS)}, got {arch!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    if vocab_size < _MIN_VOCAB:
        raise ValueError(f"vocab_size must be >= {_MIN_VOCAB} (byte alphabet + special tokens), got {vocab_size}")
    if sliding_window is not None and arch == "llama":
        raise ValueError("llama has no sliding window; use mistral, qwen2 or qwen3")
    spec = _ARCH_SPECS[arch]
    if rope_scaling is None and arch == "llama":
        rope_scaling = llama3_rope(max_position_embeddings)
    if rope_scaling is not None and rope_scaling.get("rope_type", "default") == "default":
        rope_scaling = None
    cfg = build_config(
        arch,
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        vocab_size=vocab_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        head_dim=head_dim,
        tie_word_embeddings=spec.tie_word_embeddings if tie_word_embeddings is None else tie_word_embeddings,
        rope_style=rope_style,
        rope_scaling=rope_scaling,
        max_position_embeddings=max_position_embeddings,
        sliding_window=sliding_window,
        dtype=dtype,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "config.json", cfg)
    _write_weights(out, random_weights(cfg, seed, init_std, dtype), shard_bytes)
    _write_tokenizer(out, arch, vocab_size, rope_style, max_position_embeddings)
    gen = {
        "bos_token_id": cfg["bos_token_id"],
        "eos_token_id": list(spec.eos_token_ids),
        "transformers_version": "5.0.0",
    }
    _write_json(out / "generation_config.json", gen)
    return out


_DEFAULT_NAME = "tiny-llama"
_MARKER = ".hetserve-tiny"  # written last; its content identifies the generator version
_MARKER_TEXT = "tiny-llama v1\n"


def default_model_dir() -> Path:
    """The embedded default model: a tiny llama under ``$HETSERVE_CACHE`` (default ``~/.cache/hetserve``).

    Made on first use in a temporary directory and renamed into place, so readers never see a partial one.
    """
    root = Path(os.environ.get("HETSERVE_CACHE") or Path.home() / ".cache" / "hetserve")
    target = root / _DEFAULT_NAME
    marker = target / _MARKER
    if marker.exists() and marker.read_text() == _MARKER_TEXT:
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{_DEFAULT_NAME}-", dir=root))
    try:
        make_tiny_model(tmp, "llama")
        (tmp / _MARKER).write_text(_MARKER_TEXT)
        if target.exists():  # stale version or left incomplete by a crash
            stale = root / f".{_DEFAULT_NAME}-stale-{uuid.uuid4().hex}"
            try:
                os.rename(target, stale)
            except OSError:
                pass
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (marker.exists() and marker.read_text() == _MARKER_TEXT):  # lost a race to a valid writer: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out_dir")
    ap.add_argument("--arch", default="llama", choices=sorted(_ARCH_SPECS))
    ap.add_argument("--num-layers", type=int, default=2)
    ap.add_argument("--hidden-size", type=int, default=64)
    ap.add_argument("--vocab-size", type=int, default=512)
    ap.add_argument("--dtype", default="float32", choices=sorted(_DTYPES))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    path = make_tiny_model(
        args.out_dir,
        args.arch,
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        vocab_size=args.vocab_size,
        dtype=args.dtype,
        seed=args.seed,
    )
    print(path)


if __name__ == "__main__":
    main()
