"""Load a Hugging Face Llama-family checkpoint (config.json + safetensors) straight onto a device."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from hetserve.core.errors import ModelLoadError
from hetserve.core.model_config import ModelConfig
from hetserve.engine.model.llama import LlamaForCausalLM
from hetserve.engine.model.parallel import ParallelSpec

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
# tensors some checkpoints carry that the model recomputes or shares
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _check_dir(model_dir: str | Path) -> Path:
    path = Path(model_dir)
    if not path.exists():
        raise ModelLoadError("model", f"model directory {path} does not exist")
    if not path.is_dir():
        raise ModelLoadError("model", f"{path} is not a directory")
    return path


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(path.name, f"not valid JSON: {e}") from None


def safetensors_files(model_dir: Path) -> list[Path]:
    """The weight files to read: the shards named by the index if there is one, else every ``*.safetensors``."""
    index_path = model_dir / INDEX_FILE
    if index_path.exists():
        index = _read_json(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelLoadError(f"{INDEX_FILE}: weight_map", "missing or empty")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.exists():
                raise ModelLoadError(INDEX_FILE, f"names shard {f.name}, which does not exist in {model_dir}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        hint = " (only PyTorch .bin weights found; convert them to safetensors)" if any(model_dir.glob("*.bin")) else ""
        raise ModelLoadError("model", f"no *.safetensors weight files in {model_dir}{hint}")
    return files


def _safe_open_device(device: torch.device) -> str:
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def _build_empty(
    cfg: ModelConfig, device: torch.device, dtype: torch.dtype, parallel: ParallelSpec | None = None
) -> LlamaForCausalLM:
    """The module tree with uninitialised storage on ``device``: no wasted random init, no CPU detour.

    q/k/v and gate/up are then re-homed into fused tensors (layer by layer, so the peak is one layer over the
    model's size); the HF-named parameters are views of them, so the loader fills the fused weights in place.
    """
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, parallel)
    model = model.to(dtype=dtype).to_empty(device=device)
    model.fuse_projections()
    return model


def load_model(
    model_dir: str | Path, device: torch.device | str, dtype: torch.dtype, parallel: ParallelSpec | None = None
) -> tuple[LlamaForCausalLM, ModelConfig]:
    """Read config.json and every safetensors shard; verify each parameter is present once with the right shape.
    With ``parallel``, only this pipeline stage's tensors are read, each as this TP rank's slice."""
    path = _check_dir(model_dir)
    cfg = ModelConfig.from_path(path)
    files = safetensors_files(path)
    device = torch.device(device)
    model = _build_empty(cfg, device, dtype, parallel)
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    unexpected: list[str] = []
    for f in files:
        try:
            handle = safe_open(str(f), framework="pt", device=_safe_open_device(device))
        except (SafetensorError, OSError) as e:
            raise ModelLoadError(f.name, f"cannot read safetensors file: {e}") from None
        with handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                param = params.get(name)
                if param is None:
                    if parallel is not None and not parallel.owns(name, cfg):
                        continue  # another pipeline stage's
                    if not (name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and cfg.tie_word_embeddings)):
                        unexpected.append(name)
                    continue
                if name in loaded:
                    raise ModelLoadError(f"{f.name}: {name}", "tensor appears in more than one weight file")
                shape = tuple(handle.get_slice(name).get_shape())
                cut = None if parallel is None else parallel.shard(name, cfg)
                if cut is not None:  # this TP rank's rows or columns
                    dim, a, b = cut
                    shape = (*shape[:dim], min(b, shape[dim]) - a, *shape[dim + 1 :])
                if shape != tuple(param.shape):
                    raise ModelLoadError(
                        f"{f.name}: {name}", f"shape {list(shape)} does not match expected {list(param.shape)}"
                    )
                try:
                    if cut is None:
                        tensor = handle.get_tensor(name)
                    else:
                        tensor = handle.get_slice(name)[(*[slice(None)] * cut[0], slice(cut[1], cut[2]))]
                except (SafetensorError, OSError, RuntimeError) as e:
                    raise ModelLoadError(f"{f.name}: {name}", f"cannot read tensor: {e}") from None
                with torch.no_grad():
                    param.copy_(tensor)
                loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ModelLoadError(
            missing[0], f"tensor missing from checkpoint{more}; searched {', '.join(f.name for f in files)}"
        )
    if unexpected:
        logger.warning("ignoring %d unexpected tensors in %s: %s", len(unexpected), path, unexpected[:5])
    model.eval()
    return model, cfg


def load_generation_config(model_dir: str | Path) -> dict[str, Any]:
    """generation_config.json as a dict ({} if absent); ``eos_token_id`` is always a list when present."""
    path = _check_dir(model_dir) / "generation_config.json"
    if not path.exists():
        return {}
    gen = _read_json(path)
    if not isinstance(gen, dict):
        raise ModelLoadError(path.name, "top level must be a JSON object")
    eos = gen.get("eos_token_id")
    if eos is not None and not isinstance(eos, list):
        gen["eos_token_id"] = [eos]
    return gen


def init_random_model(
    cfg: ModelConfig, device: torch.device | str, dtype: torch.dtype, seed: int = 0, std: float = 0.02,
    parallel: ParallelSpec | None = None,
) -> LlamaForCausalLM:
    """Random weights generated directly on ``device`` (no files): norms are 1, everything else N(0, std).
    With ``parallel``, only that stage's / rank's share (drawn independently: shards of one model do not add up
    to the unsharded random model)."""
    device = torch.device(device)
    model = _build_empty(cfg, device, dtype, parallel)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, std, generator=gen)
    model.eval()
    return model
