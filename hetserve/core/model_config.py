"""Model shapes parsed from a Hugging Face ``config.json``: pure Python, shared by the runner and the cost model."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hetserve.core.errors import ModelLoadError

# architecture name in config.json -> our family flags
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "fp8": 1, "float8_e4m3fn": 1}


def dtype_num_bytes(dtype: str) -> int:
    try:
        return _DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: {sorted(_DTYPE_BYTES)}") from None


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of one Llama-family decoder. Units: counts unless named otherwise."""

    architecture: str
    family: str  # llama | mistral | qwen2 | qwen3
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # normalised rope parameters: {"rope_type": ..., factor, ...}; rope_theta kept separately
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 and Llama attention_bias
    o_bias: bool = False  # Llama attention_bias also biases o_proj
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3 RMSNorm on q and k per head
    sliding_window: int | None = None
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "bfloat16"
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def kv_bytes_per_token(self, dtype: str = "bfloat16") -> int:
        """Bytes of K and V for one token across all layers."""
        return 2 * self.num_hidden_layers * self.kv_size * dtype_num_bytes(dtype)

    def num_params(self) -> int:
        h, i, L = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        attn = h * self.q_size + 2 * h * self.kv_size + self.q_size * h
        if self.qkv_bias:
            attn += self.q_size + 2 * self.kv_size
        if self.o_bias:
            attn += h
        mlp = 3 * h * i + (2 * i + h if self.mlp_bias else 0)
        norms = 2 * h + (2 * self.head_dim if self.qk_norm else 0)
        embed = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return L * (attn + mlp + norms) + embed + h

    def weight_bytes(self, dtype: str = "bfloat16") -> int:
        return self.num_params() * dtype_num_bytes(dtype)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> ModelConfig:
        archs = cfg.get("architectures") or []
        if not archs:
            mt = cfg.get("model_type")
            guess = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}.get(str(mt))
            if guess is None:
                raise ModelLoadError(
                    f"{source}: architectures",
                    f"missing, and model_type {mt!r} is not one of {sorted(set(SUPPORTED_ARCHITECTURES.values()))}",
                )
            archs = [guess]
        arch = archs[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"{source}: architectures",
                f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}",
            )
        family = SUPPORTED_ARCHITECTURES[arch]

        def need(key: str) -> Any:
            if key not in cfg or cfg[key] is None:
                raise ModelLoadError(f"{source}: {key}", "required key is missing")
            return cfg[key]

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        kv_heads = int(cfg.get("num_key_value_heads") or heads)
        if heads % kv_heads:
            raise ModelLoadError(
                f"{source}: num_key_value_heads", f"{kv_heads} does not divide num_attention_heads {heads}"
            )
        head_dim = cfg.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise ModelLoadError(f"{source}: head_dim", "missing and hidden_size is not divisible by heads")
            head_dim = hidden // heads

        # Two spellings: transformers 5 writes rope_parameters (with rope_theta inside);
        # older checkpoints write rope_theta at top level and rope_scaling (may be null).
        rope_params = cfg.get("rope_parameters")
        rope_scaling = cfg.get("rope_scaling")
        rope_theta = cfg.get("rope_theta")
        rp: dict[str, Any] | None = None
        if isinstance(rope_params, dict) and rope_params:
            rp = dict(rope_params)
        elif isinstance(rope_scaling, dict) and rope_scaling:
            rp = dict(rope_scaling)
        if rp is not None:
            if rope_theta is None and "rope_theta" in rp:
                rope_theta = rp["rope_theta"]
            rp.pop("rope_theta", None)
            rtype = rp.get("rope_type", rp.get("type", "default"))
            rp["rope_type"] = rtype
            rp.pop("type", None)
            if rtype not in SUPPORTED_ROPE_TYPES:
                key = "rope_parameters" if rope_params else "rope_scaling"
                raise ModelLoadError(
                    f"{source}: {key}.rope_type",
                    f"unsupported rope type {rtype!r}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}",
                )
            if rtype == "default":
                rp = None
        if rope_theta is None:
            rope_theta = 10000.0

        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ModelLoadError(f"{source}: hidden_act", f"unsupported activation {act!r}; supported: silu")

        sliding = None
        if family == "mistral":
            sliding = cfg.get("sliding_window")
        elif family in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
            sliding = cfg.get("sliding_window")

        eos = cfg.get("eos_token_id")
        eos_ids: tuple[int, ...] = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        attn_bias = bool(cfg.get("attention_bias", False))
        dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"
        return cls(
            architecture=arch,
            family=family,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta),
            rope_scaling=rp,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            # HF: Qwen2 always biases q/k/v; Llama and Qwen3 bias q/k/v/o when attention_bias; Mistral never
            qkv_bias=(family == "qwen2") or (attn_bias and family in ("llama", "qwen3")),
            o_bias=attn_bias and family in ("llama", "qwen3"),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=family == "qwen3",
            sliding_window=int(sliding) if sliding else None,
            hidden_act="silu",
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=str(dtype),
            raw=dict(cfg),
        )

    @classmethod
    def from_path(cls, path: str | Path) -> ModelConfig:
        """Read a model directory's config.json, or a config.json file itself."""
        p = Path(path)
        f = p / "config.json" if p.is_dir() else p
        if not f.exists():
            raise ModelLoadError("model", f"no config.json at {f}")
        try:
            cfg = json.loads(f.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{f.name}", f"not valid JSON: {e}") from None
        if not isinstance(cfg, dict):
            raise ModelLoadError(f"{f.name}", "top level must be a JSON object")
        return cls.from_dict(cfg, source=f.name)
