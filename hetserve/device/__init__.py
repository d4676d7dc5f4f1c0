"""Emulated devices on one physical GPU: disjoint SM partitions (driver green contexts) and MPS clients."""

from __future__ import annotations

from hetserve.device.emulation import (
    EmulationError,
    GreenContext,
    Partition,
    catalog_name_for,
    create_green_contexts,
    graph_replay_check,
    kv_blocks_for_memory_cap,
    parse_partition,
    physical_device_info,
)
from hetserve.device.mps import MpsDaemon

__all__ = [
    "EmulationError",
    "GreenContext",
    "MpsDaemon",
    "Partition",
    "catalog_name_for",
    "create_green_contexts",
    "graph_replay_check",
    "kv_blocks_for_memory_cap",
    "parse_partition",
    "physical_device_info",
]
