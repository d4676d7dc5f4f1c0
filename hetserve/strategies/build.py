"""The one place that turns a cluster file, a model and strategy parameters into a :class:`Deployment`.

A deployment config (what ``hetserve plan`` writes and ``hetserve simulate --config`` / ``serve --config``
read) is a mapping::

    strategy: dp | pp | pd | cronus | hetis
    cluster: examples/clusters/h100-a10.yaml        # a path, or the cluster mapping inline
    model: examples/models/llama-3.1-8b             # a directory, a config.json, or its mapping inline
    dtype: bfloat16                                 # optional; also max_model_len (8192), block_size (16)
    instances:
      - name: main0
        role: main                                  # mixed (DP/PP) | prefill | decode (PD) | head | main
        devices: ["n0:0"]                           # device ids of the cluster ("<node>:<index>")
        tp: 1                                       # default: len(devices) unless layers is given
        layers: [[0, 20], [20, 32]]                 # PP: one range per device, or "auto"
        max_num_seqs: 256
        max_num_batched_tokens: 2048                # Cronus main: default from the TBT SLO
        workers: [{device: "n0:1", kv_heads: 2}]    # Hetis main: attention workers (kv_heads optional)
        memory_fraction: 0.6                        # share of each device's memory, for devices shared by
                                                    # instances (every one on the device gives one; sum <= 1)
        shared_slowdown: {memory: 2, compute: 2}    # steps slower while another instance on a shared device
                                                    # runs (default 2, 2: time-slicing without MPS, assumed)
    split_policy: {kind: adaptive, tbt_slo_ms: 100} # Cronus (or {kind: fixed, k: 512})
    tbt_slo_ms: 100                                 # Cronus: TBT target for the main's chunk budget
    redispatch_every_steps: 64                      # Hetis
    mean_context_tokens: 1536                       # Hetis: context the initial head split is sized for

Errors raise ValidationError naming the key (``instances[1].devices``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hetserve.core.cluster import ClusterConfig, load_cluster
from hetserve.core.devices import LinkSpec
from hetserve.core.errors import HetserveError, ValidationError
from hetserve.core.model_config import ModelConfig
from hetserve.planner.profile import DeviceProfile
from hetserve.strategies.base import Deployment
from hetserve.strategies.build_instance import Built, build_instance, mark_shared, positive_num, slowest_link
from hetserve.strategies.cronus import make_policy

TOP_KEYS = (
    "strategy",
    "cluster",
    "model",
    "dtype",
    "max_model_len",
    "block_size",
    "instances",
    "split_policy",
    "tbt_slo_ms",
    "redispatch_every_steps",
    "mean_context_tokens",
    "name",
    "predicted",
    "profiles",
    "slo",
    "workload",
    "objective",
)


def build_deployment(
    cluster: ClusterConfig, model: ModelConfig, cfg: dict[str, Any], profiles: dict[str, DeviceProfile] | None = None
) -> Deployment:
    """The deployment ``cfg`` describes on ``cluster`` (see the module docstring for the keys)."""
    from hetserve.strategies import STRATEGIES

    if not isinstance(cfg, dict):
        raise ValidationError("config", "must be a mapping")
    for k in cfg:
        if k not in TOP_KEYS:
            raise ValidationError(str(k), f"unknown key; allowed: {', '.join(TOP_KEYS)}")
    strategy = cfg.get("strategy")
    if not isinstance(strategy, str) or strategy not in STRATEGIES:
        raise ValidationError("strategy", f"must be one of {', '.join(STRATEGIES.names())}, got {strategy!r}")
    insts = cfg.get("instances")
    if not isinstance(insts, list) or not insts:
        raise ValidationError("instances", "must be a non-empty list of instances")
    built = Built([], {}, {})
    used: dict[str, str] = {}
    for i, inst in enumerate(insts):
        build_instance(i, inst, cfg, cluster, model, profiles or {}, used, built)
    mark_shared(built)
    link_cache: dict[tuple[str, str], LinkSpec] = {}

    def link_between(a: str, b: str) -> LinkSpec:
        lk = link_cache.get((a, b))
        if lk is None:
            lk = link_cache[(a, b)] = slowest_link(cluster, built.devices[a], built.devices[b])
        return lk

    params = {
        k: cfg[k] for k in ("split_policy", "tbt_slo_ms", "redispatch_every_steps", "mean_context_tokens") if k in cfg
    }
    cls: Any = STRATEGIES.get(strategy)
    try:
        if strategy == "cronus":
            tbt_s = positive_num(cfg, "tbt_slo_ms", "", 100.0) / 1000
            return cls(built.plans, link_between, params, policy=make_policy(cfg.get("split_policy"), tbt_s))
        if strategy == "hetis":
            return cls(built.plans, link_between, params, dispatchers=built.dispatchers)
        return cls(built.plans, link_between, params)
    except ValueError as e:
        if isinstance(e, HetserveError):
            raise
        raise ValidationError("instances", str(e)) from None


# ---- reading a deployment config file ----------------------------------------------------------


def _read_mapping(path: Path, key: str) -> dict[str, Any]:
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            obj = yaml.safe_load(text)
        else:
            obj = json.loads(text)
    except Exception as e:  # noqa: BLE001 (yaml.YAMLError, json.JSONDecodeError: reported alike)
        raise ValidationError(key, f"{path}: not valid {path.suffix.lstrip('.').upper() or 'JSON'}: {e}") from None
    if not isinstance(obj, dict):
        raise ValidationError(key, f"{path}: must hold a mapping")
    return obj


def _resolve(p: str, base: Path | None) -> Path:
    """A path in a config file: relative to the file's folder first, then to the working directory."""
    cand = Path(p)
    if cand.is_absolute() or base is None:
        return cand
    rel = base / cand
    return rel if rel.exists() else cand


def load_model(spec: Any, base: Path | None = None, key: str = "model") -> ModelConfig:
    """A model from a directory, a config.json path or an inline config mapping."""
    if isinstance(spec, dict):
        return ModelConfig.from_dict(spec)
    if not isinstance(spec, str):
        raise ValidationError(key, "must be a model directory, a config.json path or a mapping")
    p = _resolve(spec, base)
    if not p.exists():
        raise ValidationError(key, f"no model directory or config.json at {spec!r}")
    return ModelConfig.from_path(p)


def load_cluster_spec(spec: Any, base: Path | None = None, key: str = "cluster") -> ClusterConfig:
    if isinstance(spec, dict):
        return load_cluster(spec)
    if not isinstance(spec, str):
        raise ValidationError(key, "must be a cluster file path or a mapping")
    p = _resolve(spec, base)
    if not p.is_file():
        raise ValidationError(key, f"no cluster file at {spec!r}")
    return load_cluster(p)


@dataclass
class RunConfig:
    config: dict[str, Any]
    cluster: ClusterConfig
    model: ModelConfig
    deployment: Deployment


def load_run_config(path_or_dict: str | Path | dict[str, Any]) -> RunConfig:
    """Read a deployment config (YAML or JSON, or a mapping) and build its deployment."""
    base: Path | None = None
    if isinstance(path_or_dict, dict):
        cfg = path_or_dict
    else:
        p = Path(path_or_dict)
        if not p.is_file():
            raise ValidationError("--config", f"no such file: {p}")
        cfg = _read_mapping(p, "--config")
        base = p.parent
    for k in ("strategy", "cluster", "model", "instances"):
        if k not in cfg:
            raise ValidationError(k, "required in a deployment config")
    cluster = load_cluster_spec(cfg["cluster"], base)
    model = load_model(cfg["model"], base)
    profiles: dict[str, DeviceProfile] = {}
    if cfg.get("profiles"):
        from hetserve.planner.profile_set import load_profile_set

        if not isinstance(cfg["profiles"], dict):
            raise ValidationError("profiles", "must map device type names to profile JSON paths")
        # a profile measured on another device type may stand in for this one (relabelled, said in its meta)
        items = [f"{dev_name}={_resolve(str(pp), base)}" for dev_name, pp in cfg["profiles"].items()]
        profiles = {n: p for n, (p, _) in load_profile_set(items, "profiles").items()}
    return RunConfig(cfg, cluster, model, build_deployment(cluster, model, cfg, profiles))
