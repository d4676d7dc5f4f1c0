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
    split_policy: {kind: adaptive, tbt_slo_ms: 100} # Cronus (or {kind: fixed, k: 512})
    tbt_slo_ms: 100                                 # Cronus: TBT target for the main's chunk budget
    redispatch_every_steps: 64                      # Hetis
    mean_context_tokens: 1536                       # Hetis: context the initial head split is sized for

Errors raise ValidationError naming the key (``instances[1].devices``).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hetserve.core.cluster import ClusterConfig, ClusterDevice, load_cluster
from hetserve.core.devices import GiB, LinkSpec
from hetserve.core.errors import HetserveError, ValidationError
from hetserve.core.model_config import ModelConfig
from hetserve.planner.costmodel import CostModel
from hetserve.planner.profile import DeviceProfile
from hetserve.strategies.base import Deployment, InstancePlan, make_plan
from hetserve.strategies.cronus import make_policy, tbt_token_budget
from hetserve.strategies.hetis import AttentionWorker, HeadDispatcher
from hetserve.strategies.pp import StageDevice, choose_layer_split

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
INSTANCE_KEYS = ("name", "role", "devices", "tp", "layers", "max_num_seqs", "max_num_batched_tokens", "workers")
ROLES = {
    "dp": ("mixed",),
    "pp": ("mixed",),
    "pd": ("prefill", "decode"),
    "cronus": ("head", "main"),
    "hetis": ("main", "mixed"),
}


def _int(obj: dict[str, Any], key: str, path: str, default: int | None = None, minimum: int = 1) -> int:
    v = obj.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValidationError(f"{path}{key}", f"must be an integer >= {minimum}, got {v!r}")
    return v


def _num(obj: dict[str, Any], key: str, path: str, default: float) -> float:
    v = obj.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
        raise ValidationError(f"{path}{key}", f"must be a positive number, got {v!r}")
    return float(v)


def slowest_link(cluster: ClusterConfig, a: list[str], b: list[str]) -> LinkSpec:
    """The narrowest link between any device of ``a`` and any of ``b`` (the bottleneck of a group transfer)."""
    links = [cluster.link_between(x, y) for x in a for y in b if x != y]
    if not links:
        return cluster.link_between(a[0], b[0])
    return min(links, key=lambda lk: (lk.bandwidth_bytes_per_s, -lk.latency_s))


def weights_reason(
    cost: CostModel, memory_bytes: int, max_num_seqs: int, max_num_batched_tokens: int, min_kv_tokens: int, where: str
) -> str:
    """Why an instance cannot be made on a device: the numbers behind make_plan's None."""
    fp = cost.memory_footprint(max_num_seqs, max_num_batched_tokens, memory_bytes)
    need = fp["weights_bytes"] + fp["activation_bytes"] + fp["reserved_bytes"]
    if fp["kv_bytes_available"] <= 0:
        return (
            f"weights do not fit on {where}: {fp['weights_bytes'] / GiB:.1f} GiB weights + "
            f"{(fp['activation_bytes'] + fp['reserved_bytes']) / GiB:.1f} GiB activations/runtime > "
            f"{fp['budget_bytes'] / GiB:.1f} GiB budget"
        )
    return (
        f"no KV room on {where} for {min_kv_tokens} tokens (max_model_len): "
        f"{(fp['budget_bytes'] - need) / GiB:.2f} GiB left after weights"
    )


@dataclass
class _Built:
    plans: list[InstancePlan]
    devices: dict[str, list[str]]  # instance -> device ids
    dispatchers: dict[str, HeadDispatcher]


def _devices_of(inst: dict[str, Any], path: str, cluster: ClusterConfig, used: dict[str, str]) -> list[ClusterDevice]:
    ids = inst.get("devices")
    if not isinstance(ids, list) or not ids or not all(isinstance(x, str) for x in ids):
        raise ValidationError(f"{path}devices", "must be a non-empty list of device ids like 'n0:1'")
    out = []
    for did in ids:
        try:
            dev = cluster.device(did)
        except ValidationError as e:
            raise ValidationError(f"{path}devices", e.message) from None
        if did in used:
            raise ValidationError(f"{path}devices", f"device {did} is already used by {used[did]}")
        used[did] = str(inst.get("name", path))
        out.append(dev)
    return out


def _build_instance(
    i: int,
    inst: dict[str, Any],
    cfg: dict[str, Any],
    cluster: ClusterConfig,
    model: ModelConfig,
    profiles: dict[str, DeviceProfile],
    used: dict[str, str],
    built: _Built,
) -> None:
    path = f"instances[{i}]."
    if not isinstance(inst, dict):
        raise ValidationError(f"instances[{i}]", "must be a mapping")
    for k in inst:
        if k not in INSTANCE_KEYS:
            raise ValidationError(f"{path}{k}", f"unknown key; allowed: {', '.join(INSTANCE_KEYS)}")
    strategy = cfg["strategy"]
    name = str(inst.get("name") or f"i{i}")
    if name in built.devices:
        raise ValidationError(f"{path}name", f"duplicate instance name {name!r}")
    role = inst.get("role", "mixed")
    if role not in ROLES[strategy]:
        raise ValidationError(
            f"{path}role", f"{strategy} instances take role {' | '.join(ROLES[strategy])}, got {role!r}"
        )
    devs = _devices_of(inst, path, cluster, used)
    ids = [d.id for d in devs]
    dtype = str(cfg.get("dtype", "bfloat16"))
    mns = _int(inst, "max_num_seqs", path, 256)
    max_model_len = _int(cfg, "max_model_len", "", 8192)
    block_size = _int(cfg, "block_size", "", 16)
    layers = inst.get("layers")
    mnbt_given = "max_num_batched_tokens" in inst
    mnbt = _int(inst, "max_num_batched_tokens", path, 2048)
    workers = inst.get("workers")
    if workers is not None and (strategy != "hetis" or role != "main"):
        raise ValidationError(f"{path}workers", "only Hetis main instances have attention workers")

    def prof(dev: ClusterDevice) -> DeviceProfile | None:
        return profiles.get(dev.spec.name)

    try:
        if layers is not None:
            if strategy in ("pd", "cronus", "hetis") and len(devs) > 1:
                raise ValidationError(f"{path}layers", f"{strategy} instances are single-stage here")
            stages = [StageDevice(d.spec, d.memory_bytes, prof(d)) for d in devs]
            if layers == "auto":
                ranges = choose_layer_split(
                    model,
                    stages,
                    dtype=dtype,
                    min_kv_tokens=max_model_len,
                    max_num_seqs=mns,
                    max_num_batched_tokens=mnbt,
                )
            else:
                ranges = _parse_layers(layers, len(devs), model.num_hidden_layers, f"{path}layers")
            costs = tuple(CostModel(model, d.spec, dtype, prof(d), layers=r) for d, r in zip(devs, ranges))
            kv_tokens = None
            for c, d in zip(costs, devs):
                fp = c.memory_footprint(mns, mnbt, d.memory_bytes)
                t = fp["kv_bytes_available"] // max(c.kv_bytes_per_token(), 1)
                if t * 1 < max_model_len:
                    raise ValidationError(
                        f"{path}layers",
                        weights_reason(
                            c, d.memory_bytes, mns, mnbt, max_model_len, f"{d.spec.name} ({d.id}, layers {c.layers})"
                        ),
                    )
                kv_tokens = t if kv_tokens is None else min(kv_tokens, t)
            stage_link = None
            if len(devs) > 1:
                stage_link = min(
                    (cluster.link_between(a, b) for a, b in itertools.pairwise(ids)),
                    key=lambda lk: lk.bandwidth_bytes_per_s,
                )
            plan = make_plan(
                name,
                tuple(ids),
                role,
                costs,
                max_num_seqs=mns,
                max_num_batched_tokens=mnbt,
                max_model_len=max_model_len,
                block_size=block_size,
                stage_link=stage_link,
                kv_tokens_override=kv_tokens,
            )
            if plan is None:
                raise ValidationError(f"{path}layers", "the stages leave no KV room for max_model_len")
            plan.notes["layers"] = [list(r) for r in ranges]
        else:
            tp = _int(inst, "tp", path, len(devs))
            if tp != len(devs):
                raise ValidationError(
                    f"{path}tp", f"{tp} but {len(devs)} devices; one TP group per instance (give layers for a pipeline)"
                )
            if len({d.spec for d in devs}) > 1:
                raise ValidationError(
                    f"{path}devices",
                    f"a TP group needs devices of one type; got {', '.join(sorted({d.spec.name for d in devs}))}",
                )
            spec = devs[0].spec
            tp_link = slowest_link(cluster, ids, ids) if tp > 1 else None
            cost = CostModel(model, spec, dtype, prof(devs[0]), tp=tp, tp_link=tp_link)
            mem = min(d.memory_bytes for d in devs)
            if role == "main" and strategy == "cronus" and not mnbt_given:
                tbt_s = _num(cfg, "tbt_slo_ms", "", 100.0) / 1000
                budget = tbt_token_budget(cost, 0.9 * tbt_s, min(64, mns), 1024, 2048)
                mnbt = max(64, budget // 16 * 16)
            where = f"{spec.name} ({', '.join(ids)})" + (f" at tp {tp}" if tp > 1 else "")
            if workers is not None:
                plan = _hetis_main(
                    name,
                    ids,
                    devs[0],
                    cost,
                    workers,
                    cfg,
                    cluster,
                    model,
                    profiles,
                    used,
                    built,
                    path,
                    mns,
                    mnbt,
                    max_model_len,
                    block_size,
                )
            else:
                plan = make_plan(
                    name,
                    tuple(ids),
                    role,
                    (cost,),
                    memory_bytes=mem,
                    max_num_seqs=mns,
                    max_num_batched_tokens=mnbt,
                    max_model_len=max_model_len,
                    block_size=block_size,
                )
            if plan is None:
                raise ValidationError(f"{path}devices", weights_reason(cost, mem, mns, mnbt, max_model_len, where))
    except ValidationError as e:
        if e.field.startswith("instances["):
            raise
        raise ValidationError(f"{path}{e.field}", e.message) from None
    built.plans.append(plan)
    built.devices[name] = ids


def _parse_layers(layers: Any, n: int, L: int, path: str) -> tuple[tuple[int, int], ...]:
    if not isinstance(layers, list) or len(layers) != n:
        raise ValidationError(path, f"must be 'auto' or a list of {n} [start, end] ranges (one per device)")
    out = []
    prev = 0
    for r in layers:
        if not (isinstance(r, (list, tuple)) and len(r) == 2 and all(isinstance(x, int) for x in r)):
            raise ValidationError(path, f"each entry is [start, end], got {r!r}")
        a, b = r
        if a != prev or b <= a:
            raise ValidationError(path, f"ranges must be contiguous from 0 and non-empty, got {layers!r}")
        out.append((a, b))
        prev = b
    if prev != L:
        raise ValidationError(path, f"ranges must end at num_hidden_layers {L}, got {prev}")
    return tuple(out)


def _hetis_main(
    name: str,
    ids: list[str],
    dev: ClusterDevice,
    cost: CostModel,
    workers: Any,
    cfg: dict[str, Any],
    cluster: ClusterConfig,
    model: ModelConfig,
    profiles: dict[str, DeviceProfile],
    used: dict[str, str],
    built: _Built,
    path: str,
    mns: int,
    mnbt: int,
    max_model_len: int,
    block_size: int,
) -> InstancePlan | None:
    if cost.tp != 1:
        raise ValidationError(f"{path}tp", "a Hetis main instance runs on one device")
    if not isinstance(workers, list):
        raise ValidationError(f"{path}workers", "must be a list of {device, kv_heads}")
    dtype = str(cfg.get("dtype", "bfloat16"))
    ws: list[AttentionWorker] = []
    fixed: list[int | None] = []
    for j, w in enumerate(workers):
        wp = f"{path}workers[{j}]."
        if not isinstance(w, dict) or "device" not in w or set(w) - {"device", "kv_heads"}:
            raise ValidationError(f"{path}workers[{j}]", "must be {device, kv_heads (optional)}")
        wdev = _devices_of({"devices": [w["device"]], "name": f"{name} worker"}, wp, cluster, used)[0]
        kvh = w.get("kv_heads")
        if kvh is not None:
            kvh = _int(w, "kv_heads", wp, minimum=0)
        fixed.append(kvh)
        wcost = CostModel(model, wdev.spec, dtype, profiles.get(wdev.spec.name))
        budget = int(wdev.memory_bytes * wcost.memory_utilization) - wdev.spec.reserved_bytes
        ws.append(AttentionWorker(wdev.id, wcost, cluster.link_between(dev.id, wdev.id), budget))
    fp = cost.memory_footprint(mns, mnbt, dev.memory_bytes)
    if fp["kv_bytes_available"] <= 0:
        return None
    disp = HeadDispatcher(cost, fp["kv_bytes_available"], ws, cluster.link_between)
    if sum(f or 0 for f in fixed) > disp.num_kv_heads:
        raise ValidationError(f"{path}workers", f"kv_heads add up to more than the model's {disp.num_kv_heads}")
    mean_ctx = _num(cfg, "mean_context_tokens", "", 1536.0)
    try:
        disp.dispatch(mns, mean_ctx, min_tokens=max_model_len, fixed=tuple(fixed) if ws else None)
    except ValueError as e:
        raise ValidationError(f"{path}workers", str(e)) from None
    plan = make_plan(
        name,
        tuple(ids),
        "main",
        (cost,),
        memory_bytes=dev.memory_bytes,
        max_num_seqs=mns,
        max_num_batched_tokens=mnbt,
        max_model_len=max_model_len,
        block_size=block_size,
        attention_kv_heads=disp.kept,
        kv_tokens_override=disp.capacity_tokens(),
    )
    if plan is not None:
        built.dispatchers[name] = disp
    return plan


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
    built = _Built([], {}, {})
    used: dict[str, str] = {}
    for i, inst in enumerate(insts):
        _build_instance(i, inst, cfg, cluster, model, profiles or {}, used, built)
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
            tbt_s = _num(cfg, "tbt_slo_ms", "", 100.0) / 1000
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
