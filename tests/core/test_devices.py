from __future__ import annotations

import pytest

from hetserve.core.devices import (
    CATALOG,
    GREEN_CONTEXT_BANDWIDTH_CURVE,
    LINKS,
    LOCAL_LINK,
    DeviceSpec,
    GiB,
    LinkSpec,
    cpu_host_spec,
    get_device,
    get_link,
)
from hetserve.core.errors import ValidationError

REQUIRED = [
    "H200",
    "H100-SXM",
    "H100-PCIe",
    "A100-40GB",
    "A100-80GB",
    "L40S",
    "L4",
    "A10",
    "A30",
    "T4",
    "V100",
    "RTX4090",
    "RTX3090",
    "MI300X",
    "MI250",
    "Ascend-910B",
    "Gaudi2",
    "cpu-host",
]


def test_catalog_has_every_required_device_with_sane_numbers() -> None:
    for name in REQUIRED:
        d = CATALOG[name]
        assert d.memory_bytes >= 16 * GiB
        assert d.supports("bfloat16")
        assert d.hbm_bytes_per_s > 1e10
        assert d.host_link in LINKS
        assert d.price_per_hour > 0
        assert d.emulated_by is None


def test_datasheet_figures_spot_check() -> None:
    # NVIDIA H100 SXM5 datasheet: 989.4 TFLOP/s dense bf16 (1979 with sparsity), 3.35 TB/s, 80 GB, 132 SMs
    h = get_device("H100-SXM")
    assert h.flops("bfloat16") == pytest.approx(989.4e12)
    assert h.flops("fp8") == pytest.approx(1978.9e12)
    assert h.hbm_bytes_per_s == pytest.approx(3.35e12)
    assert h.num_sms == 132
    # measured by GPU.md: 781 TFLOP/s and 2664 GB/s GEMV on this GPU
    assert h.flops("bfloat16") * h.gemm_efficiency == pytest.approx(781e12, rel=0.01)
    assert h.hbm_bytes_per_s * h.hbm_efficiency == pytest.approx(2664e9, rel=0.01)
    # A10 datasheet: 125 TFLOP/s bf16 dense, 600 GB/s, 24 GB; no fp8
    a10 = get_device("A10")
    assert a10.flops("bf16") == pytest.approx(125e12)
    assert a10.hbm_bytes_per_s == pytest.approx(600e9)
    assert not a10.supports("fp8")
    assert get_device("MI300X").memory_bytes == 192 * GiB


def test_lookup_is_forgiving_and_errors_list_known_names() -> None:
    assert get_device("h100_sxm") is CATALOG["H100-SXM"]
    assert get_device("rtx 4090") is CATALOG["RTX4090"]
    with pytest.raises(ValidationError) as e:
        get_device("B200")
    assert "B200" in str(e.value) and "H100-SXM" in str(e.value) and "MI300X" in str(e.value)
    with pytest.raises(ValidationError) as e:
        get_link("nvlink9")
    assert "nvlink4" in str(e.value) and "eth100" in str(e.value)
    with pytest.raises(ValidationError) as e:
        get_device("A10").flops("fp8")
    assert e.value.field == "dtype" and "bfloat16" in str(e.value)


def test_links_order_and_transfer_time() -> None:
    for name in ("nvlink4", "pcie3x16", "pcie4x16", "pcie5x16", "ib200", "ib400", "roce100", "eth25", "eth100", "shm"):
        assert get_link(name).name == name
    bw = {n: get_link(n).bandwidth_bytes_per_s for n in LINKS}
    assert bw["eth25"] < bw["eth100"] < bw["pcie4x16"] < bw["pcie5x16"] < bw["nvlink4"]
    assert bw["ib200"] < bw["ib400"]
    lk = LinkSpec("x", "ethernet", 2e9, 1e-3)
    assert lk.transfer_time_s(4e9) == pytest.approx(1e-3 + 2.0)
    assert LOCAL_LINK.transfer_time_s(1e12) == 0.0
    with pytest.raises(ValidationError):
        LinkSpec("x", "carrier-pigeon", 1.0, 0.0)  # type: ignore[arg-type]


def test_scaled_partition_follows_measured_bandwidth_curve() -> None:
    h = get_device("H100-SXM")
    p = h.scaled(32 / 132, memory_bytes=24 * GiB, name="H100-32SM")
    assert p.num_sms == 32
    assert p.flops("bfloat16") == pytest.approx(989.4e12 * 32 / 132)
    # GPU.md, 32-SM green context: 2087 of 3019 GB/s copy bandwidth
    assert p.hbm_bytes_per_s == pytest.approx(3.35e12 * 2087 / 3019)
    assert p.memory_bytes == 24 * GiB and p.name == "H100-32SM"
    assert p.emulated_by is not None and "32" in p.emulated_by
    # between measured points: linear in the SM fraction (48 SMs is halfway between 32 and 64)
    mid = h.scaled(48 / 132)
    assert mid.hbm_bytes_per_s == pytest.approx(3.35e12 * (2087 + 2783) / 2 / 3019)
    # bandwidth saturates: not linear, monotone, and the whole GPU is itself
    fr = [x / 132 for x in (8, 16, 33, 64, 100, 132)]
    bws = [h.scaled(f).hbm_bytes_per_s for f in fr]
    assert bws == sorted(bws)
    assert bws[1] > h.hbm_bytes_per_s * 16 / 132 * 2
    whole = h.scaled(1.0)
    assert whole.hbm_bytes_per_s == pytest.approx(h.hbm_bytes_per_s)
    assert GREEN_CONTEXT_BANDWIDTH_CURVE[-1] == (1.0, 1.0)
    with pytest.raises(ValidationError):
        h.scaled(0.0)


def test_paced_and_cpu_specs() -> None:
    c = cpu_host_spec(4, 16 * GiB)
    assert c.flops("float32") == pytest.approx(4 * 64e9)
    assert c.hbm_bytes_per_s == pytest.approx(40e9)
    assert cpu_host_spec(64, GiB).hbm_bytes_per_s == pytest.approx(300e9)
    half = c.paced(0.5)
    assert half.flops("float32") == pytest.approx(2 * 64e9)
    assert half.hbm_bytes_per_s == pytest.approx(20e9)
    assert half.memory_bytes == c.memory_bytes and half.emulated_by


def test_spec_validation_and_round_trip() -> None:
    with pytest.raises(ValidationError) as e:
        DeviceSpec("x", "custom", 0, {"bfloat16": 1e12}, 1e9, 1)
    assert e.value.field == "memory_bytes"
    with pytest.raises(ValidationError) as e:
        DeviceSpec("x", "custom", GiB, {"int4": 1e12}, 1e9, 1)
    assert e.value.field == "peak_flops.int4"
    for d in CATALOG.values():
        assert DeviceSpec.from_dict(d.to_dict()) == d
        hash(d)
