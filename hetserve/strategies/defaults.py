"""The instances a strategy gets on a cluster when the user names none (``serve --cluster``, ``LLM(cluster=)``)."""

from __future__ import annotations

from typing import Any


def default_instances(strategy: str, device_ids: list[str]) -> list[dict[str, Any]]:
    """DP: one instance per device. PD: the first device prefills, the others decode. Cronus: the first device
    is the main, the others heads. PP: one pipeline over every device, layers split by the cost model. Hetis: the
    first device is the main, the others its attention workers. (Order devices high-end first.)"""
    first, rest = device_ids[0], device_ids[1:]
    if strategy == "pd":
        return [{"name": "prefill0", "role": "prefill", "devices": [first]}] + [
            {"name": f"decode{i}", "role": "decode", "devices": [d]} for i, d in enumerate(rest)]
    if strategy == "cronus":
        return [{"name": "main0", "role": "main", "devices": [first]}] + [
            {"name": f"head{i}", "role": "head", "devices": [d]} for i, d in enumerate(rest)]
    if strategy == "pp":
        return [{"name": "pp0", "devices": list(device_ids), "layers": "auto"}]
    if strategy == "hetis":
        return [{"name": "main0", "role": "main", "devices": [first], "workers": [{"device": d} for d in rest]}]
    return [{"name": f"i{i}", "devices": [d]} for i, d in enumerate(device_ids)]
