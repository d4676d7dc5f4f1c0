"""Checks the runtime tests share: no KV block or hand-off left behind, and whether a worker process lives."""

from __future__ import annotations

import os
from typing import Any


def assert_no_leaks(engine: Any) -> None:
    """Every healthy instance has all its blocks free again, nothing pinned or receiving, no request and no
    step left in flight (call it once every request has finished)."""
    for name, (free, usable) in engine.free_blocks().items():
        assert free == usable, f"{name} leaks {usable - free} blocks"
    for name, inst in engine.instances.items():
        if inst.alive:
            s = inst.scheduler
            assert not s.pinned and not s.receiving and not s.requests, f"{name} still holds requests"
            assert not inst.in_flight, f"{name} still has a step in flight"


def process_alive(pid: int | None) -> bool:
    """A live process (a zombie counts as gone)."""
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False
