"""Devices and links as data: the catalog the cost model, the planner and ``serve --cluster`` share.

Peak figures are datasheet numbers for *dense* math (no 2:4 sparsity). Where a GPU lacks native support for
a dtype, the entry either gives the rate it falls back to (noted) or omits the dtype. ``gemm_efficiency`` and
``hbm_efficiency`` are the fractions of peak a large GEMM and a weight-streaming GEMV reach: measured on an
H100 SXM (``shared/GPU.md``: 781 of 989 TFLOP/s, 2664 of 3350 GB/s) and H200, a guess elsewhere (said so).
Prices are rough public on-demand USD per device-hour (late 2024 / 2025 list prices): approximate, only for
``--objective cost``.

Units: bytes, bytes/s, FLOP/s, seconds. "GB" in the catalog comments is the datasheet's unit; memory sizes
are stored as GiB multiples of the marketing figure (what torch reports is within ~1%).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from hetserve.core.errors import ValidationError

GiB = 2**30
TFLOPS = 1e12
GBps = 1e9

KvLayout = Literal["NHD", "HND"]
LinkKind = Literal["nvlink", "pcie", "infiniband", "roce", "ethernet", "shm", "local"]
LINK_KINDS: tuple[str, ...] = ("nvlink", "pcie", "infiniband", "roce", "ethernet", "shm", "local")
DTYPES: tuple[str, ...] = ("bfloat16", "float16", "fp8", "float32")
_DTYPE_ALIASES = {"float8_e4m3fn": "fp8", "float8": "fp8", "bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

# Fraction of the whole H100's throughput that an SM partition reaches, from shared/GPU.md
# (torch green contexts, 2 GiB device copy): bandwidth saturates long before compute does.
# (fraction of SMs, fraction of whole-GPU copy bandwidth)
GREEN_CONTEXT_BANDWIDTH_CURVE: tuple[tuple[float, float], ...] = (
    (0.0, 0.0),
    (16 / 132, 1189 / 3019),
    (32 / 132, 2087 / 3019),
    (64 / 132, 2783 / 3019),
    (96 / 132, 3007 / 3019),
    (1.0, 1.0),
)


def canonical_dtype(dtype: str) -> str:
    return _DTYPE_ALIASES.get(dtype, dtype)


def _interp_curve(curve: Sequence[tuple[float, float]], x: float) -> float:
    if x <= curve[0][0]:
        return curve[0][1]
    for (x0, y0), (x1, y1) in zip(curve, curve[1:], strict=False):
        if x <= x1:
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return curve[-1][1]


@dataclass(frozen=True)
class LinkSpec:
    """One direction of a link: ``bandwidth_bytes_per_s`` is what a large transfer achieves one way."""

    name: str
    kind: LinkKind
    bandwidth_bytes_per_s: float
    latency_s: float
    notes: str = ""

    def __post_init__(self) -> None:
        if self.kind not in LINK_KINDS:
            raise ValidationError("link.kind", f"{self.kind!r} is not one of {', '.join(LINK_KINDS)}")
        if not self.bandwidth_bytes_per_s > 0:
            raise ValidationError("link.bandwidth_bytes_per_s", f"must be > 0, got {self.bandwidth_bytes_per_s}")
        if self.latency_s < 0:
            raise ValidationError("link.latency_s", f"must be >= 0, got {self.latency_s}")

    def transfer_time_s(self, num_bytes: float) -> float:
        return self.latency_s + num_bytes / self.bandwidth_bytes_per_s


@dataclass(frozen=True)
class DeviceSpec:
    """One accelerator (or host CPU) as the cost model sees it."""

    name: str
    vendor: str  # nvidia | amd | huawei | intel | cpu | custom
    memory_bytes: int
    # dense peak FLOP/s keyed by canonical dtype (see DTYPES); a missing dtype is unsupported
    peak_flops: dict[str, float] = field(hash=False)
    hbm_bytes_per_s: float
    num_sms: int  # SMs (NVIDIA), CUs (AMD), AI cores (Ascend), TPCs (Gaudi), cores (CPU)
    kv_layout: KvLayout = "NHD"
    kv_block_size: int = 16
    host_link: str = "pcie4x16"  # name in LINKS of the path to the host / other PCIe devices
    price_per_hour: float = 0.0  # USD, approximate on-demand
    emulated_by: str | None = None
    gemm_efficiency: float = 0.75  # fraction of peak a large GEMM reaches
    hbm_efficiency: float = 0.80  # fraction of hbm_bytes_per_s a weight-streaming read reaches
    step_overhead_s: float = 1e-4  # host-side fixed cost of one engine step (scheduling, launches)
    reserved_bytes: int = GiB  # runtime context, workspaces, CUDA graphs: never available to KV
    notes: str = ""

    def __post_init__(self) -> None:
        if self.memory_bytes <= 0:
            raise ValidationError("memory_bytes", f"must be > 0, got {self.memory_bytes}")
        if self.hbm_bytes_per_s <= 0:
            raise ValidationError("hbm_bytes_per_s", f"must be > 0, got {self.hbm_bytes_per_s}")
        if self.num_sms <= 0:
            raise ValidationError("num_sms", f"must be > 0, got {self.num_sms}")
        if not self.peak_flops:
            raise ValidationError("peak_flops", "needs at least one dtype")
        for k, v in self.peak_flops.items():
            if k not in DTYPES:
                raise ValidationError(f"peak_flops.{k}", f"unknown dtype; known: {', '.join(DTYPES)}")
            if not v > 0:
                raise ValidationError(f"peak_flops.{k}", f"must be > 0, got {v}")
        if self.kv_layout not in ("NHD", "HND"):
            raise ValidationError("kv_layout", f"must be NHD or HND, got {self.kv_layout!r}")
        if self.kv_block_size <= 0:
            raise ValidationError("kv_block_size", f"must be > 0, got {self.kv_block_size}")
        for name in ("gemm_efficiency", "hbm_efficiency"):
            v = getattr(self, name)
            if not 0.0 < v <= 1.0:
                raise ValidationError(name, f"must be in (0, 1], got {v}")

    def supports(self, dtype: str) -> bool:
        return canonical_dtype(dtype) in self.peak_flops

    def flops(self, dtype: str) -> float:
        """Dense peak FLOP/s for ``dtype``; raises ValidationError naming the supported dtypes."""
        d = canonical_dtype(dtype)
        try:
            return self.peak_flops[d]
        except KeyError:
            raise ValidationError(
                "dtype", f"{self.name} has no {dtype} figure; supported: {', '.join(sorted(self.peak_flops))}"
            ) from None

    def scaled(
        self,
        fraction_sms: float,
        memory_bytes: int | None = None,
        name: str | None = None,
        emulated_by: str | None = None,
        bandwidth_curve: Sequence[tuple[float, float]] = GREEN_CONTEXT_BANDWIDTH_CURVE,
    ) -> DeviceSpec:
        """An SM partition of this GPU: compute scales with the SM fraction, bandwidth follows ``bandwidth_curve``.

        The default curve is the H100's measured green-context copy bandwidth (GPU.md). Measured matmul
        throughput on partitions is within about -7%..+18% of linear in SMs, so linear compute is kept.
        """
        if not 0.0 < fraction_sms <= 1.0:
            raise ValidationError("fraction_sms", f"must be in (0, 1], got {fraction_sms}")
        num_sms = max(1, round(self.num_sms * fraction_sms))
        bw_fraction = _interp_curve(bandwidth_curve, fraction_sms)
        return dataclasses.replace(
            self,
            name=name or f"{self.name}-{num_sms}SM",
            memory_bytes=memory_bytes if memory_bytes is not None else self.memory_bytes,
            peak_flops={k: v * fraction_sms for k, v in self.peak_flops.items()},
            hbm_bytes_per_s=self.hbm_bytes_per_s * bw_fraction,
            num_sms=num_sms,
            price_per_hour=self.price_per_hour * fraction_sms,
            emulated_by=emulated_by or f"{num_sms} of {self.num_sms} SMs of {self.name}",
        )

    def paced(self, speed: float, name: str | None = None, emulated_by: str | None = None) -> DeviceSpec:
        """The same device slowed to ``speed`` of itself (a paced CPU worker): compute and bandwidth scale."""
        if not 0.0 < speed <= 1.0:
            raise ValidationError("speed", f"must be in (0, 1], got {speed}")
        return dataclasses.replace(
            self,
            name=name or f"{self.name}-x{speed:g}",
            peak_flops={k: v * speed for k, v in self.peak_flops.items()},
            hbm_bytes_per_s=self.hbm_bytes_per_s * speed,
            emulated_by=emulated_by or f"{self.name} paced to {speed:g}x",
        )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["peak_flops"] = dict(self.peak_flops)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeviceSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        extra = sorted(set(d) - known)
        if extra:
            raise ValidationError(extra[0], f"unknown DeviceSpec field; known: {', '.join(sorted(known))}")
        return cls(**d)


def _nv(
    name: str,
    mem_gb: float,
    bf16: float,
    fp16: float,
    fp8: float | None,
    fp32: float,
    hbm_gb_s: float,
    sms: int,
    host_link: str,
    price: float,
    **kw: Any,
) -> DeviceSpec:
    flops = {"bfloat16": bf16 * TFLOPS, "float16": fp16 * TFLOPS, "float32": fp32 * TFLOPS}
    if fp8 is not None:
        flops["fp8"] = fp8 * TFLOPS
    kw.setdefault("vendor", "nvidia")
    return DeviceSpec(
        name=name,
        memory_bytes=int(mem_gb * GiB),
        peak_flops=flops,
        hbm_bytes_per_s=hbm_gb_s * GBps,
        num_sms=sms,
        host_link=host_link,
        price_per_hour=price,
        **kw,
    )


_CPU_FP32_FLOPS_PER_CORE = 64e9  # 2 AVX2 FMA ports x 8 fp32 lanes x 2 FLOP x 2 GHz
_CPU_BYTES_PER_S_PER_CORE = 10e9  # a core streams ~10 GB/s; a socket saturates at its channel limit
_CPU_PRICE_PER_CORE_HOUR = 0.05  # ~USD per vCPU-hour of general-purpose cloud instances (approximate)


def cpu_host_spec(
    num_cores: int,
    mem_bytes: int,
    name: str = "cpu-local",
    flops_per_core_fp32: float = _CPU_FP32_FLOPS_PER_CORE,
    mem_bandwidth_bytes_per_s: float | None = None,
) -> DeviceSpec:
    """A CPU of this machine (``os.cpu_count()``, total RAM): AVX2-class peak, ~10 GB/s a core, capped at 300 GB/s.

    bf16/fp16 are given the fp32 rate: without AMX / AVX512-BF16 torch gains nothing from them on CPU.
    """
    if num_cores <= 0:
        raise ValidationError("num_cores", f"must be > 0, got {num_cores}")
    peak = num_cores * flops_per_core_fp32
    bw = mem_bandwidth_bytes_per_s or min(num_cores * _CPU_BYTES_PER_S_PER_CORE, 300e9)
    return DeviceSpec(
        name=name,
        vendor="cpu",
        memory_bytes=int(mem_bytes),
        peak_flops={"float32": peak, "bfloat16": peak, "float16": peak},
        hbm_bytes_per_s=bw,
        num_sms=num_cores,
        kv_layout="NHD",
        kv_block_size=16,
        host_link="shm",
        price_per_hour=num_cores * _CPU_PRICE_PER_CORE_HOUR,
        gemm_efficiency=0.6,  # guess: MKL/oneDNN sgemm on one socket
        hbm_efficiency=0.7,  # guess: STREAM-like fraction of nominal
        step_overhead_s=5e-4,  # guess: eager PyTorch, no graphs
        reserved_bytes=GiB,
        notes="generic CPU; bf16 at the fp32 rate",
    )


_CATALOG_LIST: tuple[DeviceSpec, ...] = (
    # NVIDIA H200 SXM datasheet: 141 GB HBM3e, 4.8 TB/s, 989 bf16 / 1979 fp8 dense, 67 fp32; 132 SMs.
    # Efficiency: 788-798 TFLOP/s, ~4.3 TB/s copy measured (GPU.md). ~USD 4/h (approx, neocloud list).
    _nv("H200", 141, 989.4, 989.4, 1978.9, 67, 4800, 132, "pcie5x16", 4.0, gemm_efficiency=0.80, hbm_efficiency=0.80),
    # NVIDIA H100 SXM5 datasheet: 80 GB HBM3, 3.35 TB/s, 989 bf16 / 1979 fp8 dense, 67 fp32; 132 SMs.
    # Efficiency measured (GPU.md): 781 TFLOP/s matmul, 2664 GB/s GEMV. ~USD 3/h (approx).
    _nv(
        "H100-SXM", 80, 989.4, 989.4, 1978.9, 67, 3350, 132, "pcie5x16", 3.0, gemm_efficiency=0.79, hbm_efficiency=0.795
    ),
    # NVIDIA H100 PCIe datasheet: 80 GB HBM2e, 2.0 TB/s, 756 bf16 / 1513 fp8 dense, 51 fp32; 114 SMs. ~USD 2.5/h.
    _nv("H100-PCIe", 80, 756.5, 756.5, 1513, 51, 2000, 114, "pcie5x16", 2.5),
    # NVIDIA A100 datasheet (SXM): 312 bf16 dense, 19.5 fp32, no fp8; 108 SMs. 40 GB: 1555 GB/s. ~USD 1.3/h.
    _nv("A100-40GB", 40, 312, 312, None, 19.5, 1555, 108, "pcie4x16", 1.3),
    # A100 80 GB SXM: 2039 GB/s HBM2e, same compute. ~USD 1.8/h.
    _nv("A100-80GB", 80, 312, 312, None, 19.5, 2039, 108, "pcie4x16", 1.8),
    # NVIDIA L40S datasheet: 48 GB GDDR6, 864 GB/s, 362 bf16 / 733 fp8 dense, 91.6 fp32; 142 SMs. ~USD 1.2/h.
    _nv("L40S", 48, 362, 362, 733, 91.6, 864, 142, "pcie4x16", 1.2),
    # NVIDIA L4 datasheet: 24 GB GDDR6, 300 GB/s, 121 bf16 / 242.5 fp8 dense, 30.3 fp32; 58 SMs. ~USD 0.8/h.
    _nv("L4", 24, 121, 121, 242.5, 30.3, 300, 58, "pcie4x16", 0.8),
    # NVIDIA A10 datasheet: 24 GB GDDR6, 600 GB/s, 125 bf16 dense, 31.2 fp32; 72 SMs. ~USD 0.75/h.
    _nv("A10", 24, 125, 125, None, 31.2, 600, 72, "pcie4x16", 0.75),
    # NVIDIA A30 datasheet: 24 GB HBM2, 933 GB/s, 165 bf16 dense, 10.3 fp32; 56 SMs. ~USD 0.9/h (rarely listed).
    _nv("A30", 24, 165, 165, None, 10.3, 933, 56, "pcie4x16", 0.9),
    # NVIDIA T4 datasheet: 16 GB GDDR6, 320 GB/s, 65 fp16 tensor (mixed), 8.1 fp32; 40 SMs; PCIe Gen3.
    # Turing has no bf16 tensor cores: bf16 listed at the fp32 rate (run fp16 on a T4). ~USD 0.5/h.
    _nv("T4", 16, 8.1, 65, None, 8.1, 320, 40, "pcie3x16", 0.5, notes="no bf16 tensor cores; use float16"),
    # NVIDIA V100 SXM2 32 GB datasheet: 900 GB/s, 125 fp16 tensor, 15.7 fp32; 80 SMs; PCIe Gen3.
    # Volta has no bf16: listed at the fp32 rate. ~USD 2.5/h.
    _nv("V100", 32, 15.7, 125, None, 15.7, 900, 80, "pcie3x16", 2.5, notes="no bf16 tensor cores; use float16"),
    # NVIDIA Ada whitepaper, RTX 4090: 24 GB GDDR6X, 1008 GB/s, 165.2 bf16/fp16 (fp32 accumulate) dense,
    # 330.3 fp8 (approximate), 82.6 fp32; 128 SMs. ~USD 0.5/h (community clouds, approx).
    _nv("RTX4090", 24, 165.2, 165.2, 330.3, 82.6, 1008, 128, "pcie4x16", 0.5),
    # NVIDIA Ampere GA102 whitepaper, RTX 3090: 24 GB GDDR6X, 936 GB/s, 71 bf16/fp16 (fp32 accumulate) dense,
    # 35.6 fp32; 82 SMs. ~USD 0.3/h (community clouds, approx).
    _nv("RTX3090", 24, 71, 71, None, 35.6, 936, 82, "pcie4x16", 0.3),
    # AMD Instinct MI300X datasheet: 192 GB HBM3, 5.3 TB/s, 1307 bf16 / 2615 fp8 dense, 163.4 fp32 matrix;
    # 304 CUs. Public GEMM benchmarks reach roughly half of peak: gemm_efficiency 0.5 (approximate).
    _nv(
        "MI300X",
        192,
        1307.4,
        1307.4,
        2614.9,
        163.4,
        5300,
        304,
        "pcie5x16",
        3.0,
        vendor="amd",
        gemm_efficiency=0.5,
        hbm_efficiency=0.75,
    ),
    # AMD Instinct MI250 (OAM) datasheet: 128 GB HBM2e, 3.2 TB/s, 362.1 bf16 / fp16, 90.5 fp32 matrix;
    # 208 CUs over two dies (one device here; in practice it shows as two GPUs of 64 GB). ~USD 2/h (guess).
    _nv(
        "MI250",
        128,
        362.1,
        362.1,
        None,
        90.5,
        3200,
        208,
        "pcie4x16",
        2.0,
        vendor="amd",
        gemm_efficiency=0.6,
        notes="two GCDs of 64 GB each appear as two devices",
    ),
    # Huawei Ascend 910B: public figures vary by SKU; ~320 TFLOP/s fp16/bf16, 64 GB HBM2e, ~1.6 TB/s,
    # ~24 AI cores (approximate; no trusted fp32 figure, so fp32 is omitted). ~USD 1.5/h (guess).
    DeviceSpec(
        name="Ascend-910B",
        vendor="huawei",
        memory_bytes=64 * GiB,
        peak_flops={"bfloat16": 320 * TFLOPS, "float16": 320 * TFLOPS},
        hbm_bytes_per_s=1600 * GBps,
        num_sms=24,
        host_link="pcie4x16",
        price_per_hour=1.5,
        gemm_efficiency=0.6,
        kv_layout="HND",
        kv_block_size=128,
        notes="approximate public figures; vllm-ascend uses 128-token KV blocks",
    ),
    # Intel Gaudi2 (Intel launch figures): 96 GB HBM2e, 2.45 TB/s, ~432 bf16 / ~865 fp8 (MME); 24 TPCs.
    # ~USD 1.3/h (approx).
    DeviceSpec(
        name="Gaudi2",
        vendor="intel",
        memory_bytes=96 * GiB,
        peak_flops={"bfloat16": 432 * TFLOPS, "fp8": 865 * TFLOPS},
        hbm_bytes_per_s=2450 * GBps,
        num_sms=24,
        host_link="pcie4x16",
        price_per_hour=1.3,
        gemm_efficiency=0.6,
        kv_layout="HND",
        kv_block_size=128,
        notes="approximate public figures; the Gaudi vLLM fork uses 128-token KV blocks",
    ),
    # A generic 2-socket server: 2 x 32 cores at ~2 GHz with AVX-512 (2 FMA x 16 lanes x 2 FLOP = 128 GFLOP/s
    # a core), 512 GB DDR5-4800, 8 channels a socket (2 x 307 GB/s). bf16 given at 2x fp32 (AVX512-BF16; AMX
    # can do far more). ~USD 6/h for 128 vCPUs (approx).
    DeviceSpec(
        name="cpu-host",
        vendor="cpu",
        memory_bytes=512 * GiB,
        peak_flops={"float32": 8.2 * TFLOPS, "bfloat16": 16.4 * TFLOPS, "float16": 8.2 * TFLOPS},
        hbm_bytes_per_s=614 * GBps,
        num_sms=64,
        host_link="shm",
        price_per_hour=6.0,
        gemm_efficiency=0.6,
        hbm_efficiency=0.7,
        step_overhead_s=5e-4,
        notes="generic 2-socket server CPU",
    ),
)

CATALOG: dict[str, DeviceSpec] = {d.name: d for d in _CATALOG_LIST}

# One direction, what a large transfer achieves (nominal in the comment). Latency: one small message,
# software included, typical published figures (approximate).
_LINK_LIST: tuple[LinkSpec, ...] = (
    # NVLink 4 (H100 SXM): 900 GB/s total = 450 GB/s a direction.
    LinkSpec("nvlink4", "nvlink", 450 * GBps, 3e-6, "H100 NVLink 4, 18 links"),
    # PCIe Gen3 x16: 15.75 GB/s nominal a direction, ~12 GB/s achieved.
    LinkSpec("pcie3x16", "pcie", 12 * GBps, 5e-6, "PCIe Gen3 x16"),
    # PCIe Gen4 x16: 31.5 GB/s nominal, ~25 GB/s achieved (GPU.md's pacing figure).
    LinkSpec("pcie4x16", "pcie", 25 * GBps, 5e-6, "PCIe Gen4 x16"),
    # PCIe Gen5 x16: 63 GB/s nominal, ~50 GB/s achieved.
    LinkSpec("pcie5x16", "pcie", 50 * GBps, 5e-6, "PCIe Gen5 x16"),
    # InfiniBand HDR 200 Gb/s = 25 GB/s nominal; NDR 400 Gb/s = 50 GB/s; ~92% achieved with RDMA.
    LinkSpec("ib200", "infiniband", 23 * GBps, 3e-6, "InfiniBand HDR 200 Gb/s"),
    LinkSpec("ib400", "infiniband", 46 * GBps, 3e-6, "InfiniBand NDR 400 Gb/s"),
    # RoCE v2 100 Gb/s = 12.5 GB/s nominal.
    LinkSpec("roce100", "roce", 11.5 * GBps, 5e-6, "RoCE v2 100 Gb/s"),
    # TCP over Ethernet: 25 GbE ~ 3 GB/s, 100 GbE ~ 12 GB/s achieved (GPU.md's pacing figures).
    LinkSpec("eth25", "ethernet", 3 * GBps, 30e-6, "25 GbE, TCP"),
    LinkSpec("eth100", "ethernet", 12 * GBps, 30e-6, "100 GbE, TCP"),
    # Same host, through shared memory: one memcpy by a CPU thread.
    LinkSpec("shm", "shm", 10 * GBps, 5e-6, "same host, shared memory"),
)
LINKS: dict[str, LinkSpec] = {lk.name: lk for lk in _LINK_LIST}

# Between a device and itself: no transfer happens.
LOCAL_LINK = LinkSpec("local", "local", float("inf"), 0.0, "same device")


def _norm(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "").replace(" ", "")


_DEVICE_BY_NORM = {_norm(k): v for k, v in CATALOG.items()}
_LINK_BY_NORM = {_norm(k): v for k, v in LINKS.items()}


def get_device(name: str) -> DeviceSpec:
    """A catalog device by name (case, '-' and '_' ignored: 'h100_sxm' finds H100-SXM)."""
    spec = _DEVICE_BY_NORM.get(_norm(name))
    if spec is None:
        raise ValidationError("device", f"unknown device type {name!r}; known: {', '.join(CATALOG)}")
    return spec


def get_link(name: str) -> LinkSpec:
    spec = _LINK_BY_NORM.get(_norm(name))
    if spec is None:
        raise ValidationError("link", f"unknown link {name!r}; known: {', '.join(LINKS)}")
    return spec
