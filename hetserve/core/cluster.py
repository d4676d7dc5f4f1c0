"""The cluster file: devices on nodes, the links between them, and how they are emulated.

The planner, the simulator and ``serve --cluster`` read the same file (YAML or JSON)::

    name: mixed-16
    nodes:
      - name: n0
        devices: [{type: H100-SXM, count: 2}, {type: A10, count: 4}]
        intra_link: nvlink4          # default: the slowest host_link of the node's devices
      - name: n1
        devices: [{type: L4, count: 2, memory_cap_gb: 20}]
    inter_node_link: eth100          # default eth25
    links:                           # optional overrides, by node name or device id
      - {between: [n0, n1], link: roce100}
    emulation: null
    placement: local                 # runtime workers: local | tcp | ray (Ray node per cluster node)

A device entry's ``type`` is a catalog name (``hetserve.core.devices.CATALOG``), a partition name declared
under ``emulation``, ``cpu`` (``cores``, ``memory_gb``) or ``custom`` (``name``, ``memory_gb``,
``tflops_bf16``, ``hbm_gbps`` and optionally ``tflops_fp16|fp8|fp32``, ``num_sms``, ``vendor``,
``price_per_hour``, ``host_link``, ``kv_layout``, ``kv_block_size``; or ``spec:`` with every DeviceSpec field).
Units: ``*_gb`` are GiB (2**30 bytes), ``hbm_gbps`` and ``bandwidth_gb_per_s`` are gigabytes (1e9) per second,
``bandwidth_gbit_per_s`` gigabits per second. A link is a name from ``LINKS`` or ``{name, kind,
bandwidth_gb_per_s | bandwidth_gbit_per_s | bandwidth_bytes_per_s, latency_us | latency_s}``.

Emulation (several devices carved out of one physical one, GPU.md)::

    emulation:
      kind: green_context            # green_context | mps | paced_cpu
      of: H100-SXM                   # the physical device: a type name or a device entry
      partitions:
        - {name: H100-100SM, num_sms: 100, memory_gb: 48}   # mps: thread_percentage; paced_cpu: speed
        - {name: H100-32SM, num_sms: 32, memory_gb: 24}

Device ids are ``<node>:<index within node>``. Errors raise ValidationError with a key path such as
``nodes[1].devices[0].type``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hetserve.core.cluster_fields import (
    CUSTOM_KEYS,
    ENTRY_KEYS,
    check_keys,
    join_path,
    number,
    parse_custom_device,
    parse_link,
)
from hetserve.core.devices import (
    CATALOG,
    LINKS,
    LOCAL_LINK,
    DeviceSpec,
    GiB,
    LinkSpec,
    cpu_host_spec,
    get_device,
)
from hetserve.core.errors import ValidationError

EMULATION_KINDS = ("green_context", "mps", "paced_cpu")
_PARTITION_AMOUNT = {"green_context": "num_sms", "mps": "thread_percentage", "paced_cpu": "speed"}
DEFAULT_INTER_NODE_LINK = "eth25"
PLACEMENTS = ("local", "tcp", "ray")  # local: socket pairs; tcp: local workers dialling in; ray: Ray actors


@dataclass(frozen=True)
class ClusterDevice:
    id: str  # "<node>:<index>"
    spec: DeviceSpec
    node: str
    emulation: str | None = None  # e.g. "green_context: 32 of 132 SMs of H100-SXM"; None = a real device
    memory_cap_bytes: int | None = None

    @property
    def memory_bytes(self) -> int:
        """Memory the engine may plan with: the device's, or the cap when one is set."""
        if self.memory_cap_bytes is None:
            return self.spec.memory_bytes
        return min(self.spec.memory_bytes, self.memory_cap_bytes)


@dataclass(frozen=True)
class NodeSpec:
    name: str
    device_ids: tuple[str, ...]
    intra_link: LinkSpec


@dataclass(frozen=True)
class LinkOverride:
    a: str  # node name or device id
    b: str
    link: LinkSpec


@dataclass(frozen=True)
class PartitionSpec:
    name: str
    amount: float  # num_sms (green_context), thread_percentage (mps) or speed (paced_cpu)
    memory_bytes: int | None
    spec: DeviceSpec
    # partitions of one GPU share its HBM and L2: how much slower this one's memory-bound (decode) and
    # compute-bound (prefill) steps run while another partition is busy (1: not modelled). Measured, not derived
    shared_slowdown_memory: float = 1.0
    shared_slowdown_compute: float = 1.0


@dataclass(frozen=True)
class EmulationSpec:
    kind: str  # one of EMULATION_KINDS
    of: DeviceSpec
    partitions: tuple[PartitionSpec, ...]


@dataclass(frozen=True)
class ClusterConfig:
    name: str
    devices: tuple[ClusterDevice, ...]
    nodes: tuple[NodeSpec, ...]
    inter_node_link: LinkSpec
    links: tuple[LinkOverride, ...] = ()
    emulation: EmulationSpec | None = None
    placement: str = "local"  # where the runtime starts workers: one of PLACEMENTS (runtime/connect.py)
    _by_id: dict[str, ClusterDevice] = field(default_factory=dict, init=False, compare=False, repr=False, hash=False)
    _node_by_name: dict[str, NodeSpec] = field(default_factory=dict, init=False, compare=False, repr=False, hash=False)

    _link_cache: dict[tuple[str, str], LinkSpec] = field(
        default_factory=dict, init=False, compare=False, repr=False, hash=False
    )

    def __post_init__(self) -> None:
        self._by_id.update({d.id: d for d in self.devices})
        self._node_by_name.update({n.name: n for n in self.nodes})

    @property
    def device_ids(self) -> list[str]:
        return [d.id for d in self.devices]

    def device(self, device_id: str) -> ClusterDevice:
        try:
            return self._by_id[device_id]
        except KeyError:
            raise ValidationError("device", f"no device {device_id!r}; devices: {', '.join(self._by_id)}") from None

    def devices_on(self, node: str) -> list[ClusterDevice]:
        return [d for d in self.devices if d.node == node]

    @property
    def price_per_hour(self) -> float:
        return sum(d.spec.price_per_hour for d in self.devices)

    def link_between(self, dev_a: ClusterDevice | str, dev_b: ClusterDevice | str) -> LinkSpec:
        """The link a transfer from ``dev_a`` to ``dev_b`` uses.

        Precedence: the same device (LOCAL_LINK, free); a ``links`` entry naming both devices; one naming
        a device and the other's node; one naming both nodes; the node's ``intra_link``; ``inter_node_link``
        (taken as the bottleneck of a cross-node path).
        """
        ia = dev_a if isinstance(dev_a, str) else dev_a.id
        ib = dev_b if isinstance(dev_b, str) else dev_b.id
        link = self._link_cache.get((ia, ib))
        if link is None:
            link = self._resolve_link(self.device(ia), self.device(ib))
            self._link_cache[(ia, ib)] = link
        return link

    def _resolve_link(self, a: ClusterDevice, b: ClusterDevice) -> LinkSpec:
        if a.id == b.id:
            return LOCAL_LINK
        for pair in ({a.id, b.id}, {a.id, b.node}, {a.node, b.id}, {a.node, b.node}):
            for ov in self.links:
                if {ov.a, ov.b} == pair:
                    return ov.link
        if a.node == b.node:
            return self._node_by_name[a.node].intra_link
        return self.inter_node_link

    def to_dict(self) -> dict[str, Any]:
        """The file form; ``load_cluster(c.to_dict()) == c``."""
        partitions = {p.name: p for p in self.emulation.partitions} if self.emulation else {}
        nodes = []
        for n in self.nodes:
            entries: list[dict[str, Any]] = []
            for did in n.device_ids:
                e = _device_entry(self._by_id[did], partitions)
                if entries and {k: v for k, v in entries[-1].items() if k != "count"} == e:
                    entries[-1]["count"] = entries[-1].get("count", 1) + 1
                else:
                    entries.append(e)
            nodes.append({"name": n.name, "devices": entries, "intra_link": _link_obj(n.intra_link)})
        out: dict[str, Any] = {
            "name": self.name,
            "nodes": nodes,
            "inter_node_link": _link_obj(self.inter_node_link),
            "links": [{"between": [ov.a, ov.b], "link": _link_obj(ov.link)} for ov in self.links],
            "emulation": None,
        }
        if self.emulation is not None:
            amount_key = _PARTITION_AMOUNT[self.emulation.kind]
            out["emulation"] = {
                "kind": self.emulation.kind,
                "of": _spec_obj(self.emulation.of),
                "partitions": [
                    {"name": p.name, amount_key: p.amount}
                    | ({"memory_bytes": p.memory_bytes} if p.memory_bytes is not None else {})
                    | ({"shared_slowdown": {"memory": p.shared_slowdown_memory,
                                            "compute": p.shared_slowdown_compute}}
                       if (p.shared_slowdown_memory, p.shared_slowdown_compute) != (1.0, 1.0) else {})
                    for p in self.emulation.partitions
                ],
            }
        if self.placement != "local":
            out["placement"] = self.placement
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def _spec_obj(spec: DeviceSpec) -> str | dict[str, Any]:
    if CATALOG.get(spec.name) == spec:
        return spec.name
    return {"type": "custom", "spec": spec.to_dict()}


def _device_entry(dev: ClusterDevice, partitions: dict[str, PartitionSpec]) -> dict[str, Any]:
    part = partitions.get(dev.spec.name)
    if part is not None and part.spec == dev.spec:
        e: dict[str, Any] = {"type": part.name}
        default_cap = part.memory_bytes
    else:
        obj = _spec_obj(dev.spec)
        e = {"type": obj} if isinstance(obj, str) else dict(obj)
        default_cap = None
    if dev.memory_cap_bytes != default_cap:
        e["memory_cap_bytes"] = dev.memory_cap_bytes
    return e


def _link_obj(link: LinkSpec) -> str | dict[str, Any]:
    if LINKS.get(link.name) == link:
        return link.name
    return {
        "name": link.name,
        "kind": link.kind,
        "bandwidth_bytes_per_s": link.bandwidth_bytes_per_s,
        "latency_s": link.latency_s,
        "notes": link.notes,
    }


# ---------------------------------------------------------------- parsing


def _parse_spec(d: dict[str, Any], path: str, partitions: dict[str, PartitionSpec]) -> DeviceSpec:
    t = d["type"]
    if t == "custom":
        check_keys(d, path, CUSTOM_KEYS + ENTRY_KEYS)
        return parse_custom_device(d, path)
    if t == "cpu":
        check_keys(d, path, ("type", "cores", "memory_gb", "name") + ENTRY_KEYS, ("cores", "memory_gb"))
        cores = number(d, "cores", path, integer=True)
        mem = int(number(d, "memory_gb", path) * GiB)
        return cpu_host_spec(cores, mem, name=str(d.get("name", f"cpu-{cores}c")))
    check_keys(d, path, ("type",) + ENTRY_KEYS)
    if not isinstance(t, str):
        raise ValidationError(join_path(path, "type"), f"must be a string, got {t!r}")
    if t in partitions:
        return partitions[t].spec
    try:
        return get_device(t)
    except ValidationError:
        known = list(partitions) + list(CATALOG) + ["cpu", "custom"]
        raise ValidationError(join_path(path, "type"), f"unknown device type {t!r}; known: {', '.join(known)}") from None


def _parse_slowdown(obj: Any, path: str) -> tuple[float, float]:
    """``shared_slowdown: {memory: x, compute: y}`` (each >= 1; a missing one is 1)."""
    if obj is None:
        return 1.0, 1.0
    d = check_keys(obj, path, ("memory", "compute"), ())
    out = []
    for k in ("memory", "compute"):
        v = number(d, k, path) if k in d else 1.0
        if v < 1:
            raise ValidationError(join_path(path, k), f"is a slowdown factor, must be >= 1, got {v}")
        out.append(float(v))
    return out[0], out[1]


def _parse_emulation(obj: Any, path: str) -> EmulationSpec | None:
    if obj is None:
        return None
    d = check_keys(obj, path, ("kind", "of", "partitions"), ("kind", "of", "partitions"))
    kind = d["kind"]
    if kind not in EMULATION_KINDS:
        raise ValidationError(join_path(path, "kind"), f"{kind!r} is not one of {', '.join(EMULATION_KINDS)}")
    of_obj = d["of"]
    of = _parse_spec({"type": of_obj} if isinstance(of_obj, str) else of_obj, join_path(path, "of"), {})
    amount_key = _PARTITION_AMOUNT[kind]
    parts_obj = d["partitions"]
    if not isinstance(parts_obj, list) or not parts_obj:
        raise ValidationError(join_path(path, "partitions"), "must be a non-empty list")
    parts: list[PartitionSpec] = []
    total_sms = 0
    for i, p in enumerate(parts_obj):
        pp = f"{path}.partitions[{i}]"
        pd = check_keys(p, pp, ("name", amount_key, "memory_gb", "memory_bytes", "shared_slowdown"),
                         ("name", amount_key))
        slow = _parse_slowdown(pd.get("shared_slowdown"), join_path(pp, "shared_slowdown"))
        name = str(pd["name"])
        if name in CATALOG or name in (q.name for q in parts):
            raise ValidationError(join_path(pp, "name"), f"{name!r} is already a device type; pick a new name")
        mem: int | None = None
        if "memory_gb" in pd:
            mem = int(number(pd, "memory_gb", pp) * GiB)
        elif "memory_bytes" in pd:
            mem = number(pd, "memory_bytes", pp, integer=True)
        if mem is not None and mem > of.memory_bytes:
            raise ValidationError(join_path(pp, "memory_gb"), f"exceeds {of.name}'s {of.memory_bytes / GiB:g} GiB")
        if kind == "green_context":
            n = number(pd, amount_key, pp, integer=True)
            if n > of.num_sms:
                raise ValidationError(join_path(pp, amount_key), f"{n} > {of.name}'s {of.num_sms} SMs")
            total_sms += n
            desc = f"green_context: {n} of {of.num_sms} SMs of {of.name}"
            spec = of.scaled(n / of.num_sms, mem, name=name, emulated_by=desc)
            amount: float = n
        elif kind == "mps":
            amount = number(pd, amount_key, pp)
            if amount > 100:
                raise ValidationError(join_path(pp, amount_key), f"must be in (0, 100], got {amount}")
            desc = f"mps: {amount:g}% of {of.name}'s threads"
            spec = of.scaled(amount / 100, mem, name=name, emulated_by=desc)
        else:
            amount = number(pd, amount_key, pp)
            if amount > 1:
                raise ValidationError(join_path(pp, amount_key), f"must be in (0, 1], got {amount}")
            desc = f"paced_cpu: {of.name} paced to {amount:g}x"
            spec = of.paced(amount, name=name, emulated_by=desc)
            if mem is not None:
                spec = dataclasses.replace(spec, memory_bytes=mem)
        parts.append(PartitionSpec(name, amount, mem, spec, *slow))
    if kind == "green_context" and total_sms > of.num_sms:
        raise ValidationError(
            join_path(path, "partitions"), f"green contexts are disjoint: {total_sms} SMs > {of.name}'s {of.num_sms}"
        )
    return EmulationSpec(kind, of, tuple(parts))


def _check_partition_use(emu: EmulationSpec, devices: list[ClusterDevice]) -> None:
    """Partitions of one physical GPU: disjoint SMs (green contexts) and memory must add up within it."""
    parts = {p.name: p for p in emu.partitions}
    used = [parts[d.spec.name] for d in devices if d.spec.name in parts and d.emulation is not None]
    mem = sum(d.memory_bytes for d in devices if d.spec.name in parts and d.emulation is not None)
    if mem > emu.of.memory_bytes:
        raise ValidationError(
            "emulation.partitions",
            f"devices on partitions use {mem / GiB:g} GiB > {emu.of.name}'s "
            f"{emu.of.memory_bytes / GiB:g} GiB; set memory_gb per partition",
        )
    if emu.kind == "green_context":
        sms = sum(p.amount for p in used)
        if sms > emu.of.num_sms:
            raise ValidationError(
                "emulation.partitions", f"green contexts are disjoint: devices use {sms:g} SMs > {emu.of.num_sms}"
            )


def parse_cluster(obj: Any) -> ClusterConfig:
    d = check_keys(obj, "", ("name", "nodes", "inter_node_link", "links", "emulation", "placement"), ("nodes",))
    placement = str(d.get("placement") or "local")
    if placement not in PLACEMENTS:
        raise ValidationError("placement", f"unknown placement {placement!r}; known: {', '.join(PLACEMENTS)}")
    emulation = _parse_emulation(d.get("emulation"), "emulation")
    partitions = {p.name: p for p in emulation.partitions} if emulation else {}
    nodes_obj = d["nodes"]
    if not isinstance(nodes_obj, list) or not nodes_obj:
        raise ValidationError("nodes", "must be a non-empty list of {name, devices, intra_link}")
    devices: list[ClusterDevice] = []
    nodes: list[NodeSpec] = []
    for ni, nobj in enumerate(nodes_obj):
        npath = f"nodes[{ni}]"
        nd = check_keys(nobj, npath, ("name", "devices", "intra_link"), ("name", "devices"))
        nname = str(nd["name"])
        if ":" in nname or not nname:
            raise ValidationError(
                join_path(npath, "name"), f"must be non-empty without ':' (ids are node:index), got {nname!r}"
            )
        if any(n.name == nname for n in nodes):
            raise ValidationError(join_path(npath, "name"), f"duplicate node name {nname!r}")
        if not isinstance(nd["devices"], list) or not nd["devices"]:
            raise ValidationError(join_path(npath, "devices"), "must be a non-empty list of {type, count}")
        ids: list[str] = []
        host_links: list[LinkSpec] = []
        for di, dobj in enumerate(nd["devices"]):
            dpath = f"{npath}.devices[{di}]"
            dd = check_keys(dobj, dpath, CUSTOM_KEYS + ENTRY_KEYS + ("cores",), ("type",))
            spec = _parse_spec(dd, dpath, partitions)
            count = number(dd, "count", dpath, integer=True) if "count" in dd else 1
            cap: int | None = None
            if "memory_cap_gb" in dd:
                cap = int(number(dd, "memory_cap_gb", dpath) * GiB)
            elif "memory_cap_bytes" in dd:
                cap = None if dd["memory_cap_bytes"] is None else number(dd, "memory_cap_bytes", dpath, integer=True)
            part = partitions.get(dd["type"]) if isinstance(dd["type"], str) else None
            emu = part.spec.emulated_by if part is not None else None
            if part is not None and cap is None and "memory_cap_bytes" not in dd:
                cap = part.memory_bytes
            if cap is not None and cap > spec.memory_bytes:
                raise ValidationError(
                    join_path(dpath, "memory_cap_gb"), f"exceeds {spec.name}'s {spec.memory_bytes / GiB:g} GiB"
                )
            host_links.append(parse_link(spec.host_link, join_path(dpath, "host_link")))
            for _ in range(count):
                did = f"{nname}:{len(ids)}"
                ids.append(did)
                devices.append(ClusterDevice(did, spec, nname, emu, cap))
        if nd.get("intra_link") is not None:
            intra = parse_link(nd["intra_link"], join_path(npath, "intra_link"))
        else:
            intra = min(host_links, key=lambda lk: lk.bandwidth_bytes_per_s)
        nodes.append(NodeSpec(nname, tuple(ids), intra))
    if emulation is not None and emulation.kind in ("green_context", "mps"):
        _check_partition_use(emulation, devices)
    inter = parse_link(d.get("inter_node_link") or DEFAULT_INTER_NODE_LINK, "inter_node_link")
    names = {n.name for n in nodes} | {dv.id for dv in devices}
    overrides: list[LinkOverride] = []
    links_obj = d.get("links") or []
    if not isinstance(links_obj, list):
        raise ValidationError("links", "must be a list of {between: [a, b], link}")
    for li, lobj in enumerate(links_obj):
        lpath = f"links[{li}]"
        ld = check_keys(lobj, lpath, ("between", "link"), ("between", "link"))
        between = ld["between"]
        if not isinstance(between, list) or len(between) != 2:
            raise ValidationError(join_path(lpath, "between"), "must be a list of two node names or device ids")
        for x in between:
            if x not in names:
                raise ValidationError(
                    join_path(lpath, "between"), f"{x!r} is not a node or device; known: {', '.join(sorted(names))}"
                )
        overrides.append(LinkOverride(str(between[0]), str(between[1]), parse_link(ld["link"], join_path(lpath, "link"))))
    return ClusterConfig(
        name=str(d.get("name") or "cluster"),
        devices=tuple(devices),
        nodes=tuple(nodes),
        inter_node_link=inter,
        links=tuple(overrides),
        emulation=emulation,
        placement=placement,
    )


def load_cluster(path_or_dict: str | Path | dict[str, Any]) -> ClusterConfig:
    """Read a cluster from a dict, a JSON file or a YAML file (YAML needs pyyaml)."""
    if isinstance(path_or_dict, dict):
        return parse_cluster(path_or_dict)
    p = Path(path_or_dict)
    if not p.is_file():
        raise ValidationError("cluster", f"no such file: {p}")
    text = p.read_text()
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValidationError(
                "cluster", f"{p.name}: reading YAML needs pyyaml (pip install pyyaml); or use JSON"
            ) from None
        try:
            obj = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValidationError("cluster", f"{p.name}: not valid YAML: {e}") from None
    else:
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValidationError("cluster", f"{p.name}: not valid JSON: {e}") from None
    return parse_cluster(obj)
