"""Field readers shared by the cluster file's parser (``cluster.py``): mappings with known keys, numbers, links
and custom devices, each error naming the key's path (``nodes[0].devices[1].memory_gb``)."""

from __future__ import annotations

from typing import Any

from hetserve.core.devices import LINK_KINDS, TFLOPS, DeviceSpec, GBps, GiB, LinkSpec, get_link
from hetserve.core.errors import ValidationError


def check_keys(obj: Any, path: str, allowed: tuple[str, ...], required: tuple[str, ...] = ()) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ValidationError(path or "cluster", f"must be a mapping, got {type(obj).__name__}")
    for k in obj:
        if k not in allowed:
            raise ValidationError(join_path(path, str(k)), f"unknown key; allowed: {', '.join(allowed)}")
    for k in required:
        if obj.get(k) is None:
            raise ValidationError(join_path(path, k), "required")
    return obj


def join_path(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def number(obj: dict[str, Any], key: str, path: str, *, positive: bool = True, integer: bool = False) -> Any:
    v = obj[key]
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok or (positive and not v > 0) or (not positive and v < 0):
        kind = "integer" if integer else "number"
        raise ValidationError(
            join_path(path, key), f"must be a {'positive' if positive else 'non-negative'} {kind}, got {v!r}"
        )
    return v


def parse_link(obj: Any, path: str) -> LinkSpec:
    if isinstance(obj, str):
        try:
            return get_link(obj)
        except ValidationError as e:
            raise ValidationError(path, e.message) from None
    if isinstance(obj, dict) and "bandwidth_gbps" in obj:
        raise ValidationError(
            join_path(path, "bandwidth_gbps"), "ambiguous unit; write bandwidth_gb_per_s (GB/s) or bandwidth_gbit_per_s"
        )
    allowed = LINK_KEYS
    d = check_keys(obj, path, allowed, ("name", "kind"))
    if d["kind"] not in LINK_KINDS:
        raise ValidationError(join_path(path, "kind"), f"{d['kind']!r} is not one of {', '.join(LINK_KINDS)}")
    bw_keys = [k for k in ("bandwidth_gb_per_s", "bandwidth_gbit_per_s", "bandwidth_bytes_per_s") if k in d]
    if len(bw_keys) != 1:
        raise ValidationError(
            join_path(path, "bandwidth_gb_per_s"),
            "give exactly one of bandwidth_gb_per_s, bandwidth_gbit_per_s, bandwidth_bytes_per_s",
        )
    bw = float(number(d, bw_keys[0], path))
    bw *= {"bandwidth_gb_per_s": GBps, "bandwidth_gbit_per_s": GBps / 8, "bandwidth_bytes_per_s": 1.0}[bw_keys[0]]
    lat = 0.0
    if "latency_s" in d:
        lat = float(number(d, "latency_s", path, positive=False))
    elif "latency_us" in d:
        lat = float(number(d, "latency_us", path, positive=False)) * 1e-6
    return LinkSpec(str(d["name"]), d["kind"], bw, lat, str(d.get("notes", "")))


LINK_KEYS = (
    "name", "kind", "bandwidth_gb_per_s", "bandwidth_gbit_per_s", "bandwidth_bytes_per_s", "latency_us", "latency_s",
    "notes",
)
_CUSTOM_PASSTHROUGH = (
    "vendor", "price_per_hour", "host_link", "kv_layout", "kv_block_size", "gemm_efficiency", "hbm_efficiency", "num_sms",
)
CUSTOM_KEYS = (
    "type", "name", "memory_gb", "memory_bytes", "tflops_bf16", "tflops_fp16", "tflops_fp8", "tflops_fp32",
    "hbm_gbps", "hbm_bytes_per_s", "spec", *_CUSTOM_PASSTHROUGH,
)
_TFLOPS_KEYS = {"tflops_bf16": "bfloat16", "tflops_fp16": "float16", "tflops_fp8": "fp8", "tflops_fp32": "float32"}
ENTRY_KEYS = ("count", "memory_cap_gb", "memory_cap_bytes")


def parse_custom_device(d: dict[str, Any], path: str) -> DeviceSpec:
    if "spec" in d:
        if not isinstance(d["spec"], dict):
            raise ValidationError(join_path(path, "spec"), "must be a mapping of DeviceSpec fields")
        try:
            return DeviceSpec.from_dict(d["spec"])
        except ValidationError as e:
            raise ValidationError(join_path(path, f"spec.{e.field}"), e.message) from None
        except TypeError as e:
            raise ValidationError(join_path(path, "spec"), str(e)) from None
    for k in ("name", "tflops_bf16"):
        if d.get(k) is None:
            raise ValidationError(join_path(path, k), "required for type: custom")
    if "memory_gb" not in d and "memory_bytes" not in d:
        raise ValidationError(join_path(path, "memory_gb"), "required for type: custom (or memory_bytes)")
    if "hbm_gbps" not in d and "hbm_bytes_per_s" not in d:
        raise ValidationError(join_path(path, "hbm_gbps"), "required for type: custom (GB/s; or hbm_bytes_per_s)")
    mem = (
        int(number(d, "memory_gb", path) * GiB) if "memory_gb" in d else number(d, "memory_bytes", path, integer=True)
    )
    hbm = float(number(d, "hbm_gbps", path)) * GBps if "hbm_gbps" in d else float(number(d, "hbm_bytes_per_s", path))
    flops = {dt: float(number(d, k, path)) * TFLOPS for k, dt in _TFLOPS_KEYS.items() if k in d}
    kw: dict[str, Any] = {k: d[k] for k in _CUSTOM_PASSTHROUGH if k in d}
    kw.setdefault("vendor", "custom")
    kw.setdefault("num_sms", 1)
    if "host_link" in kw:
        parse_link(kw["host_link"], join_path(path, "host_link"))
    try:
        return DeviceSpec(name=str(d["name"]), memory_bytes=mem, peak_flops=flops, hbm_bytes_per_s=hbm, **kw)
    except ValidationError as e:
        raise ValidationError(join_path(path, e.field), e.message) from None
    except TypeError as e:
        raise ValidationError(path, str(e)) from None
