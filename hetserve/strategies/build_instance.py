"""One instance of a deployment config, checked and planned: its devices, TP group or pipeline stages (layers
given or ``auto``), Cronus' main chunk budget, a Hetis main's attention workers and head split. Errors raise
ValidationError naming the key (``instances[1].devices``). The whole config: :mod:`hetserve.strategies.build`.

A device belongs to one instance, unless every instance on it declares ``memory_fraction`` (its share of each of
its devices' memory; the shares on a device add up to at most 1): e.g. PD's prefill at TP 2 over both GPUs of a
pair with its decode instance on one of them. Such instances are planned with their share of the memory, and the
simulator slows their steps by ``shared_slowdown`` while another instance on the device is busy
(``plan.notes["shared_devices"]``, ``sim/contention.py``).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from hetserve.core.cluster import ClusterConfig, ClusterDevice
from hetserve.core.devices import GiB, LinkSpec
from hetserve.core.errors import ValidationError
from hetserve.core.model_config import ModelConfig
from hetserve.planner.costmodel import CostModel
from hetserve.planner.profile import DeviceProfile
from hetserve.strategies.base import InstancePlan, make_plan
from hetserve.strategies.cronus import tbt_token_budget
from hetserve.strategies.hetis import AttentionWorker, HeadDispatcher
from hetserve.strategies.pp import StageDevice, choose_layer_split

INSTANCE_KEYS = (
    "name",
    "role",
    "devices",
    "tp",
    "layers",
    "max_num_seqs",
    "max_num_batched_tokens",
    "workers",
    "memory_fraction",
    "shared_slowdown",
)
# Two CUDA processes on one GPU without MPS time-slice it: while both have work, each gets about half of it. An
# assumption, not a measurement; an instance may declare its own factors (``shared_slowdown: {memory, compute}``).
DEFAULT_SHARED_SLOWDOWN = {"memory": 2.0, "compute": 2.0}
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


def positive_num(obj: dict[str, Any], key: str, path: str, default: float) -> float:
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
class Built:
    plans: list[InstancePlan]
    devices: dict[str, list[str]]  # instance -> device ids
    dispatchers: dict[str, HeadDispatcher]
    # device id -> (instance, memory fraction) of the instances that declared a share of it
    shares: dict[str, list[tuple[str, float]]] = field(default_factory=dict)


def _devices_of(
    inst: dict[str, Any],
    path: str,
    cluster: ClusterConfig,
    used: dict[str, str],
    shares: dict[str, list[tuple[str, float]]] | None = None,
    fraction: float | None = None,
) -> list[ClusterDevice]:
    """The instance's devices, each claimed whole (``fraction`` None) or for a share of its memory."""
    ids = inst.get("devices")
    if not isinstance(ids, list) or not ids or not all(isinstance(x, str) for x in ids):
        raise ValidationError(f"{path}devices", "must be a non-empty list of device ids like 'n0:1'")
    shares = {} if shares is None else shares
    name = str(inst.get("name", path))
    out = []
    for did in ids:
        try:
            dev = cluster.device(did)
        except ValidationError as e:
            raise ValidationError(f"{path}devices", e.message) from None
        if did in used:
            hint = " (an instance without memory_fraction holds it whole)" if fraction is not None else ""
            raise ValidationError(f"{path}devices", f"device {did} is already used by {used[did]}{hint}")
        if fraction is None:
            if did in shares:
                others = ", ".join(n for n, _ in shares[did])
                raise ValidationError(
                    f"{path}devices",
                    f"device {did} is already used by {others}; instances sharing a device each give memory_fraction",
                )
            used[did] = name
        else:
            total = sum(f for _, f in shares.get(did, [])) + fraction
            if total > 1.0 + 1e-9:
                raise ValidationError(
                    f"{path}memory_fraction", f"device {did}: memory fractions add up to {total:g} > 1"
                )
            shares.setdefault(did, []).append((name, fraction))
        out.append(dev)
    return out


def _share(inst: dict[str, Any], path: str) -> tuple[float | None, dict[str, float]]:
    """(``memory_fraction`` or None, ``shared_slowdown`` factors) of an instance."""
    frac = inst.get("memory_fraction")
    if frac is not None and (isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac <= 1):
        raise ValidationError(f"{path}memory_fraction", f"must be a number in (0, 1], got {frac!r}")
    slow = dict(DEFAULT_SHARED_SLOWDOWN)
    given = inst.get("shared_slowdown")
    if given is not None:
        if frac is None:
            raise ValidationError(f"{path}shared_slowdown", "only for an instance with memory_fraction")
        if not isinstance(given, dict) or set(given) - set(slow):
            raise ValidationError(f"{path}shared_slowdown", "must be {memory: x, compute: y}, each >= 1")
        for k, v in given.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 1:
                raise ValidationError(f"{path}shared_slowdown.{k}", f"is a slowdown factor, must be >= 1, got {v!r}")
            slow[k] = float(v)
    return (None if frac is None else float(frac)), slow


def mark_shared(built: Built) -> None:
    """Note on each plan the devices it shares with another instance (the simulator slows it while they run)."""
    plans = {p.name: p for p in built.plans}
    for did, users in built.shares.items():
        if len(users) > 1:
            for name, _ in users:
                plans[name].notes.setdefault("shared_devices", []).append(did)


def build_instance(
    i: int,
    inst: dict[str, Any],
    cfg: dict[str, Any],
    cluster: ClusterConfig,
    model: ModelConfig,
    profiles: dict[str, DeviceProfile],
    used: dict[str, str],
    built: Built,
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
    fraction, slowdown = _share(inst, path)
    devs = _devices_of(inst, path, cluster, used, built.shares, fraction)
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
    if workers is not None and fraction is not None:
        raise ValidationError(f"{path}memory_fraction", "a Hetis main holds its device whole here")

    def prof(dev: ClusterDevice) -> DeviceProfile | None:
        return profiles.get(dev.spec.name)

    def mem_of(dev: ClusterDevice) -> int:
        """What this instance may plan with on ``dev``: the device's memory (or cap), or its share of it."""
        return dev.memory_bytes if fraction is None else int(dev.memory_bytes * fraction)

    try:
        if layers is not None:
            if strategy in ("pd", "cronus", "hetis") and len(devs) > 1:
                raise ValidationError(f"{path}layers", f"{strategy} instances are single-stage here")
            stages = [StageDevice(d.spec, mem_of(d), prof(d)) for d in devs]
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
                fp = c.memory_footprint(mns, mnbt, mem_of(d))
                t = fp["kv_bytes_available"] // max(c.kv_bytes_per_token(), 1)
                if t * 1 < max_model_len:
                    raise ValidationError(
                        f"{path}layers",
                        weights_reason(
                            c, mem_of(d), mns, mnbt, max_model_len, f"{d.spec.name} ({d.id}, layers {c.layers})"
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
            mem = min(mem_of(d) for d in devs)
            if role == "main" and strategy == "cronus" and not mnbt_given:
                tbt_s = positive_num(cfg, "tbt_slo_ms", "", 100.0) / 1000
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
    if fraction is not None:
        plan.notes["memory_fraction"] = fraction
        plan.notes["shared_slowdown"] = slowdown
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
    built: Built,
    path: str,
    mns: int,
    mnbt: int,
    max_model_len: int,
    block_size: int,
) -> InstancePlan | None:
    if cost.tp != 1:
        raise ValidationError(f"{path}tp", "a Hetis main instance runs on one device")
    cost.graph_max_batch = 0  # a Hetis main's steps talk to other processes: the runtime never graphs them
    cost.piecewise_max_tokens = 0
    cost.schedules_ahead = False  # its steps wait on attention workers: the runtime keeps one in flight
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
    mean_ctx = positive_num(cfg, "mean_context_tokens", "", 1536.0)
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
