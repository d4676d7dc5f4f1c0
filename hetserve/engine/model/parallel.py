"""What one process of a pipeline-parallel stage / tensor-parallel group holds of a Llama-family model.

A ``ParallelSpec`` is bound once when the model is built: the stage's decoder layers ``[layer_start,
layer_end)`` (stage 0 also embeds; the last stage applies the final norm and the LM head), and the TP rank's
Megatron shard of each layer:

* q/k/v (and their biases) column-parallel by heads: rank ``r`` holds query heads ``[r * nh / tp, ...)`` and the
  KV heads they read. With fewer KV heads than ranks, KV heads are replicated: rank ``r`` holds KV head
  ``r // (tp / num_kv_heads)``, as vLLM does and as ``KVDescriptor.heads_of_rank`` assumes;
* o_proj row-parallel (input columns by query head) and summed over ranks (``all_reduce``); its bias added once
  after the sum;
* gate/up column-parallel by intermediate rows, down_proj row-parallel, summed; embedding, norms and LM head
  replicated.

Parameter names stay the Hugging Face names, so the loader reads each rank's slice of a checkpoint tensor
straight from safetensors (``shard``) and skips the tensors another stage owns (``owns``).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from hetserve.core.errors import ValidationError
from hetserve.core.model_config import ModelConfig

if TYPE_CHECKING:  # torch-free at run time: the coordinator checks ``tp`` with it
    import torch

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.*)$")
# (name suffix inside a layer) -> (which head/intermediate split, dim): column-parallel rows or row-parallel columns
_SPLITS: dict[str, tuple[str, int]] = {
    "self_attn.q_proj.weight": ("q", 0),
    "self_attn.q_proj.bias": ("q", 0),
    "self_attn.k_proj.weight": ("kv", 0),
    "self_attn.k_proj.bias": ("kv", 0),
    "self_attn.v_proj.weight": ("kv", 0),
    "self_attn.v_proj.bias": ("kv", 0),
    "self_attn.o_proj.weight": ("q", 1),
    "mlp.gate_proj.weight": ("ffn", 0),
    "mlp.gate_proj.bias": ("ffn", 0),
    "mlp.up_proj.weight": ("ffn", 0),
    "mlp.up_proj.bias": ("ffn", 0),
    "mlp.down_proj.weight": ("ffn", 1),
}


class StageIO(Protocol):
    """Hidden states between pipeline stages (the worker's link to its neighbours)."""

    def recv(self, step_id: int, device: torch.device) -> list[torch.Tensor]: ...

    def send(self, step_id: int, tensors: list[torch.Tensor]) -> None: ...


@dataclass(frozen=True, eq=False)
class ParallelSpec:
    """One process's share of the model. ``layer_end`` None: to the last layer. ``all_reduce`` sums a tensor
    in place over the TP group (required when ``tp_size > 1``)."""

    layer_start: int = 0
    layer_end: int | None = None
    tp_rank: int = 0
    tp_size: int = 1
    all_reduce: Callable[[torch.Tensor], Any] | None = field(default=None, repr=False)

    # ---- checks and ranges ------------------------------------------------------------------
    def validate(self, cfg: ModelConfig) -> ParallelSpec:
        """Raises ValidationError naming ``tp`` or ``layers`` when the model cannot be split this way."""
        L = cfg.num_hidden_layers
        end = L if self.layer_end is None else self.layer_end
        if not 0 <= self.layer_start < end <= L:
            raise ValidationError("layers", f"stage range [{self.layer_start}, {end}) is not inside [0, {L})")
        check_tp(cfg, self.tp_size)
        if not 0 <= self.tp_rank < self.tp_size:
            raise ValidationError("tp", f"rank {self.tp_rank} outside a group of {self.tp_size}")
        if self.tp_size > 1 and self.all_reduce is None:
            raise ValidationError("tp", f"tp {self.tp_size} needs a process group (all_reduce)")
        return self

    def end(self, cfg: ModelConfig) -> int:
        return cfg.num_hidden_layers if self.layer_end is None else self.layer_end

    def num_layers(self, cfg: ModelConfig) -> int:
        return self.end(cfg) - self.layer_start

    @property
    def is_first(self) -> bool:
        return self.layer_start == 0

    def is_last(self, cfg: ModelConfig) -> bool:
        return self.end(cfg) == cfg.num_hidden_layers

    def is_whole(self, cfg: ModelConfig) -> bool:
        return self.tp_size == 1 and self.is_first and self.is_last(cfg)

    # ---- heads ------------------------------------------------------------------------------
    def q_heads(self, cfg: ModelConfig) -> tuple[int, int]:
        per = cfg.num_attention_heads // self.tp_size
        return self.tp_rank * per, (self.tp_rank + 1) * per

    def kv_heads(self, cfg: ModelConfig) -> tuple[int, int]:
        h, t = cfg.num_key_value_heads, self.tp_size
        if h >= t:
            per = h // t
            return self.tp_rank * per, (self.tp_rank + 1) * per
        head = self.tp_rank // (t // h)
        return head, head + 1

    def ffn_rows(self, cfg: ModelConfig) -> tuple[int, int]:
        per = cfg.intermediate_size // self.tp_size
        return self.tp_rank * per, (self.tp_rank + 1) * per

    # ---- checkpoint tensors -----------------------------------------------------------------
    def owns(self, name: str, cfg: ModelConfig) -> bool:
        """Whether this stage has a parameter for checkpoint tensor ``name``."""
        m = _LAYER.match(name)
        if m is not None:
            return self.layer_start <= int(m.group(1)) < self.end(cfg)
        if name.startswith("model.embed_tokens."):
            return self.is_first or (self.is_last(cfg) and cfg.tie_word_embeddings)
        if name.startswith(("model.norm.", "lm_head.")):
            return self.is_last(cfg)
        return True

    def shard(self, name: str, cfg: ModelConfig) -> tuple[int, int, int] | None:
        """``(dim, start, stop)`` of this rank's slice of checkpoint tensor ``name``; None: the whole tensor."""
        if self.tp_size == 1:
            return None
        m = _LAYER.match(name)
        if m is None:
            return None
        split = _SPLITS.get(m.group(2))
        if split is None:
            return None
        kind, dim = split
        if kind == "ffn":
            a, b = self.ffn_rows(cfg)
            return dim, a, b
        a, b = self.q_heads(cfg) if kind == "q" else self.kv_heads(cfg)
        return dim, a * cfg.head_dim, b * cfg.head_dim


def check_tp(cfg: ModelConfig, tp: int) -> None:
    """Raises ValidationError (field ``tp``) when ``cfg`` cannot be split over ``tp`` ranks."""
    if tp < 1:
        raise ValidationError("tp", f"must be >= 1, got {tp}")
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    if nh % tp:
        raise ValidationError("tp", f"{nh} attention heads do not split over tp {tp}")
    if (nkv >= tp and nkv % tp) or (nkv < tp and tp % nkv):
        raise ValidationError(
            "tp", f"{nkv} kv heads and tp {tp}: one must divide the other (fewer kv heads than ranks are replicated)"
        )
    if cfg.intermediate_size % tp:
        raise ValidationError("tp", f"intermediate_size {cfg.intermediate_size} does not split over tp {tp}")
