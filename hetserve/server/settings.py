"""Server settings: one frozen dataclass, its command-line flags, and ``--config FILE`` loading.

Every field is a flag spelled ``--field-name`` (vLLM's spelling where vLLM has the option) and a config-file key
spelled ``field_name``; the deployment keys (``instances``, ``split_policy``, ...) are config-file keys only.
Precedence: built-in default < config file < flag given on the command line.

A deployment config written by ``hetserve plan`` is a valid settings file as it is: ``strategy``, ``cluster``,
``model``, ``dtype``, ``max_model_len``, ``block_size``, ``instances`` and the strategy parameters are settings;
``predicted`` and the planner's bookkeeping keys (``name``, ``slo``, ``workload``, ``objective``) are accepted and
not used. Relative ``model`` / ``cluster`` paths in a file are read relative to the file's folder first.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from hetserve.core.config import EngineConfig
from hetserve.core.errors import ValidationError

_DTYPES = ("auto", "float32", "bfloat16", "float16")
STRATEGY_NAMES = ("dp", "pp", "pd", "cronus", "hetis")
# config keys of a deployment (hetserve/strategies/build.py) that only a cluster deployment uses
DEPLOYMENT_KEYS = ("instances", "split_policy", "tbt_slo_ms", "redispatch_every_steps", "mean_context_tokens",
                   "profiles")
# what hetserve plan / simulate files carry for people, not for the server: accepted in a config file, not used
PLAN_METADATA_KEYS = ("name", "slo", "workload", "objective")
_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def _meta(help: str, **extra: Any) -> dict[str, Any]:
    return {"help": help, **extra}


def _opt(default: Any, help: str, **extra: Any) -> Any:
    return field(default=default, metadata=_meta(help, **extra))


@dataclass(frozen=True)
class ServerSettings:
    model: str | None = _opt(None, "HF model directory (default: the embedded tiny model, made on first use)")
    host: str = _opt("127.0.0.1", "address to listen on (0.0.0.0 exposes the server to the network)")
    port: int = _opt(8000, "TCP port to listen on (0 = any free port)")
    api_key: str | None = _opt(None, "require 'Authorization: Bearer KEY' on every route except /health")
    served_model_name: tuple[str, ...] | None = _opt(
        None, "model name(s) clients must send; the first is reported (default: the model argument)", nargs="+"
    )
    tokenizer: str | None = _opt(None, "tokenizer directory (default: the model directory)")
    chat_template: str | None = _opt(
        None, "chat template: a file path, a template name of the model, or inline jinja (default: the model's)"
    )
    max_model_len: int | None = _opt(
        None, "prompt + output token limit (default: the model's context length; with a cluster at most 2048)")
    max_num_seqs: int = _opt(256, "most sequences in one engine step")
    max_num_batched_tokens: int = _opt(2048, "token budget of one engine step")
    max_queued_requests: int | None = _opt(
        None, "waiting sequences beyond which new requests get 503 + Retry-After (default: no limit)"
    )
    long_prefill_token_threshold: int = _opt(0, "cap on one request's prefill chunk per step (0 = no cap)")
    block_size: int = _opt(16, "tokens per KV block")
    num_blocks: int | None = _opt(None, "KV blocks in the pool (default: sized from memory)")
    gpu_memory_utilization: float = _opt(0.9, "fraction of GPU memory the engine may use")
    enable_prefix_caching: bool = _opt(True, "reuse the KV of shared prompt prefixes")
    async_scheduling: bool | None = _opt(
        None, "schedule the next step while the device runs this one (default: on a GPU; off on a CPU, whose "
              "steps run on the host itself)")
    enforce_eager: bool = _opt(False, "never replay CUDA graphs")
    cuda_graph_max_batch: int = _opt(512, "largest decode batch replayed as a CUDA graph")
    piecewise_graph_max_tokens: int = _opt(
        1024, "largest step (tokens) replayed as piecewise CUDA graphs around eager attention (0 = never)")
    skinny_gemm: bool = _opt(True, "time a Triton GEMM against cuBLAS per linear layer at load; use it for "
                                   "decode batches of <= 16 rows where faster")
    device: str = _opt("auto", "cpu, cuda, cuda:N or auto")
    dtype: str = _opt("auto", "weights and activations dtype (auto = float32 on CPU, bfloat16 on GPU)",
                      choices=_DTYPES)
    seed: int = _opt(0, "seed of requests that bring none of their own")
    max_logprobs: int = _opt(20, "largest logprobs / top_logprobs a request may ask for")
    max_n: int = _opt(16, "largest n (completions per prompt) a request may ask for")
    max_batch_prompts: int = _opt(256, "most prompts in one /v1/completions batch")
    max_prompt_chars: int = _opt(1_000_000, "longest prompt or chat message list, in characters, before tokenizing")
    max_request_body_bytes: int = _opt(16 * 2**20, "largest request body; larger ones get 413")
    retry_after_s: int = _opt(1, "Retry-After value (seconds) sent with 503 responses")
    shutdown_timeout_s: float = _opt(
        30.0, "on SIGINT/SIGTERM, how long in-flight requests may finish before they are aborted"
    )
    uvicorn_log_level: str = _opt("info", "uvicorn's log level", choices=_LOG_LEVELS)
    # ---- heterogeneous cluster: one worker process per instance (hetserve.runtime.cluster_engine) ----
    cluster: str | dict[str, Any] | None = field(default=None, metadata=_meta(
        "serve over worker processes on this cluster: a cluster file, a name under examples/clusters (cpu-pair), "
        "or (config files) the cluster mapping inline"))
    strategy: str | None = _opt(None, "how the cluster serves the model (default with --cluster: dp)",
                                choices=STRATEGY_NAMES)
    instances: list[dict[str, Any]] | None = field(default=None, metadata=_meta(
        "the deployment's instances, as hetserve plan writes them (default: one per device, by strategy)",
        flag=False))
    split_policy: dict[str, Any] | None = field(default=None, metadata=_meta(
        "Cronus: {kind: fixed, k: N} or {kind: adaptive}", flag=False))
    tbt_slo_ms: float | None = _opt(None, "Cronus: TBT target of the main instance's chunk budget", flag=False)
    redispatch_every_steps: int | None = _opt(None, "Hetis: steps between head re-dispatches", flag=False)
    mean_context_tokens: float | None = _opt(None, "Hetis: context the initial head split is sized for",
                                             flag=False)
    profiles: dict[str, Any] | None = field(default=None, metadata=_meta(
        "device profiles of the planner's cost model (not used to serve)", flag=False))
    predicted: dict[str, Any] | None = field(default=None, metadata=_meta(
        "what hetserve plan predicted for this deployment (printed, not used)", flag=False))

    def __post_init__(self) -> None:
        if isinstance(self.served_model_name, (list, str)):
            names = [self.served_model_name] if isinstance(self.served_model_name, str) else self.served_model_name
            object.__setattr__(self, "served_model_name", tuple(names))
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), _FIELD_TYPES[f.name])
        if not self.host:
            raise ValidationError("host", "must not be empty")
        if not 0 <= self.port <= 65535:
            raise ValidationError("port", f"must be in [0, 65535], got {self.port}")
        if self.api_key is not None and not self.api_key:
            raise ValidationError("api_key", "must not be empty")
        if self.served_model_name is not None and (not self.served_model_name or not all(self.served_model_name)):
            raise ValidationError("served_model_name", "needs at least one non-empty name")
        for name in ("max_num_seqs", "max_num_batched_tokens", "block_size", "max_n", "max_batch_prompts",
                     "max_prompt_chars", "max_request_body_bytes"):
            if getattr(self, name) < 1:
                raise ValidationError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("max_model_len", "max_queued_requests", "num_blocks"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValidationError(name, f"must be >= 1, got {value}")
        for name in ("long_prefill_token_threshold", "max_logprobs", "retry_after_s"):
            if getattr(self, name) < 0:
                raise ValidationError(name, f"must be >= 0, got {getattr(self, name)}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValidationError("gpu_memory_utilization", f"must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.shutdown_timeout_s < 0:
            raise ValidationError("shutdown_timeout_s", f"must be >= 0, got {self.shutdown_timeout_s}")
        if self.dtype not in _DTYPES:
            raise ValidationError("dtype", f"must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.uvicorn_log_level not in _LOG_LEVELS:
            raise ValidationError("uvicorn_log_level", f"must be one of {', '.join(_LOG_LEVELS)}")
        self._check_cluster()

    def _check_cluster(self) -> None:
        if self.strategy is not None and self.strategy not in STRATEGY_NAMES:
            raise ValidationError("strategy", f"must be one of {', '.join(STRATEGY_NAMES)}, got {self.strategy!r}")
        if self.cluster is None:
            for key in ("strategy", *DEPLOYMENT_KEYS):
                if getattr(self, key) is not None:
                    raise ValidationError(key, "is a cluster deployment setting; give cluster too (--cluster FILE "
                                               "or a cluster key in the config file)")
            return
        if isinstance(self.cluster, str) and not self.cluster:
            raise ValidationError("cluster", "must not be empty")
        if self.tokenizer is not None:
            raise ValidationError("tokenizer", "a cluster reads the tokenizer from the model directory; drop it")
        if self.instances is not None and (not self.instances or not all(isinstance(i, dict) for i in self.instances)):
            raise ValidationError("instances", "must be a non-empty list of instance mappings")
        for name in ("tbt_slo_ms", "mean_context_tokens"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValidationError(name, f"must be > 0, got {value}")
        if self.redispatch_every_steps is not None and self.redispatch_every_steps < 1:
            raise ValidationError("redispatch_every_steps", f"must be >= 1, got {self.redispatch_every_steps}")

    @property
    def serves_cluster(self) -> bool:
        return self.cluster is not None

    def deployment_params(self) -> dict[str, Any]:
        """The strategy parameters of the deployment config (``build_deployment``'s top-level keys)."""
        keys = ("split_policy", "tbt_slo_ms", "redispatch_every_steps", "mean_context_tokens")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    @property
    def model_names(self) -> tuple[str, ...]:
        """Names a request's ``model`` may carry; the first is the one responses report."""
        if self.served_model_name:
            return self.served_model_name
        return (self.model if self.model is not None else "tiny-llama",)

    def with_model(self, model: str) -> ServerSettings:
        """The same settings bound to a model directory; the served name stays what it was."""
        names = self.model_names
        return replace(self, model=model, served_model_name=names)

    def engine_config(self) -> EngineConfig:
        if self.model is None:
            raise ValidationError("model", "no model directory; call with_model() first")
        return EngineConfig.from_kwargs(
            self.model,
            tokenizer=self.tokenizer,
            served_model_name=self.model_names[0],
            chat_template=resolve_chat_template(self.chat_template),
            block_size=self.block_size,
            num_blocks=self.num_blocks,
            gpu_memory_utilization=self.gpu_memory_utilization,
            enable_prefix_caching=self.enable_prefix_caching,
            async_scheduling=self.async_scheduling,
            enforce_eager=self.enforce_eager,
            cuda_graph_max_batch=self.cuda_graph_max_batch,
            piecewise_graph_max_tokens=self.piecewise_graph_max_tokens,
            skinny_gemm=self.skinny_gemm,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_num_seqs=self.max_num_seqs,
            max_model_len=self.max_model_len,
            long_prefill_token_threshold=self.long_prefill_token_threshold,
            max_queued_requests=self.max_queued_requests,
            device=self.device,
            dtype=self.dtype,
            seed=self.seed,
        )


# the declared type of each field, for checking config-file values (annotations are strings here)
_FIELD_TYPES: dict[str, tuple[type, ...]] = {}
for _f in fields(ServerSettings):
    _ann = str(_f.type)
    _types: tuple[type, ...] = ()
    for _name, _t in (("str", str), ("int", int), ("float", float), ("bool", bool), ("tuple", tuple), ("list", list),
                      ("dict", dict)):
        if _ann.startswith(_name) or f" {_name}" in _ann:
            _types += (_t,)
    if "None" in _ann:
        _types += (type(None),)
    _FIELD_TYPES[_f.name] = _types


def _check_type(name: str, value: Any, types: tuple[type, ...]) -> None:
    if value is None and type(None) in types:
        return
    if isinstance(value, bool) and bool not in types:
        raise ValidationError(name, f"must be {_type_words(types)}, got {value!r}")
    if isinstance(value, int) and not isinstance(value, bool) and float in types:
        return
    if tuple in types and isinstance(value, tuple):
        if not all(isinstance(v, str) for v in value):
            raise ValidationError(name, f"must be a list of strings, got {list(value)!r}")
        return
    if not isinstance(value, tuple(t for t in types if t is not type(None))):
        raise ValidationError(name, f"must be {_type_words(types)}, got {value!r}")


def _type_words(types: tuple[type, ...]) -> str:
    words = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
             tuple: "a list of strings", list: "a list", dict: "a mapping", type(None): "null"}
    return " or ".join(words[t] for t in types)


def resolve_chat_template(value: str | None) -> str | None:
    """A chat template setting as the tokenizer takes it: a file's content, else the value itself (a template
    name of the model, or inline jinja)."""
    if value is None:
        return None
    looks_like_path = "{" not in value and "\n" not in value and (
        value.endswith((".jinja", ".j2", ".jinja2", ".txt")) or "/" in value
    )
    path = Path(value).expanduser()
    if looks_like_path:
        if not path.is_file():
            raise ValidationError("chat_template", f"file {value!r} does not exist")
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValidationError("chat_template", f"cannot read {value!r}: {exc}") from exc
    return value


# ---- config files ------------------------------------------------------------------------------


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON settings file: a mapping whose keys are ServerSettings field names."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValidationError("config", f"cannot read {str(p)!r}: {exc}") from exc
    try:
        if p.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as exc:  # json.JSONDecodeError, yaml.YAMLError: report them the same way
        raise ValidationError("config", f"{str(p)!r} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: "
                                        f"{exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValidationError("config", f"{str(p)!r} must hold a mapping of settings, got {type(data).__name__}")
    known = {f.name for f in fields(ServerSettings)}
    for key in data:
        if isinstance(key, str) and key in PLAN_METADATA_KEYS:
            continue
        if not isinstance(key, str) or key not in known:
            hint = ""
            if isinstance(key, str) and key.replace("-", "_") in known:
                hint = f" (keys use underscores: {key.replace('-', '_')})"
            raise ValidationError(str(key), f"unknown setting in {str(p)!r}{hint}")
    data = {k: v for k, v in data.items() if k not in PLAN_METADATA_KEYS}
    for key in ("model", "cluster"):
        if isinstance(data.get(key), str):
            data[key] = _relative_to(data[key], p.parent)
    return data


def _relative_to(value: str, base: Path) -> str:
    """A path written in a config file: relative to the file's folder when it exists there (hetserve plan writes
    paths that way), else as given (relative to the working directory, or a cluster name)."""
    cand = Path(value).expanduser()
    if cand.is_absolute():
        return value
    rel = base / cand
    return os.path.normpath(rel.resolve()) if rel.exists() else value


# ---- command line ------------------------------------------------------------------------------


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """Add a flag per ServerSettings field (and ``--config``). Flags not given stay absent from the namespace,
    so a config file can fill them."""
    parser.add_argument("model_dir", nargs="?", default=argparse.SUPPRESS, metavar="MODEL_DIR",
                        help=ServerSettings.__dataclass_fields__["model"].metadata["help"])
    parser.add_argument("--model", dest="model_flag", default=argparse.SUPPRESS, metavar="DIR",
                        help="the model directory (same as MODEL_DIR); overrides a config file's model, e.g. a "
                             "plan made for a model's shapes only")
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="YAML or JSON file of settings (keys: these flags with underscores), or the deployment "
                             "config hetserve plan writes; flags override it")
    for f in fields(ServerSettings):
        if f.name == "model" or not f.metadata.get("flag", True):
            continue
        flag = "--" + f.name.replace("_", "-")
        meta = dict(f.metadata)
        meta.pop("flag", None)
        default = f.default if f.default is not MISSING else None
        help_text = f"{meta.pop('help')} (default: {default})"
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text, "dest": f.name}
        types = _FIELD_TYPES[f.name]
        if bool in types:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            conv: Callable[[str], Any] = str
            if int in types:
                conv = int
            elif float in types:
                conv = float
            kwargs["type"] = conv
            kwargs.update(meta)
        parser.add_argument(flag, **kwargs)


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    """Defaults, then the ``--config`` file, then the flags given on the command line."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(load_config_file(args.config))
    for f in fields(ServerSettings):
        if f.name != "model" and hasattr(args, f.name):
            values[f.name] = getattr(args, f.name)
    given = [getattr(args, a) for a in ("model_dir", "model_flag") if hasattr(args, a)]
    if len(given) == 2 and given[0] != given[1]:
        raise ValidationError("model", f"given twice ({given[0]!r} and --model {given[1]!r}); give it once")
    if given:
        values["model"] = given[0]
    if isinstance(values.get("model"), dict):
        raise ValidationError("model", "the config gives the model as an inline config mapping (its shapes, no "
                                       "weights); pass a checkpoint directory with --model DIR to serve it")
    try:
        return ServerSettings(**values)
    except TypeError as exc:  # a value of the wrong shape reaching the dataclass, e.g. a nested mapping
        raise ValidationError("config", str(exc)) from exc
