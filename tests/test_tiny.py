"""Tiny checkpoints load in transformers, tokenise multi-byte text, decode non-degenerately, are deterministic."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from hetserve.core.model_config import ModelConfig
from hetserve.engine.model.loader import load_model
from hetserve.tiny import make_tiny
from hetserve.tiny.make_tiny import SPECIAL_TOKENS, default_model_dir, make_tiny_model

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

ARCHS = ["llama", "qwen2", "qwen3", "mistral"]
STYLES = ["rope_parameters", "rope_scaling"]
MULTIBYTE = "Zoë mag Über-Straßen, 中文字符, and 🚀🎉 rockets — naïve café."


def hf_tokenizer(model_dir: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(model_dir)


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_loads_model_and_tokenizer(tiny_model_factory: Any, arch: str, style: str) -> None:
    model_dir = tiny_model_factory(arch, rope_style=style)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert type(hf).__name__ == ModelConfig.from_path(model_dir).architecture
    assert hf.config.vocab_size == 512
    tok = hf_tokenizer(model_dir)
    assert len(tok) == 512
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    ids = tok(MULTIBYTE)["input_ids"]
    adds_bos = arch in ("llama", "mistral")
    assert (ids[0] == 0) == adds_bos
    assert tok.decode(ids, skip_special_tokens=True) == MULTIBYTE
    chat = tok.apply_chat_template([{"role": "user", "content": "hi é"}], tokenize=False, add_generation_prompt=True)
    expected = "<|im_start|>user\nhi é<|im_end|>\n<|im_start|>assistant\n"
    assert chat == ("<|begin_of_text|>" if adds_bos else "") + expected
    assert (model_dir / "chat_template.jinja").exists() == (style == "rope_parameters")
    eos = tok.eos_token_id
    assert eos in hf.generation_config.eos_token_id
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", ARCHS)
def test_transformers_and_tokenizers_encode_identically(tiny_model_factory: Any, arch: str) -> None:
    """The server may tokenise with either library; transformers 5 rebuilds Qwen2's pipeline itself."""
    from tokenizers import Tokenizer

    model_dir = tiny_model_factory(arch)
    text = make_tiny.CORPUS_PATH.read_text(encoding="utf-8")[:6000] + MULTIBYTE + " 12345 <|im_end|> <|endoftext|>"
    raw = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    ids = hf_tokenizer(model_dir)(text)["input_ids"]
    assert ids == raw.encode(text).ids
    assert max(ids) < 512


@pytest.mark.parametrize("arch", ARCHS)
def test_rope_spellings_parse_identically(tiny_model_factory: Any, arch: str) -> None:
    new = ModelConfig.from_path(tiny_model_factory(arch, rope_style="rope_parameters"))
    old = ModelConfig.from_path(tiny_model_factory(arch, rope_style="rope_scaling"))
    assert new == old
    assert new.rope_theta > 10000
    assert (new.rope_scaling or {}).get("rope_type") == ("llama3" if arch == "llama" else None)


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_decoding_does_not_collapse(tiny_model_factory: Any, arch: str) -> None:
    model_dir = tiny_model_factory(arch)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tok = hf_tokenizer(model_dir)
    for text in ["The engineer carefully reads", "def fibonacci(n):"]:
        ids = tok(text)["input_ids"]
        out = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=1)
        new = out[0, len(ids) :].tolist()
        assert len(new) == 32
        assert len(set(new)) >= 12, f"{arch}: greedy output too repetitive: {new}"


def test_multibyte_characters_split_across_tokens(tiny_llama_dir: Path) -> None:
    """Incremental detokenisation must hold back partial UTF-8: some emoji span tokens that are not valid alone."""
    tok = hf_tokenizer(tiny_llama_dir)
    ids = tok("🚀", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    assert tok.decode(ids) == "🚀"


def test_sharded_checkpoint_matches_single_file(tiny_model_factory: Any) -> None:
    single = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_factory("qwen2", seed=5), dtype=torch.float32)
    sharded_dir = tiny_model_factory("qwen2", seed=5, shard_bytes=30_000)
    sharded = transformers.AutoModelForCausalLM.from_pretrained(sharded_dir, dtype=torch.float32)
    assert len(list(sharded_dir.glob("model-0000*-of-*.safetensors"))) > 1
    ids = torch.tensor([[5, 17, 300, 42, 7]])
    with torch.no_grad():
        assert torch.equal(single(ids).logits, sharded(ids).logits)


def test_bfloat16_checkpoint(tiny_model_factory: Any) -> None:
    model_dir = tiny_model_factory("llama", dtype="bfloat16")
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir)  # dtype from config
    assert next(hf.parameters()).dtype == torch.bfloat16


def test_deterministic(tmp_path: Path) -> None:
    a = make_tiny_model(tmp_path / "a", "qwen3", seed=7)
    b = make_tiny_model(tmp_path / "b", "qwen3", seed=7)
    c = make_tiny_model(tmp_path / "c", "qwen3", seed=8)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "tokenizer.json").read_bytes() == (c / "tokenizer.json").read_bytes()
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_bpe_training_is_fast_and_cached() -> None:
    make_tiny._trained_tokenizer_json.cache_clear()
    start = time.perf_counter()
    first = make_tiny._trained_tokenizer_json(640)
    elapsed_s = time.perf_counter() - start
    assert elapsed_s < 2.0
    assert make_tiny._trained_tokenizer_json(640) is first


def test_corpus_is_varied_and_multilingual() -> None:
    text = make_tiny.CORPUS_PATH.read_text(encoding="utf-8")
    assert 20_000 < len(text.encode()) < 200_000
    for needle in ["é", "ü", "中文", "🚀", "def ", "{"]:
        assert needle in text, needle
    assert len(set(text.split())) > 500


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="arch"):
        make_tiny_model(tmp_path, "gpt2")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="vocab_size"):
        make_tiny_model(tmp_path, "llama", vocab_size=200)
    with pytest.raises(ValueError, match="sliding"):
        make_tiny_model(tmp_path, "llama", sliding_window=4)


def test_default_model_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HETSERVE_CACHE", str(tmp_path))
    path = default_model_dir()
    assert path == tmp_path / "tiny-llama"
    assert ModelConfig.from_path(path).family == "llama"
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert default_model_dir() == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rewritten
    # a directory left half-written (no completion marker) is replaced
    (path / ".hetserve-tiny").unlink()
    (path / "model.safetensors").unlink()
    assert default_model_dir() == path
    load_model(path, "cpu", torch.float32)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-llama"]  # no temp dirs left behind
