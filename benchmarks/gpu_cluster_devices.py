"""Where ``gpu_cluster.py`` runs each device of a cluster file on this host's GPUs, and with what environment.

A cluster file names devices, not GPUs. The devices on the partitions of a node's ``emulation`` share one physical
GPU (the emulation's ``of``); every other device is a GPU of its own; GPUs are numbered in file order (CUDA
ordinals 0, 1, ... of this process). So emulated-h100-mps-pair's two MPS clients both run on GPU0, h200-pair's
``host:0`` / ``host:1`` on GPU0 / GPU1, and h200-pair-lowend's whole H200 on GPU0 and its MPS client on GPU1.

The workers' environment (``from_cluster(worker_env=...)``):

* One GPU for every device (each emulated pair so far): as before this module, keyed by partition name: the MPS
  client's SM share and memory cap (declared memory + 3 GiB for the CUDA context), nothing else.
* Several GPUs: keyed by device id. A whole GPU's worker sees its own GPU first, then the other whole GPUs
  (``CUDA_VISIBLE_DEVICES`` by UUID): it computes on its ``cuda:0`` and NCCL / CUDA IPC still see the peer. An MPS
  client sees its GPU only: the MPS daemon is started seeing only the GPUs that have MPS clients (MPS everywhere
  else would change the whole GPUs), and then a client names its GPU by UUID (NVIDIA's MPS guide). MPS only where
  the cluster file declares an ``mps`` emulation.

``gpu_cluster.py`` also takes the high-end and low-end roles from the file: the device with the most bf16 FLOP/s is
the high-end one (the first on a tie), the other the low-end one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# NVLink multicast stays off on a machine of several GPUs (NCCL, PyTorch symmetric memory, NVSHMEM)
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
CONTEXT_BYTES = 3 * 2**30  # an MPS client's cap above its declared memory: the CUDA context and workspaces


def multicast_off() -> None:
    os.environ.update(MULTICAST_OFF)


@dataclass(frozen=True)
class GpuLayout:
    gpu_of: dict[str, int]  # device id -> GPU ordinal
    num_gpus: int
    mps_gpus: tuple[int, ...]  # GPUs whose devices are MPS clients

    @property
    def multi(self) -> bool:
        return self.num_gpus > 1

    @property
    def uses_mps(self) -> bool:
        return bool(self.mps_gpus)


def _partitions(cluster: Any) -> dict[str, Any]:
    return {p.name: p for p in cluster.emulation.partitions} if cluster.emulation is not None else {}


def gpu_layout(cluster: Any) -> GpuLayout:
    parts = _partitions(cluster)
    gpu_of: dict[str, int] = {}
    shared: dict[str, int] = {}  # node -> the GPU its partitions are carved from
    mps: set[int] = set()
    n = 0
    for d in cluster.devices:
        if d.emulation is not None and d.spec.name in parts:
            if d.node not in shared:
                shared[d.node] = n
                n += 1
            gpu_of[d.id] = shared[d.node]
            if cluster.emulation.kind == "mps":
                mps.add(shared[d.node])
        else:
            gpu_of[d.id] = n
            n += 1
    return GpuLayout(gpu_of, n, tuple(sorted(mps)))


def roles(cluster: Any) -> tuple[str, str]:
    """(high-end, low-end) device ids of a two-device cluster: the most bf16 FLOP/s is high-end."""
    if len(cluster.devices) != 2:
        raise ValueError(f"{cluster.name}: gpu_cluster.py runs a pair, got {len(cluster.devices)} devices")
    a, b = cluster.devices
    return (a.id, b.id) if a.spec.flops("bfloat16") >= b.spec.flops("bfloat16") else (b.id, a.id)


def mps_daemon_visible(layout: GpuLayout, ids: list[str]) -> str | None:
    """``CUDA_VISIBLE_DEVICES`` of the MPS daemon: the GPUs with MPS clients (None on one GPU: as before)."""
    if not layout.multi or not layout.uses_mps:
        return None
    return ",".join(ids[g] for g in layout.mps_gpus)


def worker_env(
    cluster: Any, layout: GpuLayout, ids: list[str], client_env: Callable[[float, int | None], dict[str, str]] | None
) -> dict[str, dict[str, str]]:
    """Environment per device (see the module docstring); ``ids`` names GPU ``i`` for ``CUDA_VISIBLE_DEVICES``
    (UUIDs), ``client_env(share, cap)`` is the running MPS daemon's (``MpsDaemon.client_env``)."""
    parts = _partitions(cluster)
    if layout.uses_mps and client_env is None:
        raise ValueError("MPS clients need a running MPS daemon's client_env")
    if cluster.emulation is not None and cluster.emulation.kind != "mps" and parts:
        raise ValueError(f"gpu_cluster.py emulates devices by MPS only, not {cluster.emulation.kind}")
    out: dict[str, dict[str, str]] = {}
    if not layout.multi:
        for part in parts.values():
            cap = None if part.memory_bytes is None else part.memory_bytes + CONTEXT_BYTES
            out[part.name] = client_env(part.amount, cap)  # type: ignore[misc]
        return out
    if len(ids) < layout.num_gpus:
        raise ValueError(f"{cluster.name} needs {layout.num_gpus} GPUs, this process sees {len(ids)}")
    whole = [g for g in range(layout.num_gpus) if g not in layout.mps_gpus]
    for d in cluster.devices:
        g = layout.gpu_of[d.id]
        part = parts.get(d.spec.name) if d.emulation is not None else None
        if part is not None:
            cap = None if part.memory_bytes is None else part.memory_bytes + CONTEXT_BYTES
            env = dict(client_env(part.amount, cap))  # type: ignore[misc]
            env["CUDA_VISIBLE_DEVICES"] = ids[g]
        else:
            env = {"CUDA_VISIBLE_DEVICES": ",".join([ids[g]] + [ids[o] for o in whole if o != g])}
        out[d.id] = env
    return out


def describe(cluster: Any, layout: GpuLayout, gpu_name: str) -> str:
    """The ``device`` line of a result file run on several GPUs."""
    parts = []
    for d in cluster.devices:
        how = f"{d.spec.name}, emulated: {d.emulation}" if d.emulation else f"{d.spec.name}, whole"
        parts.append(f"{d.id} on GPU{layout.gpu_of[d.id]} ({how})")
    return f"{layout.num_gpus} x {gpu_name}: " + "; ".join(parts) + "; see cluster file"
