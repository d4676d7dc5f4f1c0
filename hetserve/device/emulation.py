"""Several emulated devices carved out of one physical GPU (``shared/GPU.md``), made real.

Two ways, both named in every result (``describe()`` -> ``{"emulated": true, "method": ...}``):

* **Disjoint green contexts** (one process, several streams): the driver splits the GPU's SMs into disjoint
  groups (``cuDevSmResourceSplitByCount``), each group becomes a green context with its own stream, and torch
  work launched on that stream (``torch.cuda.ExternalStream``) runs on those SMs only. HBM bandwidth and L2 stay
  one shared pool. Memory cannot be capped per stream (``torch.cuda.set_per_process_memory_fraction`` is per
  process), so an in-process partition's ``memory_cap_bytes`` is honoured by sizing what the engine allocates
  (its KV pool, see :func:`kv_blocks_for_memory_cap`); nothing stops other allocations from crossing it.
* **MPS** (one process per emulated device; ``hetserve.device.mps``): :class:`MpsDaemon` starts
  ``nvidia-cuda-mps-control -d`` with private pipe and log directories, launches worker processes with
  ``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE`` and ``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT`` (a real per-process memory
  cap), and always quits the daemon on exit.

``cuda.bindings`` is imported only when a green context is made, so this module imports on any machine; on a
machine without CUDA every constructor raises :class:`EmulationError` saying what is missing.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

from hetserve.core.errors import HetserveError, ValidationError

GiB = 2**30
PartitionKind = Literal["whole", "green_context", "mps"]
SHARED_RESOURCES_NOTE = (
    "emulated on one GPU: HBM bandwidth and L2 are shared with the other partitions, so concurrent "
    "memory-bound work slows each other (real separate GPUs would not)"
)


class EmulationError(HetserveError):
    """A partition could not be made (no CUDA, no driver bindings, no MPS daemon, a driver call failed)."""


@dataclass(frozen=True)
class Partition:
    """What to emulate: the whole device, ``amount`` SMs (green context) or ``amount`` % of threads (MPS).

    ``memory_cap_bytes``: the emulated device's memory. MPS enforces it per process; a green context only
    through what the engine sizes from it (its KV pool).
    """

    kind: PartitionKind = "whole"
    amount: float | None = None
    memory_cap_bytes: int | None = None
    device_index: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("whole", "green_context", "mps"):
            raise ValidationError("partition", f"kind must be whole, green_context or mps, got {self.kind!r}")
        if self.kind == "green_context" and (self.amount is None or self.amount < 1 or self.amount != int(self.amount)):
            raise ValidationError("partition", f"sm:N needs a positive whole number of SMs, got {self.amount!r}")
        if self.kind == "mps" and (self.amount is None or not 0 < self.amount <= 100):
            raise ValidationError("partition", f"mps:P needs a thread percentage in (0, 100], got {self.amount!r}")
        if self.memory_cap_bytes is not None and self.memory_cap_bytes <= 0:
            raise ValidationError("partition", f"memory cap must be > 0, got {self.memory_cap_bytes}")

    @property
    def emulated(self) -> bool:
        return self.kind != "whole"

    @property
    def label(self) -> str:
        """Short, file-name safe: ``whole``, ``sm32``, ``mps25``."""
        if self.kind == "green_context":
            return f"sm{int(self.amount or 0)}"
        if self.kind == "mps":
            return f"mps{self.amount:g}"
        return "whole"

    def device_name(self, physical_name: str) -> str:
        """The name a cluster file would give this partition: ``H100-32SM`` for 32 SMs of ``H100-SXM``."""
        short = physical_name.split("-")[0] if "-" in physical_name else physical_name
        if self.kind == "green_context":
            return f"{short}-{int(self.amount or 0)}SM"
        if self.kind == "mps":
            return f"{short}-MPS{self.amount:g}"
        return physical_name

    def emulation_string(self, physical_name: str, total_sms: int | None, actual_sms: int | None = None) -> str | None:
        """The cluster file's ``emulated_by`` wording (``hetserve.core.cluster``), or None for the whole device."""
        if self.kind == "green_context":
            n = actual_sms if actual_sms is not None else int(self.amount or 0)
            return f"green_context: {n} of {total_sms if total_sms is not None else '?'} SMs of {physical_name}"
        if self.kind == "mps":
            return f"mps: {self.amount:g}% of {physical_name}'s threads"
        return None

    def describe(
        self, physical_name: str = "GPU", total_sms: int | None = None, actual_sms: int | None = None
    ) -> dict[str, Any]:
        """For result JSON: which partition, how it was made, and that it is emulated."""
        d: dict[str, Any] = {
            "name": self.device_name(physical_name),
            "partition": self.label,
            "emulated": self.emulated,
            "method": None if self.kind == "whole" else self.kind,
            "of": physical_name,
            "emulation": self.emulation_string(physical_name, total_sms, actual_sms),
            "memory_cap_bytes": self.memory_cap_bytes,
        }
        if self.kind == "green_context":
            d["num_sms_requested"] = int(self.amount or 0)
            d["num_sms"] = actual_sms if actual_sms is not None else int(self.amount or 0)
            d["of_num_sms"] = total_sms
            d["memory_cap_enforced_by"] = "KV pool sizing (in-process; not an allocator limit)"
        elif self.kind == "mps":
            d["thread_percentage"] = self.amount
            d["memory_cap_enforced_by"] = "CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"
        if self.emulated:
            d["notes"] = SHARED_RESOURCES_NOTE
        return d


_PART_RE = re.compile(r"^(sm|mps):([0-9]+(?:\.[0-9]+)?)$")
_MEM_RE = re.compile(r"^mem:([0-9]+(?:\.[0-9]+)?)$")


def parse_partition(text: str | None, device_index: int = 0) -> Partition:
    """``None``/``whole`` -> the whole device; ``sm:32``; ``mps:25``; optionally ``,mem:24`` (GiB)."""
    if text is None or text.strip().lower() in ("", "whole", "none", "full"):
        return Partition("whole", device_index=device_index)
    parts = [p.strip().lower() for p in text.split(",") if p.strip()]
    kind: PartitionKind | None = None
    amount: float | None = None
    mem: int | None = None
    for p in parts:
        m = _PART_RE.match(p)
        if m:
            if kind is not None:
                raise ValidationError("--partition", f"{text!r} names two partitions")
            kind = "green_context" if m.group(1) == "sm" else "mps"
            amount = float(m.group(2))
            continue
        mm = _MEM_RE.match(p)
        if mm:
            mem = int(float(mm.group(1)) * GiB)
            continue
        raise ValidationError("--partition", f"cannot read {p!r} in {text!r}; use sm:N, mps:P, whole, and ,mem:GIB")
    if kind is None:
        if mem is None:
            raise ValidationError("--partition", f"cannot read {text!r}")
        return Partition("whole", None, mem, device_index)
    return Partition(kind, amount, mem, device_index)


# ---------------------------------------------------------------------------------------------- device facts


def catalog_name_for(torch_device_name: str, total_memory_bytes: int | None = None) -> str:
    """The ``hetserve.core.devices`` catalog name for what torch reports (``NVIDIA H100 80GB HBM3`` -> ``H100-SXM``);
    the reported name with spaces replaced when the catalog has no match."""
    n = torch_device_name.upper()
    if "H200" in n:
        return "H200"
    if "H100" in n:
        return "H100-PCIe" if ("PCIE" in n or "NVL" in n) else "H100-SXM"
    if "A100" in n:
        big = "80G" in n or (total_memory_bytes is not None and total_memory_bytes > 48 * GiB)
        return "A100-80GB" if big else "A100-40GB"
    for key, name in (("L40S", "L40S"), ("L4", "L4"), ("A10", "A10"), ("A30", "A30"), ("T4", "T4"),
                      ("V100", "V100"), ("4090", "RTX4090"), ("3090", "RTX3090"), ("MI300X", "MI300X")):
        if key in n:
            return name
    return re.sub(r"[^A-Za-z0-9.]+", "-", torch_device_name).strip("-") or "gpu"


def physical_device_info(device_index: int = 0) -> dict[str, Any]:
    """Name, catalog name, SM count and memory of a CUDA device; raises EmulationError without one."""
    torch = _torch_cuda()
    props = torch.cuda.get_device_properties(device_index)
    name = torch.cuda.get_device_name(device_index)
    return {
        "torch_name": name,
        "catalog_name": catalog_name_for(name, int(props.total_memory)),
        "num_sms": int(props.multi_processor_count),
        "total_memory_bytes": int(props.total_memory),
        "capability": f"{props.major}.{props.minor}",
    }


def kv_blocks_for_memory_cap(
    memory_cap_bytes: int, weight_bytes: int, kv_bytes_per_block: int, reserve_bytes: int = 2 * GiB
) -> int:
    """KV blocks an engine on an in-process partition may allocate so that weights + KV + a reserve for
    activations and workspaces stay within the partition's memory cap (at least 2: the null block and one)."""
    if kv_bytes_per_block <= 0:
        raise ValidationError("kv_bytes_per_block", f"must be > 0, got {kv_bytes_per_block}")
    room = memory_cap_bytes - weight_bytes - reserve_bytes
    if room < 2 * kv_bytes_per_block:
        raise EmulationError(
            f"memory cap {memory_cap_bytes / GiB:.1f} GiB leaves no KV room after {weight_bytes / GiB:.1f} GiB of "
            f"weights and a {reserve_bytes / GiB:.1f} GiB reserve"
        )
    return int(room // kv_bytes_per_block)


def _torch_cuda() -> Any:
    try:
        import torch
    except ImportError:
        raise EmulationError("needs torch (pip install torch)") from None
    if not torch.cuda.is_available():
        raise EmulationError("needs a CUDA GPU; torch sees none on this machine")
    return torch


def _driver() -> Any:
    try:
        from cuda.bindings import driver
    except ImportError:
        try:
            from cuda import cuda as driver  # cuda-python < 12.6 layout
        except ImportError:
            raise EmulationError(
                "disjoint green contexts need the CUDA driver bindings (pip install cuda-bindings, "
                "matching the driver's CUDA major version)"
            ) from None
    return driver


def _error_text(drv: Any, err: Any) -> str:
    try:
        e2, text = drv.cuGetErrorString(err)
    except Exception as e:  # noqa: BLE001 - the message is best effort
        return f"{err} (no description: {e})"
    if e2 == drv.CUresult.CUDA_SUCCESS and text:
        return f"{getattr(err, 'name', err)}: {text.decode() if isinstance(text, bytes) else text}"
    return str(err)


def _check(drv: Any, what: str, result: Any) -> Any:
    """Unpack a cuda.bindings call: (err,) -> None, (err, x) -> x, (err, x, y, ...) -> (x, y, ...)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if err != drv.CUresult.CUDA_SUCCESS:
        raise EmulationError(f"{what} failed: {_error_text(drv, err)}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


# ---------------------------------------------------------------------------------------------- green contexts


class GreenContext:
    """A live disjoint SM partition: a driver green context and one torch stream bound to it.

    Run work on it with ``with gc.activate(): ...`` (torch's current stream becomes this stream). Close it
    (or use it as a context manager) after every tensor op on its stream has finished.
    """

    def __init__(
        self,
        partition: Partition,
        ctx_handle: Any,
        stream_handle: Any,
        num_sms: int,
        total_sms: int,
        physical_name: str,
        drv: Any,
    ) -> None:
        import torch

        self.partition = partition
        self.num_sms = num_sms
        self.total_sms = total_sms
        self.physical_name = physical_name
        self._drv = drv
        self._ctx = ctx_handle
        self._stream_handle = stream_handle
        self.stream = torch.cuda.ExternalStream(int(stream_handle), device=torch.device("cuda", partition.device_index))
        self._closed = False

    @property
    def name(self) -> str:
        return self.partition.device_name(self.physical_name)

    @property
    def memory_cap_bytes(self) -> int | None:
        return self.partition.memory_cap_bytes

    def emulation_string(self) -> str | None:
        return self.partition.emulation_string(self.physical_name, self.total_sms, self.num_sms)

    def describe(self) -> dict[str, Any]:
        return self.partition.describe(self.physical_name, self.total_sms, self.num_sms)

    @contextmanager
    def activate(self) -> Iterator[Any]:
        """Make this partition's stream torch's current stream (on its device) for the block."""
        import torch

        if self._closed:
            raise EmulationError(f"{self.name}: green context already closed")
        with torch.cuda.device(self.partition.device_index), torch.cuda.stream(self.stream):
            yield self.stream

    def synchronize(self) -> None:
        self.stream.synchronize()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.stream.synchronize()
        finally:
            drv = self._drv
            _check(drv, "cuStreamDestroy", drv.cuStreamDestroy(self._stream_handle))
            _check(drv, "cuGreenCtxDestroy", drv.cuGreenCtxDestroy(self._ctx))

    def __enter__(self) -> GreenContext:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GreenContext({self.name}, {self.num_sms} of {self.total_sms} SMs)"


def _split_off(drv: Any, resource: Any, count: int) -> tuple[Any, Any]:
    """One group of at least ``count`` SMs from ``resource`` (the driver rounds up to its granularity), and the rest."""
    groups, num_groups, rest = _check(
        drv, f"cuDevSmResourceSplitByCount({count} SMs)", drv.cuDevSmResourceSplitByCount(1, resource, 0, count)
    )
    if num_groups < 1:
        raise EmulationError(f"the driver could not split off a group of {count} SMs")
    return groups[0], rest


def _sm_count(resource: Any) -> int:
    return int(resource.sm.smCount)


def create_green_contexts(partitions: Sequence[Partition], physical_name: str | None = None) -> list[GreenContext]:
    """Disjoint green contexts, one per partition (all ``green_context`` and on one device), in order.

    Each group is split off the SMs still free; the last one takes the whole remainder when the remainder is
    exactly its size. A lone partition of ``n`` SMs is made either by splitting off ``n`` or by splitting off
    ``total - n`` and keeping the rest, whichever lands nearer ``n`` (the driver rounds group sizes to its SM
    granularity). Actual SM counts are in each result's ``num_sms``.
    """
    if not partitions:
        return []
    for p in partitions:
        if p.kind != "green_context":
            raise ValidationError("partition", f"create_green_contexts takes sm:N partitions, got {p.label}")
    device_index = partitions[0].device_index
    if any(p.device_index != device_index for p in partitions):
        raise ValidationError("partition", "disjoint green contexts must all be on one device")
    torch = _torch_cuda()
    drv = _driver()
    torch.cuda.init()
    torch.zeros(1, device=torch.device("cuda", device_index))  # make the primary context current
    info = physical_device_info(device_index)
    name = physical_name or info["catalog_name"]
    _check(drv, "cuInit", drv.cuInit(0))
    dev = _check(drv, "cuDeviceGet", drv.cuDeviceGet(device_index))
    whole = _check(
        drv, "cuDeviceGetDevResource(SM)",
        drv.cuDeviceGetDevResource(dev, drv.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM),
    )
    total = _sm_count(whole)
    wanted = [int(p.amount or 0) for p in partitions]
    if sum(wanted) > total:
        raise EmulationError(f"disjoint partitions need {sum(wanted)} SMs; {name} has {total}")
    resources: list[Any] = []
    if len(partitions) == 1 and wanted[0] < total:
        n = wanted[0]
        first, _ = _split_off(drv, whole, n)
        candidates = [first]
        if total - n >= 1:
            _, rest = _split_off(drv, whole, total - n)
            candidates.append(rest)
        resources.append(min(candidates, key=lambda r: (abs(_sm_count(r) - n), -_sm_count(r))))
    else:
        remaining = whole
        for i, n in enumerate(wanted):
            last = i == len(wanted) - 1
            if (last and _sm_count(remaining) == n) or n == total:
                resources.append(remaining)
                break
            group, remaining = _split_off(drv, remaining, n)
            resources.append(group)
    made: list[GreenContext] = []
    try:
        for p, res in zip(partitions, resources, strict=True):
            desc = _check(drv, "cuDevResourceGenerateDesc", drv.cuDevResourceGenerateDesc([res], 1))
            ctx = _check(
                drv, "cuGreenCtxCreate",
                drv.cuGreenCtxCreate(desc, dev, drv.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM),
            )
            stream = _check(
                drv, "cuGreenCtxStreamCreate",
                drv.cuGreenCtxStreamCreate(ctx, drv.CUstream_flags.CU_STREAM_NON_BLOCKING, 0),
            )
            made.append(GreenContext(p, ctx, stream, _sm_count(res), total, name, drv))
    except Exception:
        for gc in made:
            gc.close()
        raise
    return made


def matmul_tflops_on(stream: Any, device: Any, n: int, iters: int, capture: str | None) -> float:
    """bf16 ``n``^3 matmul rate on ``stream``: eager (``capture=None``), or replayed there from a CUDA graph
    captured on that stream (``"partition"``) or on a fresh side stream (``"side"``)."""
    import torch

    with torch.cuda.stream(stream):
        g = torch.Generator(device=device)
        g.manual_seed(0)
        a = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
        b = torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g)
        for _ in range(3):
            a @ b
        run: Any = lambda: a @ b
        if capture is not None:
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=stream if capture == "partition" else torch.cuda.Stream(device)):
                a @ b
            run = g.replay
            run()
        stream.synchronize()
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record(stream)
        for _ in range(iters):
            run()
        e1.record(stream)
        stream.synchronize()
    return 2 * n**3 * iters / (e0.elapsed_time(e1) / 1e3) / 1e12


def graph_replay_check(gc: GreenContext, n: int = 4096, iters: int = 10) -> dict[str, Any]:
    """Does work replayed from a CUDA graph on ``gc``'s stream stay on its SMs? A bf16 ``n``^3 matmul's rate
    eagerly, and replayed there from graphs captured on the partition's stream and on a plain side stream (as
    an engine's graph runner does). A replay rate above 1.3x the eager one means the graph used other SMs."""
    import torch

    device = torch.device("cuda", gc.partition.device_index)
    eager = matmul_tflops_on(gc.stream, device, n, iters, None)
    on_partition = matmul_tflops_on(gc.stream, device, n, iters, "partition")
    on_side = matmul_tflops_on(gc.stream, device, n, iters, "side")
    return {
        "eager_tflops": eager,
        "graph_captured_on_partition_tflops": on_partition,
        "graph_captured_on_side_stream_tflops": on_side,
        "captured_on_partition_stays_inside": on_partition <= 1.3 * eager,
        "captured_on_side_stream_stays_inside": on_side <= 1.3 * eager,
    }
