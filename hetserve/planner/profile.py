"""Device profiles: what ``hetserve profile`` measures on one device for one model shape, and their interpolation.

A profile is a JSON file (times in seconds, per layer unless said otherwise)::

    {
      "format": "hetserve-profile", "version": 1,
      "device": {"name": "H100-SXM", "emulation": null | "green_context: 32 of 132 SMs of H100-SXM"},
      "model": {"name": "llama-3.1-8b", "shape_hash": "<model_shape_hash(cfg)>", "num_hidden_layers": 32},
      "dtype": "bfloat16", "kv_cache_dtype": "bfloat16", "tp": 1,
      "tables": {
        "dense_s_per_layer":        {"num_tokens": [1, 2, 4, ...], "time_s": [...]},
        "decode_attn_s_per_layer":  {"num_seqs": [1, 8, ...], "context_len": [128, 1024, ...],
                                     "time_s": [[...] per num_seqs]},
        "prefill_attn_s_per_layer": {"num_tokens": [16, 128, ...], "context_len": [0, 1024, ...],
                                     "time_s": [[...] per num_tokens]},
        "lm_head_s":                {"num_tokens": [1, 8, ...], "time_s": [...]},
        "idle_wake_s":              {"idle_s": [0, 0.002, 0.02, ...], "time_s": [...]}
      },
      "copy_bytes_per_s": 3.0e12,
      "kv_bytes_per_token": 131072,
      "step_overhead_s": 4e-5,
      "step_overhead_per_seq_s": 1e-5,
      "new_seq_overhead_s": 5e-5,
      "new_seq_overhead_per_token_s": 2e-7,
      "meta": {"command": "...", "git_commit": "...", "created": "...", "notes": "..."}
    }

* ``dense_s_per_layer``: one decoder layer without the attention core (QKV/O projections, MLP, norms, rotary,
  activation) for a step of ``num_tokens`` tokens.
* ``decode_attn_s_per_layer``: attention of ``num_seqs`` sequences, one new token each, every one with
  ``context_len`` cached tokens (a batch of mixed lengths is looked up at its mean).
* ``decode_attn_skew``: ``{"num_seqs": [...], "slope": [...], "context_len": c, "max_over_mean": [...]}``:
  decode batches of uneven contexts (mean ``c``, largest / mean = ``max_over_mean``) timed beside the even
  ones; ``slope = (uneven / even - 1) / (max_over_mean - 1)``. A batch whose largest context is ``m`` times its
  mean is looked up at the mean and scaled by ``1 + slope x (m - 1)``. Optional (no scaling when absent).
* ``prefill_attn_s_per_layer``: attention of one chunk of ``num_tokens`` new tokens over ``context_len`` cached
  tokens before it (causal within the chunk). A step's chunks are looked up one by one and summed.
* ``lm_head_s``: final norm, LM head and sampling for ``num_tokens`` sampled rows (whole step, not per layer).
* ``copy_bytes_per_s``: device-to-device copy bandwidth (read + write bytes over time).
* ``step_overhead_s``: fixed host-side cost of one step (scheduling, input preparation, launches).
* ``step_overhead_per_seq_s``: host-side cost each request in a step adds (scheduler books, input
  preparation, output assembly); optional, 0 when absent.
* ``new_seq_overhead_s`` + ``new_seq_overhead_per_token_s`` x tokens: host-side cost of a request's first step
  (taking the request in, its runner state, its first output) beyond the tables and the per-step terms; per
  request the executor has not seen before (new or resumed after preemption), tokens = its tokens that step.
  Optional, 0 when absent.
* ``idle_wake_s``: extra time of a step that starts after the engine sat idle for ``idle_s`` seconds (the
  engine loop waking up late, caches and clocks gone cold), clamped to the last grid point; optional, 0 when
  absent.

``shape_hash`` covers the per-layer shapes and the vocabulary, not the number of layers, so a profile taken on a
truncated model serves the full one. ``lm_head_s`` and the attention tables are optional (the cost model falls
back to its roofline for what is missing).

Interpolation: grids are typically powers of two; between grid points values are piecewise linear in the
coordinate. Below the first point the first value is used (clamped); above the last point the last segment is
extended linearly, never below the last value. 2-D tables apply the same rule along each axis (bilinear inside).
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hetserve.core.errors import ValidationError
from hetserve.core.model_config import ModelConfig

PROFILE_FORMAT = "hetserve-profile"
PROFILE_VERSION = 1

_NON_NEGATIVE = (
    "copy_bytes_per_s",
    "kv_bytes_per_token",
    "step_overhead_s",
    "step_overhead_per_seq_s",
    "new_seq_overhead_s",
    "new_seq_overhead_per_token_s",
)
_SHAPE_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "qkv_bias",
    "o_bias",
    "mlp_bias",
    "qk_norm",
    "tie_word_embeddings",
)


def model_shape_hash(model: ModelConfig) -> str:
    """A short hash of what fixes a layer's cost (not the layer count): profiles match models by it."""
    key = json.dumps({k: getattr(model, k) for k in _SHAPE_FIELDS}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _check_grid(xs: Sequence[float], path: str) -> tuple[float, ...]:
    if not isinstance(xs, (list, tuple)) or not xs:
        raise ValidationError(path, "must be a non-empty list of numbers")
    out = tuple(float(x) for x in xs)
    for a, b in itertools.pairwise(out):
        if not b > a:
            raise ValidationError(path, f"must be strictly increasing, got {a:g} then {b:g}")
    return out


def _check_values(ys: Sequence[float], n: int, path: str) -> tuple[float, ...]:
    if not isinstance(ys, (list, tuple)) or len(ys) != n:
        raise ValidationError(path, f"must be a list of {n} numbers (one per grid point)")
    out = tuple(float(y) for y in ys)
    for y in out:
        if not (math.isfinite(y) and y >= 0):
            raise ValidationError(path, f"must be finite and >= 0, got {y}")
    return out


def _weight(xs: tuple[float, ...], x: float) -> tuple[int, float]:
    """Segment index i and weight w with value = (1 - w) * v[i] + w * v[i + 1]; w > 1 extrapolates."""
    n = len(xs)
    if n == 1 or x <= xs[0]:
        return 0, 0.0
    if x >= xs[-1]:
        i = n - 2
    else:
        i = bisect.bisect_right(xs, x) - 1
    return i, (x - xs[i]) / (xs[i + 1] - xs[i])


def _blend(v0: float, v1: float, w: float) -> float:
    y = v0 + (v1 - v0) * w
    if w > 1.0 and y < v1:
        return v1
    return y


@dataclass(frozen=True)
class Table1D:
    xs: tuple[float, ...]
    ys: tuple[float, ...]

    def __call__(self, x: float) -> float:
        if len(self.xs) == 1:
            return self.ys[0]
        i, w = _weight(self.xs, x)
        return _blend(self.ys[i], self.ys[i + 1], w)

    @classmethod
    def from_dict(cls, d: Any, x_key: str, path: str) -> Table1D:
        if not isinstance(d, dict) or x_key not in d or "time_s" not in d:
            raise ValidationError(path, f"must be {{{x_key}: [...], time_s: [...]}}")
        xs = _check_grid(d[x_key], f"{path}.{x_key}")
        return cls(xs, _check_values(d["time_s"], len(xs), f"{path}.time_s"))

    def to_dict(self, x_key: str) -> dict[str, Any]:
        return {x_key: list(self.xs), "time_s": list(self.ys)}


@dataclass(frozen=True)
class Table2D:
    xs: tuple[float, ...]
    ys: tuple[float, ...]
    zs: tuple[tuple[float, ...], ...]  # zs[i][j] at (xs[i], ys[j])

    def _row(self, i: int, y: float) -> float:
        row = self.zs[i]
        if len(self.ys) == 1:
            return row[0]
        j, w = _weight(self.ys, y)
        return _blend(row[j], row[j + 1], w)

    def __call__(self, x: float, y: float) -> float:
        if len(self.xs) == 1:
            return self._row(0, y)
        i, w = _weight(self.xs, x)
        return _blend(self._row(i, y), self._row(i + 1, y), w)

    @classmethod
    def from_dict(cls, d: Any, x_key: str, y_key: str, path: str) -> Table2D:
        if not isinstance(d, dict) or x_key not in d or y_key not in d or "time_s" not in d:
            raise ValidationError(path, f"must be {{{x_key}: [...], {y_key}: [...], time_s: [[...], ...]}}")
        xs = _check_grid(d[x_key], f"{path}.{x_key}")
        ys = _check_grid(d[y_key], f"{path}.{y_key}")
        rows = d["time_s"]
        if not isinstance(rows, list) or len(rows) != len(xs):
            raise ValidationError(f"{path}.time_s", f"must have {len(xs)} rows (one per {x_key})")
        zs = tuple(_check_values(r, len(ys), f"{path}.time_s[{i}]") for i, r in enumerate(rows))
        return cls(xs, ys, zs)

    def to_dict(self, x_key: str, y_key: str) -> dict[str, Any]:
        return {x_key: list(self.xs), y_key: list(self.ys), "time_s": [list(r) for r in self.zs]}


@dataclass(frozen=True)
class SkewTable:
    """Decode attention over uneven contexts: per batch size, the extra time per unit of (largest / mean
    context - 1), measured at ``context_len`` mean context (see the module docstring)."""

    num_seqs: tuple[float, ...]
    slope: tuple[float, ...]
    context_len: float
    max_over_mean: tuple[float, ...]

    def __call__(self, num_seqs: float) -> float:
        return Table1D(self.num_seqs, self.slope)(num_seqs)

    @classmethod
    def from_dict(cls, d: Any, path: str) -> SkewTable:
        keys = ("num_seqs", "slope", "context_len", "max_over_mean")
        if not isinstance(d, dict) or any(k not in d for k in keys):
            raise ValidationError(path, "must be {num_seqs: [...], slope: [...], context_len: N, max_over_mean: [...]}")
        xs = _check_grid(d["num_seqs"], f"{path}.num_seqs")
        slope = d["slope"]
        if not isinstance(slope, list) or len(slope) != len(xs) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in slope):
            raise ValidationError(f"{path}.slope", f"must be {len(xs)} finite numbers")
        ctx = d["context_len"]
        if not isinstance(ctx, (int, float)) or isinstance(ctx, bool) or ctx <= 0:
            raise ValidationError(f"{path}.context_len", f"must be a positive number, got {ctx!r}")
        ratios = d["max_over_mean"]
        if not isinstance(ratios, list) or len(ratios) != len(xs) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 1 for v in ratios):
            raise ValidationError(f"{path}.max_over_mean", f"must be {len(xs)} numbers >= 1")
        return cls(xs, tuple(float(v) for v in slope), float(ctx), tuple(float(v) for v in ratios))

    def to_dict(self) -> dict[str, Any]:
        return {"num_seqs": list(self.num_seqs), "slope": list(self.slope), "context_len": self.context_len,
                "max_over_mean": list(self.max_over_mean)}


@dataclass(frozen=True)
class DeviceProfile:
    device_name: str
    emulation: str | None
    model_name: str
    shape_hash: str
    dtype: str
    kv_cache_dtype: str
    tp: int
    dense: Table1D
    decode_attn: Table2D | None = None
    prefill_attn: Table2D | None = None
    lm_head: Table1D | None = None
    copy_bytes_per_s: float | None = None
    kv_bytes_per_token: int | None = None
    step_overhead_s: float = 0.0
    step_overhead_per_seq_s: float = 0.0
    new_seq_overhead_s: float = 0.0
    new_seq_overhead_per_token_s: float = 0.0
    idle_wake: Table1D | None = None
    num_hidden_layers: int | None = None
    decode_attn_skew: SkewTable | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def matches(self, model: ModelConfig) -> bool:
        return self.shape_hash == model_shape_hash(model)

    def idle_wake_s(self, idle_s: float) -> float:
        """Extra seconds of a step after ``idle_s`` idle seconds (0 without the table; clamped at its ends)."""
        t = self.idle_wake
        if t is None or idle_s <= 0.0:
            return 0.0
        return t(min(idle_s, t.xs[-1]))

    def to_dict(self) -> dict[str, Any]:
        tables: dict[str, Any] = {"dense_s_per_layer": self.dense.to_dict("num_tokens")}
        if self.decode_attn is not None:
            tables["decode_attn_s_per_layer"] = self.decode_attn.to_dict("num_seqs", "context_len")
        if self.prefill_attn is not None:
            tables["prefill_attn_s_per_layer"] = self.prefill_attn.to_dict("num_tokens", "context_len")
        if self.lm_head is not None:
            tables["lm_head_s"] = self.lm_head.to_dict("num_tokens")
        if self.idle_wake is not None:
            tables["idle_wake_s"] = self.idle_wake.to_dict("idle_s")
        if self.decode_attn_skew is not None:
            tables["decode_attn_skew"] = self.decode_attn_skew.to_dict()
        return {
            "format": PROFILE_FORMAT,
            "version": PROFILE_VERSION,
            "device": {"name": self.device_name, "emulation": self.emulation},
            "model": {
                "name": self.model_name,
                "shape_hash": self.shape_hash,
                "num_hidden_layers": self.num_hidden_layers,
            },
            "dtype": self.dtype,
            "kv_cache_dtype": self.kv_cache_dtype,
            "tp": self.tp,
            "tables": tables,
            "copy_bytes_per_s": self.copy_bytes_per_s,
            "kv_bytes_per_token": self.kv_bytes_per_token,
            "step_overhead_s": self.step_overhead_s,
            "step_overhead_per_seq_s": self.step_overhead_per_seq_s,
            "new_seq_overhead_s": self.new_seq_overhead_s,
            "new_seq_overhead_per_token_s": self.new_seq_overhead_per_token_s,
            "meta": dict(self.meta),
        }

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def from_dict(cls, d: Any, source: str = "profile") -> DeviceProfile:
        if not isinstance(d, dict):
            raise ValidationError(source, "top level must be a JSON object")
        if d.get("format") != PROFILE_FORMAT:
            raise ValidationError(f"{source}: format", f"must be {PROFILE_FORMAT!r}, got {d.get('format')!r}")
        if d.get("version") != PROFILE_VERSION:
            raise ValidationError(
                f"{source}: version", f"unsupported {d.get('version')!r}; this reads {PROFILE_VERSION}"
            )
        for key in ("device", "model", "tables"):
            if not isinstance(d.get(key), dict):
                raise ValidationError(f"{source}: {key}", "required mapping")
        dev, model, tables = d["device"], d["model"], d["tables"]
        for key, obj in (("device.name", dev.get("name")), ("model.shape_hash", model.get("shape_hash"))):
            if not isinstance(obj, str) or not obj:
                raise ValidationError(f"{source}: {key}", "required string")
        if "dense_s_per_layer" not in tables:
            raise ValidationError(f"{source}: tables.dense_s_per_layer", "required")
        p = f"{source}: tables"
        tp = d.get("tp", 1)
        if not isinstance(tp, int) or tp < 1:
            raise ValidationError(f"{source}: tp", f"must be a positive integer, got {tp!r}")
        for key in _NON_NEGATIVE:
            v = d.get(key)
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0):
                raise ValidationError(f"{source}: {key}", f"must be a non-negative number, got {v!r}")
        return cls(
            device_name=dev["name"],
            emulation=dev.get("emulation"),
            model_name=str(model.get("name", "")),
            shape_hash=model["shape_hash"],
            dtype=str(d.get("dtype", "bfloat16")),
            kv_cache_dtype=str(d.get("kv_cache_dtype", d.get("dtype", "bfloat16"))),
            tp=tp,
            dense=Table1D.from_dict(tables["dense_s_per_layer"], "num_tokens", f"{p}.dense_s_per_layer"),
            decode_attn=(
                Table2D.from_dict(
                    tables["decode_attn_s_per_layer"], "num_seqs", "context_len", f"{p}.decode_attn_s_per_layer"
                )
                if "decode_attn_s_per_layer" in tables
                else None
            ),
            prefill_attn=(
                Table2D.from_dict(
                    tables["prefill_attn_s_per_layer"], "num_tokens", "context_len", f"{p}.prefill_attn_s_per_layer"
                )
                if "prefill_attn_s_per_layer" in tables
                else None
            ),
            lm_head=(
                Table1D.from_dict(tables["lm_head_s"], "num_tokens", f"{p}.lm_head_s")
                if "lm_head_s" in tables
                else None
            ),
            copy_bytes_per_s=d.get("copy_bytes_per_s"),
            kv_bytes_per_token=d.get("kv_bytes_per_token"),
            step_overhead_s=float(d.get("step_overhead_s") or 0.0),
            step_overhead_per_seq_s=float(d.get("step_overhead_per_seq_s") or 0.0),
            new_seq_overhead_s=float(d.get("new_seq_overhead_s") or 0.0),
            new_seq_overhead_per_token_s=float(d.get("new_seq_overhead_per_token_s") or 0.0),
            idle_wake=(
                Table1D.from_dict(tables["idle_wake_s"], "idle_s", f"{p}.idle_wake_s")
                if "idle_wake_s" in tables
                else None
            ),
            num_hidden_layers=model.get("num_hidden_layers"),
            decode_attn_skew=(SkewTable.from_dict(tables["decode_attn_skew"], f"{p}.decode_attn_skew")
                              if "decode_attn_skew" in tables else None),
            meta=dict(d.get("meta") or {}),
        )


def load_profile(path: str | Path) -> DeviceProfile:
    p = Path(path)
    if not p.is_file():
        raise ValidationError("profile", f"no such file: {p}")
    try:
        obj = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValidationError("profile", f"{p.name}: not valid JSON: {e}") from None
    return DeviceProfile.from_dict(obj, source=p.name)
