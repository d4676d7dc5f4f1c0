"""Checkpoint loading: exact tensors, sharding, dtype casts, and an error naming the culprit for each bad input."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from hetserve.core.errors import ModelLoadError
from hetserve.core.model_config import ModelConfig
from hetserve.engine.model.loader import init_random_model, load_generation_config, load_model


def checkpoint_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture
def llama_copy(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_llama_dir, tmp_path / "model"))


@pytest.mark.parametrize(("arch", "kwargs"), [("llama", {}), ("qwen2", {}), ("qwen3", {"head_dim": 8})])
def test_loads_every_tensor_exactly(tiny_model_factory: Any, arch: str, kwargs: dict[str, Any]) -> None:
    model_dir = tiny_model_factory(arch, **kwargs)
    model, cfg = load_model(model_dir, "cpu", torch.float32)
    params = dict(model.named_parameters())
    ref = checkpoint_tensors(model_dir)
    assert set(params) == set(ref)
    for name, tensor in ref.items():
        assert torch.equal(params[name].detach(), tensor), name
    assert cfg == ModelConfig.from_path(model_dir)
    assert not model.training


def test_sharded_equals_single_file(tiny_model_factory: Any) -> None:
    single = tiny_model_factory("mistral", seed=3)
    sharded = tiny_model_factory("mistral", seed=3, shard_bytes=40_000)
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 2
    assert (sharded / "model.safetensors.index.json").exists()
    model, _ = load_model(sharded, "cpu", torch.float32)
    params = dict(model.named_parameters())
    ref = load_file(str(single / "model.safetensors"))
    assert set(params) == set(ref)
    for name, tensor in ref.items():
        assert torch.equal(params[name].detach(), tensor), name


def test_casts_to_requested_dtype(tiny_llama_dir: Path) -> None:
    model, _ = load_model(tiny_llama_dir, "cpu", torch.bfloat16)
    ref = checkpoint_tensors(tiny_llama_dir)
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16
        assert torch.equal(p.detach(), ref[name].to(torch.bfloat16)), name


def test_bf16_checkpoint_loads_into_fp32(tiny_model_factory: Any) -> None:
    model_dir = tiny_model_factory("qwen3", dtype="bfloat16")
    model, cfg = load_model(model_dir, "cpu", torch.float32)
    assert cfg.torch_dtype == "bfloat16"
    ref = checkpoint_tensors(model_dir)
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32 and ref[name].dtype == torch.bfloat16
        assert torch.equal(p.detach(), ref[name].float()), name


def test_extra_tensor_is_ignored_with_warning(llama_copy: Path, caplog: pytest.LogCaptureFixture) -> None:
    f = llama_copy / "model.safetensors"
    tensors = load_file(str(f))
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old checkpoints carry these
    tensors["model.mtp.extra.weight"] = torch.ones(2, 2)
    save_file(tensors, str(f), metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING):
        load_model(llama_copy, "cpu", torch.float32)
    assert "model.mtp.extra.weight" in caplog.text
    assert "inv_freq" not in caplog.text


def expect_error(model_dir: Path, *needles: str) -> ModelLoadError:
    with pytest.raises(ModelLoadError) as info:
        load_model(model_dir, "cpu", torch.float32)
    text = str(info.value)
    for needle in needles:
        assert needle in text, f"{needle!r} not in {text!r}"
    return info.value


def test_error_missing_dir(tmp_path: Path) -> None:
    err = expect_error(tmp_path / "nope", "does not exist", "nope")
    assert err.field == "model"


def test_error_not_a_dir(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    expect_error(f, "not a directory")


def test_error_missing_config(llama_copy: Path) -> None:
    (llama_copy / "config.json").unlink()
    expect_error(llama_copy, "config.json")


def test_error_corrupt_config(llama_copy: Path) -> None:
    (llama_copy / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    err = expect_error(llama_copy, "config.json", "not valid JSON")
    assert err.field == "config.json"


def test_error_unsupported_architecture(llama_copy: Path) -> None:
    cfg = json.loads((llama_copy / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (llama_copy / "config.json").write_text(json.dumps(cfg))
    err = expect_error(llama_copy, "GPT2LMHeadModel", "unsupported")
    assert "architectures" in err.field


def test_error_no_safetensors(llama_copy: Path) -> None:
    (llama_copy / "model.safetensors").unlink()
    err = expect_error(llama_copy, "no *.safetensors", str(llama_copy))
    assert err.field == "model"


def test_error_truncated_safetensors(llama_copy: Path) -> None:
    f = llama_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    err = expect_error(llama_copy, "model.safetensors")
    assert err.field == "model.safetensors"


def test_error_garbage_safetensors(llama_copy: Path) -> None:
    (llama_copy / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    expect_error(llama_copy, "model.safetensors", "cannot read")


def test_error_missing_tensor(llama_copy: Path) -> None:
    f = llama_copy / "model.safetensors"
    tensors = load_file(str(f))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(f), metadata={"format": "pt"})
    err = expect_error(llama_copy, "missing", "model.safetensors")
    assert err.field == "model.layers.1.mlp.up_proj.weight"


def test_error_wrong_shape(llama_copy: Path) -> None:
    f = llama_copy / "model.safetensors"
    tensors = load_file(str(f))
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
    save_file(tensors, str(f), metadata={"format": "pt"})
    err = expect_error(llama_copy, "[16, 64]", "[32, 64]")
    assert err.field == "model.safetensors: model.layers.0.self_attn.k_proj.weight"


def test_error_index_names_missing_shard(tiny_model_factory: Any, tmp_path: Path) -> None:
    src = tiny_model_factory("mistral", seed=3, shard_bytes=40_000)
    model_dir = Path(shutil.copytree(src, tmp_path / "model"))
    victim = sorted(model_dir.glob("model-*.safetensors"))[1]
    victim.unlink()
    expect_error(model_dir, "model.safetensors.index.json", victim.name)


def test_error_corrupt_index(tiny_model_factory: Any, tmp_path: Path) -> None:
    src = tiny_model_factory("mistral", seed=3, shard_bytes=40_000)
    model_dir = Path(shutil.copytree(src, tmp_path / "model"))
    (model_dir / "model.safetensors.index.json").write_text("{")
    err = expect_error(model_dir, "not valid JSON")
    assert err.field == "model.safetensors.index.json"


def test_generation_config(tiny_model_factory: Any, tmp_path: Path) -> None:
    gen = load_generation_config(tiny_model_factory("llama"))
    assert gen["eos_token_id"] == [1, 3]  # <|end_of_text|>, <|im_end|>
    assert load_generation_config(tmp_path) == {}
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 7, "temperature": 0.6}')
    assert load_generation_config(tmp_path) == {"eos_token_id": [7], "temperature": 0.6}
    (tmp_path / "generation_config.json").write_text("[1, 2")
    with pytest.raises(ModelLoadError, match="generation_config.json"):
        load_generation_config(tmp_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_init_random_model(tiny_model_factory: Any, dtype: torch.dtype) -> None:
    cfg = ModelConfig.from_path(tiny_model_factory("qwen3", head_dim=32))
    a = init_random_model(cfg, "cpu", dtype, seed=1)
    b = init_random_model(cfg, "cpu", dtype, seed=1)
    c = init_random_model(cfg, "cpu", dtype, seed=2)
    loaded, _ = load_model(tiny_model_factory("qwen3", head_dim=32), "cpu", dtype)
    shapes = {n: p.shape for n, p in loaded.named_parameters()}
    assert {n: p.shape for n, p in a.named_parameters()} == shapes
    assert sum(p.numel() for p in a.parameters()) == cfg.num_params()
    pa, pb, pc = dict(a.named_parameters()), dict(b.named_parameters()), dict(c.named_parameters())
    for name, p in pa.items():
        assert p.device.type == "cpu" and p.dtype == dtype
        assert torch.isfinite(p).all(), name
        assert torch.equal(p, pb[name]), name
        if name.endswith("norm.weight"):
            assert torch.all(p == 1), name
        else:
            assert not torch.equal(p, pc[name]), name
            assert 0.01 < p.float().std().item() < 0.03, name
