"""Engine configuration: frozen dataclasses split by concern, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

from hetserve.core.errors import ValidationError


def _positive(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValidationError(name, f"must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = field(default=16, metadata={"help": "tokens per KV block"})
    num_blocks: int | None = field(
        default=None, metadata={"help": "KV blocks in the pool; None sizes it from memory"}
    )
    gpu_memory_utilization: float = field(
        default=0.9, metadata={"help": "fraction of device memory the engine may use (GPU)"}
    )
    cpu_kv_cache_bytes: int = field(
        default=256 * 2**20, metadata={"help": "KV pool size on a CPU device when num_blocks is None"}
    )
    enable_prefix_caching: bool = field(default=True, metadata={"help": "reuse KV of shared prompt prefixes"})
    kv_cache_dtype: str = field(default="auto", metadata={"help": "auto = the model dtype"})

    def __post_init__(self) -> None:
        _positive("block_size", self.block_size)
        _positive("num_blocks", self.num_blocks)
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValidationError("gpu_memory_utilization", f"must be in (0, 1], got {self.gpu_memory_utilization}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = field(default=2048, metadata={"help": "token budget of one step"})
    max_num_seqs: int = field(default=256, metadata={"help": "most requests in one step"})
    max_model_len: int | None = field(
        default=None, metadata={"help": "prompt + output limit; None = the model's max_position_embeddings"}
    )
    long_prefill_token_threshold: int = field(
        default=0, metadata={"help": "cap on one request's prefill chunk per step (0 = no cap)"}
    )
    max_queued_requests: int | None = field(
        default=None, metadata={"help": "waiting requests beyond which new ones are refused"}
    )
    async_scheduling: bool | None = field(
        default=None,
        metadata={"help": "schedule and prepare the next step while the device runs this one; None (auto): where "
                          "host and device overlap (a model runner on a GPU); True forces it on any runner"},
    )

    def __post_init__(self) -> None:
        _positive("max_num_batched_tokens", self.max_num_batched_tokens)
        _positive("max_num_seqs", self.max_num_seqs)
        _positive("max_model_len", self.max_model_len)
        _positive("max_queued_requests", self.max_queued_requests)
        if self.long_prefill_token_threshold < 0:
            raise ValidationError("long_prefill_token_threshold", "must be >= 0")


@dataclass(frozen=True)
class DeviceConfig:
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N, or auto"})
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto", metadata={"help": "weights and activations; auto = float32 on CPU, bfloat16 on GPU"}
    )
    attention_backend: str = field(default="auto", metadata={"help": "registered attention backend name"})
    seed: int = field(default=0, metadata={"help": "seed for requests without their own"})
    enforce_eager: bool = field(default=False, metadata={"help": "never use CUDA graphs for decode steps"})
    cuda_graph_max_batch: int = field(
        default=512, metadata={"help": "largest decode batch captured in a CUDA graph (buckets 1,2,4,8,16,24,...)"}
    )
    piecewise_graph_max_tokens: int = field(
        default=1024,
        metadata={"help": "largest step (tokens) of any kind run as piecewise CUDA graphs around eager attention "
                          "(mixed prefill + decode steps, pipeline stages); 0 = never"},
    )
    skinny_gemm: bool = field(
        default=True,
        metadata={"help": "on a GPU with CUDA graphs, time the skinny Triton GEMM against cuBLAS per linear layer "
                          "at load and use it for decode batches of <= 16 rows where it is faster"},
    )

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValidationError("dtype", f"must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        _positive("cuda_graph_max_batch", self.cuda_graph_max_batch)
        if self.piecewise_graph_max_tokens < 0:
            raise ValidationError("piecewise_graph_max_tokens", "must be >= 0")


@dataclass(frozen=True)
class EngineConfig:
    model: str
    tokenizer: str | None = None
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    served_model_name: str | None = None
    chat_template: str | None = None

    @classmethod
    def from_kwargs(cls, model: str, **kwargs: Any) -> EngineConfig:
        """Build from flat keyword arguments (``block_size=32, max_num_seqs=8, ...``) as the CLI and LLM take them."""
        groups: dict[str, dict[str, Any]] = {"cache": {}, "scheduler": {}, "device": {}}
        owners = {
            f.name: g
            for g, klass in (("cache", CacheConfig), ("scheduler", SchedulerConfig), ("device", DeviceConfig))
            for f in fields(klass)
        }
        top: dict[str, Any] = {}
        for k, v in kwargs.items():
            if k in owners:
                groups[owners[k]][k] = v
            elif k in ("tokenizer", "served_model_name", "chat_template"):
                top[k] = v
            else:
                raise ValidationError(k, "unknown engine option")
        return cls(
            model=model,
            cache=CacheConfig(**groups["cache"]),
            scheduler=SchedulerConfig(**groups["scheduler"]),
            device=DeviceConfig(**groups["device"]),
            **top,
        )
