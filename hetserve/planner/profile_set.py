"""Which measured profiles a plan or simulation uses: ``--profiles`` items and a config's ``profiles`` key.

An item is a profile JSON, a directory of them, or ``DEVICE=PATH``: the profile measured on one device type
standing in for another (an MPS 75% client costed from the 100-SM green-context profile, say); the copy is
relabelled and says what it stands in for in its ``meta``. Profiles are keyed by the cluster's device type
name; the cost model uses a profile only for the model shape and dtype it was measured with, so the others are
set aside with the reason.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path

from hetserve.core.devices import canonical_dtype
from hetserve.core.errors import ValidationError
from hetserve.core.model_config import ModelConfig
from hetserve.planner.profile import DeviceProfile, load_profile


def _is_profile(p: Path) -> bool:
    try:
        return json.loads(p.read_text()).get("format") == "hetserve-profile"
    except (OSError, ValueError, AttributeError):
        return False


def load_profile_set(items: Iterable[str], field: str = "--profiles",
                     base: Path | None = None) -> dict[str, tuple[DeviceProfile, str]]:
    """device type name -> (profile, source path)."""
    out: dict[str, tuple[DeviceProfile, str]] = {}
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        alias, path_s = (item.split("=", 1) if "=" in item else (None, item))
        path = Path(path_s)
        if base is not None and not path.is_absolute():
            path = base / path
        if path.is_dir():
            if alias is not None:
                raise ValidationError(field, f"{item!r}: DEVICE=PATH takes one profile file, not a directory")
            for f in sorted(path.glob("*.json")):
                if _is_profile(f):
                    p = load_profile(f)
                    out.setdefault(p.device_name, (p, str(f)))
            continue
        if not path.is_file():
            raise ValidationError(field, f"no such profile file or directory: {path}")
        try:
            p = load_profile(path)
        except ValidationError as e:
            raise ValidationError(field, f"{path}: {e.message}") from None
        if alias is not None and alias != p.device_name:
            meta = dict(p.meta)
            meta["stands_in_for"] = f"measured on {p.device_name}, used for {alias}"
            p = dataclasses.replace(p, device_name=alias, meta=meta)
        out[alias or p.device_name] = (p, str(path))
    return out


def usable_profiles(profiles: dict[str, tuple[DeviceProfile, str]], model: ModelConfig,
                    dtype: str) -> tuple[dict[str, DeviceProfile], list[str]]:
    """(profiles that fit ``model`` and ``dtype`` by device type, reasons for the ones set aside)."""
    keep: dict[str, DeviceProfile] = {}
    skipped: list[str] = []
    for name, (p, src) in profiles.items():
        if not p.matches(model):
            skipped.append(f"{src}: measured for model {p.model_name}, a different shape")
        elif canonical_dtype(p.dtype) != canonical_dtype(dtype):
            skipped.append(f"{src}: measured in {p.dtype}, the plan runs {dtype}")
        else:
            keep[name] = p
    return keep, skipped
