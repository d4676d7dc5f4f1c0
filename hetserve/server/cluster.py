"""Serving over a heterogeneous cluster: server settings -> ``from_cluster`` (the same deployment config that
``hetserve plan`` writes), and ``ClusterServing``, an LLMEngine-shaped adapter over ``ClusterEngine`` for the
async engine thread.

The adapter refuses what the cluster engine cannot do (``n > 1``, token ids outside the vocabulary)
with a ``ValidationError`` naming the request field, before anything reaches a worker, and reports each
instance's health and load (``InstanceStatus``) from the engine thread for ``/health`` and ``/metrics``. It
reads only ``ClusterEngine``'s public surface (``instances``, ``deployment``, ``worker_pids``, the schedulers'
counters) so the runtime can change underneath.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from hetserve.core.errors import QueueFullError, ValidationError
from hetserve.core.model_config import ModelConfig
from hetserve.core.outputs import RequestOutput
from hetserve.core.sampling_params import SamplingParams
from hetserve.server.settings import ServerSettings
from hetserve.strategies.defaults import default_instances

CLUSTER_DIR = Path(__file__).resolve().parents[2] / "examples" / "clusters"
DEFAULT_CLUSTER_MAX_MODEL_LEN = 2048
_STEP_WAIT_S = 0.02  # longest a step waits for a worker's reply before the engine thread reads its inbox again


@dataclass(frozen=True)
class InstanceStatus:
    """One instance as /health and /metrics report it."""

    name: str
    role: str
    device: str  # device type names, e.g. "cpu-half" ("+"-joined for a group)
    device_ids: tuple[str, ...]  # the instance's devices, then a Hetis main's attention workers
    emulation: str | None  # e.g. "paced_cpu: cpu-1c paced to 0.5x"; None for a real device
    alive: bool
    pid: int | None  # the worker that answers the instance's steps
    pids: tuple[int | None, ...]  # every worker of the instance (PP stages, TP ranks)
    dead_reason: str | None
    num_running: int
    num_waiting: int
    kv_cache_usage: float

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["device_ids"], d["pids"] = list(self.device_ids), list(self.pids)
        return d


# ---- settings -> cluster engine ---------------------------------------------------------------------------


def runtime_support(strategy: str) -> str | None:
    """None when the runtime can run ``strategy`` over workers, else why not (all five strategies run today;
    the demo and the tests ask rather than assume)."""
    from hetserve.strategies import STRATEGIES

    if strategy not in STRATEGIES:
        return f"unknown strategy {strategy!r}; known: {', '.join(STRATEGIES.names())}"
    return None


def load_cluster_setting(spec: str | dict[str, Any]) -> Any:
    """The ClusterConfig a ``cluster`` setting names: a file, a name under examples/clusters, or a mapping."""
    from hetserve.core.cluster import load_cluster

    if isinstance(spec, dict):
        source: Any = spec
    elif Path(spec).expanduser().is_file():
        source = Path(spec).expanduser()
    elif (CLUSTER_DIR / f"{spec}.yaml").is_file():
        source = CLUSTER_DIR / f"{spec}.yaml"
    else:
        known = ", ".join(sorted(p.stem for p in CLUSTER_DIR.glob("*.yaml")))
        raise ValidationError("cluster", f"no cluster file {spec!r} and no cluster of that name (known: {known})")
    try:
        return load_cluster(source)
    except ValidationError as e:
        raise ValidationError(f"cluster.{e.field}", e.message) from None


def check_weights(model: str) -> None:
    """A model the workers can load: a directory with ``config.json`` and safetensors weights. A plan is often
    made for a model's shapes only (a config.json, or a folder holding just that); serving needs the weights."""
    p = Path(model).expanduser()
    hint = "serve a checkpoint directory with --model DIR (it overrides the config's model)"
    if not p.exists():
        raise ValidationError("model", f"no model directory at {model!r}; {hint}")
    if p.is_file():
        raise ValidationError("model", f"{model!r} is a file (a config.json holds the model's shapes only, no "
                                       f"weights); {hint}")
    if not (p / "config.json").is_file():
        raise ValidationError("model", f"{model!r} has no config.json; {hint}")
    if not any(p.glob("*.safetensors")):
        raise ValidationError("model", f"{model!r} holds the model's shapes (config.json) but no *.safetensors "
                                       f"weights; {hint}")


def _instances_for(settings: ServerSettings, strategy: str, device_ids: list[str]) -> list[dict[str, Any]]:
    given = copy.deepcopy(settings.instances) if settings.instances is not None else None
    insts = given if given is not None else default_instances(strategy, device_ids)
    for i, inst in enumerate(insts):
        inst.setdefault("name", f"i{i}")
        inst.setdefault("max_num_seqs", settings.max_num_seqs)
        # a Cronus main without a budget gets the one its TBT target allows (strategies/build.py)
        if not (strategy == "cronus" and inst.get("role") == "main"):
            inst.setdefault("max_num_batched_tokens", settings.max_num_batched_tokens)
    return insts


def build_cluster_serving(settings: ServerSettings) -> ClusterServing:
    """Start the workers of the deployment the settings describe (``settings.cluster`` must be set)."""
    from hetserve.runtime.deploy import from_cluster

    assert settings.cluster is not None and settings.model is not None
    strategy = settings.strategy or "dp"
    missing = runtime_support(strategy)
    if missing is not None:
        raise ValidationError("strategy", f"{strategy} cannot be served yet: {missing}")
    check_weights(settings.model)
    cluster = load_cluster_setting(settings.cluster)
    mc = ModelConfig.from_path(settings.model)
    max_len = settings.max_model_len or min(mc.max_position_embeddings, DEFAULT_CLUSTER_MAX_MODEL_LEN)
    if max_len > mc.max_position_embeddings:
        raise ValidationError("max_model_len", f"{max_len} exceeds the model's max_position_embeddings "
                                               f"{mc.max_position_embeddings}")
    dtype = "float32" if settings.dtype == "auto" else settings.dtype  # workers run on CPU today
    instances = _instances_for(settings, strategy, cluster.device_ids)
    num_blocks = settings.num_blocks or max(256, math.ceil(max_len / settings.block_size) + 2)
    params = {**settings.deployment_params(), "dtype": dtype, "block_size": settings.block_size}
    engine = from_cluster(settings.model, cluster, strategy, instances=instances, deployment_params=params,
                          dtypes={str(i["name"]): dtype for i in instances}, max_model_len=max_len,
                          num_kv_blocks=num_blocks)
    try:
        for name, inst in engine.instances.items():
            bs = engine.deployment.plans[name].block_size
            tokens = (min(w.num_kv_blocks for w in _workers(inst)) - 1) * bs
            if tokens < engine.max_model_len:
                raise ValidationError("num_blocks", f"instance {name} holds {tokens} tokens of KV, fewer than "
                                                    f"max_model_len {engine.max_model_len}; add blocks or lower "
                                                    "max_model_len")
    except BaseException:
        engine.shutdown()
        raise
    return ClusterServing(engine, cluster, strategy, settings.max_queued_requests)


# ---- the adapter ------------------------------------------------------------------------------------------


class _Totals:
    """The instances' schedulers summed, shaped like one Scheduler for AsyncLLM's metrics."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def _alive(self) -> list[Any]:
        return [i.scheduler for i in self._engine.instances.values() if i.alive]

    @property
    def running(self) -> list[Any]:
        return [r for s in self._alive() for r in s.running]

    @property
    def num_running(self) -> int:
        return sum(s.num_running for s in self._alive())

    @property
    def num_waiting(self) -> int:
        return sum(s.num_waiting for s in self._alive())

    @property
    def kv_cache_usage(self) -> float:
        scheds = self._alive()
        return max((s.kv_cache_usage for s in scheds), default=0.0)


class ClusterServing:
    """What AsyncLLM needs of an engine, over a ClusterEngine. Engine thread only, except the read-only facts
    (tokenizer, max_model_len, model_config)."""

    idle_poll_s = 0.5  # while idle, the engine thread polls worker health this often (heartbeats, exits)

    def __init__(self, engine: Any, cluster: Any, strategy: str, max_queued_requests: int | None = None) -> None:
        self.cluster_engine = engine
        self.cluster = cluster
        self.strategy = strategy
        self.max_queued_requests = max_queued_requests
        self.tokenizer = engine.tokenizer
        self.model_config = engine.model_config
        self.max_model_len: int = engine.max_model_len
        self.scheduler = _Totals(engine)

    # ---- requests ----------------------------------------------------------------------------------
    def check_supported(self, params: SamplingParams) -> None:
        if params.n != 1:
            raise ValidationError("n", f"a {self.strategy} cluster serves n=1 only, got {params.n}")

    def validate_lengths(self, num_prompt_tokens: int, params: SamplingParams) -> None:
        self.check_supported(params)
        m = self.max_model_len
        if num_prompt_tokens >= m:
            raise ValidationError("prompt", f"the prompt has {num_prompt_tokens} tokens but max_model_len is {m}; "
                                            "at least one token must be left for the output")
        if params.max_tokens is not None and num_prompt_tokens + params.max_tokens > m:
            raise ValidationError("max_tokens", f"max_tokens {params.max_tokens} plus the prompt's "
                                                f"{num_prompt_tokens} tokens exceeds max_model_len {m}")

    def add_request(self, request_id: str | None, prompt: str | list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> str:
        params = params or SamplingParams()
        self.check_supported(params)
        cap = self.max_queued_requests
        if cap is not None and self.scheduler.num_waiting >= cap:
            raise QueueFullError(f"{self.scheduler.num_waiting} requests are already waiting (cap {cap})")
        if not isinstance(prompt, str):
            vocab = self.model_config.vocab_size
            for t in prompt:  # a bad id would crash a worker's embedding lookup
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab:
                    raise ValidationError("prompt", f"token ids must be integers in [0, {vocab}), got {t!r}")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else prompt
        self.validate_lengths(len(ids), params)
        return self.cluster_engine.add_request(request_id, list(ids), params, arrival_time)

    def abort_request(self, request_ids: str | list[str]) -> None:
        self.cluster_engine.abort_request(request_ids)

    def has_unfinished_requests(self) -> bool:
        return self.cluster_engine.has_unfinished_requests()

    def step(self) -> list[RequestOutput]:
        return self.cluster_engine.step(_STEP_WAIT_S)

    def poll(self) -> list[RequestOutput]:
        """Health checks while idle: reap exited workers, send and read heartbeats."""
        return self.cluster_engine.step(0.0)

    def shutdown(self) -> None:
        self.cluster_engine.shutdown()

    # ---- status ------------------------------------------------------------------------------------
    def instance_status(self) -> list[InstanceStatus]:
        eng = self.cluster_engine
        out = []
        for name, inst in eng.instances.items():
            plan = eng.deployment.plans[name]
            ids = (*plan.device_ids, *attention_devices(eng, name))
            devs = [self.cluster.device(d) for d in ids]
            emu = sorted({d.emulation for d in devs if d.emulation})
            sched = inst.scheduler
            out.append(InstanceStatus(
                name=name, role=plan.role, device="+".join(d.spec.name for d in devs),
                device_ids=ids, emulation="; ".join(emu) or None, alive=bool(inst.alive),
                pid=inst.worker.pid, pids=tuple(w.pid for w in _workers(inst)),
                dead_reason=None if inst.alive else _dead_reason(inst),
                num_running=sched.num_running, num_waiting=sched.num_waiting,
                kv_cache_usage=float(sched.kv_cache_usage)))
        return out


def _workers(inst: Any) -> list[Any]:
    """An instance's worker handles: several for a pipeline or TP group, else its one worker."""
    return list(getattr(inst, "workers", None) or [inst.worker])


def _dead_reason(inst: Any) -> str:
    reasons = [w.dead_reason for w in _workers(inst) if w.dead_reason not in (None, "stopped")]
    return "; ".join(reasons) or inst.worker.dead_reason or "stopped"


def attention_devices(engine: Any, name: str) -> list[str]:
    """Device ids of a Hetis main instance's attention workers (none for other instances)."""
    dispatcher = getattr(engine.deployment, "dispatchers", {}).get(name)
    return [w.name for w in dispatcher.workers] if dispatcher is not None else []
