"""Emulated devices that are partitions of one GPU share its HBM bandwidth and L2: while one partition runs a
step, another's step runs slower. The cluster file declares by how much, per partition
(``emulation.partitions[i].shared_slowdown: {memory, compute}``, measured: e.g. MPS 75% / 25% clients of an
H100 reach 2026 / 1165 GB/s at once against 3018 / 2064 GB/s alone). Real separate GPUs have none of it.

:func:`shared_gpu_contention` maps each instance on such partitions to its GPU and factors; the simulator
multiplies a step's time by the memory factor (a decode-dominated step) or the compute factor (a step with a
prefill chunk) when another instance on the same GPU has a step in flight as it starts, or, for an instance
that spans several partitions (pipeline stages), when one of its own earlier steps is still in flight.

Instances that share one device (``memory_fraction`` in the deployment config, e.g. PD's prefill at TP 2 over
both GPUs of a pair with the decode instance on one of them; ``plan.notes["shared_devices"]``) contend the same
way, with their own ``shared_slowdown`` factors (``build_instance.py``; default 2: time-slicing without MPS).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hetserve.core.cluster import ClusterConfig
    from hetserve.strategies.base import Deployment


@dataclass(frozen=True)
class Contention:
    gpu: str  # what it shares: its partitions' physical GPU ("<node>/<GPU type>") or a device ("device <id>")
    memory: float
    compute: float
    spans: bool = False  # the instance itself covers several partitions (PP stages, TP ranks): they contend too


def shared_gpu_contention(cluster: ClusterConfig | None, deployment: Deployment) -> dict[str, Contention]:
    """Instance name -> its shared GPU and slowdown factors, for instances on partitions that declare any and for
    instances that share a device with another instance."""
    out = _partition_contention(cluster, deployment)
    for name, plan in deployment.plans.items():
        shared = plan.notes.get("shared_devices")
        if shared and name not in out:  # an instance on a partition keeps its partition's factors
            slow = plan.notes.get("shared_slowdown") or {}
            out[name] = Contention(
                f"device {shared[0]}", float(slow.get("memory", 2.0)), float(slow.get("compute", 2.0))
            )
    return out


def _partition_contention(cluster: ClusterConfig | None, deployment: Deployment) -> dict[str, Contention]:
    if cluster is None or cluster.emulation is None:
        return {}
    parts = {p.name: p for p in cluster.emulation.partitions}
    by_id = {d.id: d for d in cluster.devices}
    out: dict[str, Contention] = {}
    for name, plan in deployment.plans.items():
        mem = comp = 1.0
        gpu = ""
        used: set[str] = set()
        for did in plan.device_ids:
            dev = by_id.get(did)
            part = parts.get(dev.spec.name) if dev is not None else None
            if part is None:
                continue
            gpu = f"{dev.node}/{cluster.emulation.of.name}"  # type: ignore[union-attr]
            used.add(did)
            mem, comp = max(mem, part.shared_slowdown_memory), max(comp, part.shared_slowdown_compute)
        if gpu and (mem, comp) != (1.0, 1.0):
            out[name] = Contention(gpu, mem, comp, spans=len(used) > 1)
    return out
