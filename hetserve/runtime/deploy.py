"""Build a ``ClusterEngine`` from a cluster file, a strategy and its parameters: the deployment (the simulator's
objects), each instance's worker options (device, dtype, pacing, environment), where workers run (local, TCP,
Ray) and the links KV hand-offs are paced to."""

from __future__ import annotations

import dataclasses
from typing import Any

from hetserve.core.model_config import ModelConfig
from hetserve.runtime.cluster_engine import ClusterEngine
from hetserve.runtime.connect import make_placement
from hetserve.runtime.instances import InstanceOptions, worker_devices
from hetserve.runtime.kv_handoff import KVLink
from hetserve.strategies.defaults import default_instances


def from_cluster(model: str, cluster: Any, strategy: str, *, instances: list[dict[str, Any]] | None = None,
                 kv_layouts: dict[str, str] | None = None, dtypes: dict[str, str] | None = None,
                 block_sizes: dict[str, int] | None = None, kv_stall_s: dict[str, float] | None = None,
                 deployment_params: dict[str, Any] | None = None, backend: str | None = None,
                 ray_address: str | None = None, listen_host: str = "127.0.0.1",
                 ray_options: dict[str, Any] | None = None, dtype: str = "float32", device: str = "cpu",
                 load_format: str = "auto", worker_env: dict[str, dict[str, str]] | None = None,
                 profiles: dict[str, Any] | None = None, **engine_kwargs: Any) -> ClusterEngine:
    """A ClusterEngine for ``strategy`` on a cluster file (a path, a name under examples/clusters, a mapping or
    a ClusterConfig). Default instances: ``strategies.defaults.default_instances``.
    Paced CPU partitions (``emulation: paced_cpu``) set each worker's speed. ``backend`` (default: the file's
    ``placement``): ``local`` socket pairs, ``tcp`` local workers dialling ``listen_host``, or ``ray`` (one actor
    per instance on its device's node, ``ray_backend.py``; ``ray_address``, ``ray_options`` go to RayPlacement).

    GPU workers: ``device="cuda"``, ``dtype="bfloat16"``, ``load_format="dummy"`` (random weights of the model's
    shapes), ``worker_env`` (device type name or device id -> environment, e.g. an MPS client's share and
    memory cap), ``profiles`` (device type name -> measured DeviceProfile for routing and Cronus' split)."""
    from pathlib import Path

    from hetserve.core.cluster import ClusterConfig, load_cluster
    from hetserve.strategies.build import build_deployment

    if isinstance(cluster, str) and not Path(cluster).exists():
        root = Path(__file__).resolve().parents[2] / "examples" / "clusters"
        cand = root / f"{cluster}.yaml"
        if cand.exists():
            cluster = str(cand)
    cl = cluster if isinstance(cluster, ClusterConfig) else load_cluster(cluster)
    mc = ModelConfig.from_path(model)
    ids = cl.device_ids
    if instances is None:
        instances = default_instances(strategy, ids)
    max_len = int(engine_kwargs.get("max_model_len", 512))
    cfg = {"strategy": strategy, "dtype": dtype, "max_model_len": max_len, "instances": instances,
           **(deployment_params or {})}  # e.g. Cronus split_policy, Hetis redispatch_every_steps
    dep = build_deployment(cl, mc, cfg, profiles or {})
    envs = worker_env or {}

    def env_of(dev_id: str) -> dict[str, str]:
        d = cl.device(dev_id)
        return dict(envs.get(dev_id, envs.get(d.spec.name, {})))

    speeds = {}
    if cl.emulation is not None and cl.emulation.kind == "paced_cpu":
        speeds = {p.name: p.amount for p in cl.emulation.partitions}
    options = {}
    for inst in instances:
        name = inst["name"]
        dev = cl.device(inst["devices"][0])
        options[name] = InstanceOptions(dtype=(dtypes or {}).get(name, dtype), device=device, load_format=load_format,
                                        envs=tuple(env_of(d) for d in inst["devices"]),
                                        speed=float(speeds.get(dev.spec.name, 1.0)),
                                        kv_layout=(kv_layouts or {}).get(name, "NHD"),
                                        kv_stall_s=(kv_stall_s or {}).get(name, 0.0),
                                        speeds=tuple(float(speeds.get(cl.device(d).spec.name, 1.0))
                                                     for d in inst["devices"]))
        if block_sizes and name in block_sizes:
            dep.plans[name] = dataclasses.replace(dep.plans[name], block_size=block_sizes[name])
    nodes = {inst["name"]: cl.device(inst["devices"][0]).node for inst in instances}
    for plan in dep.plans.values():  # the workers of PP / TP instances, each on its own device's node
        nodes.update({w: cl.device(d).node for w, d in worker_devices(plan).items()})
    placement = make_placement(backend or cl.placement, nodes, listen_host=listen_host, ray_address=ray_address,
                               ray_options=ray_options)
    engine_kwargs.setdefault("attn_speeds", {d.id: float(speeds.get(d.spec.name, 1.0)) for d in cl.devices})
    links = {}  # the declared link between each pair of instances' first devices paces their KV hand-offs
    for a in instances:
        for b in instances:
            da, db = cl.device(a["devices"][0]), cl.device(b["devices"][0])
            lk = cl.link_between(da, db)
            links[(a["name"], b["name"])] = KVLink("shm" if da.node == db.node else "tcp",
                                                   lk.bandwidth_bytes_per_s, lk.latency_s)
    engine_kwargs.setdefault("kv_links", links)
    engine_kwargs.setdefault("attn_envs", {d.id: env_of(d.id) for d in cl.devices if env_of(d.id)})
    return ClusterEngine(model, dep, options, placement=placement, **engine_kwargs)
