from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from hetserve.core.cluster import load_cluster
from hetserve.core.devices import LOCAL_LINK, GiB, get_device, get_link
from hetserve.core.errors import ValidationError

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "examples" / "clusters").glob("*.yaml"))

BASE: dict[str, Any] = {
    "name": "t",
    "nodes": [
        {"name": "n0", "devices": [{"type": "H100-SXM", "count": 2}, {"type": "A10"}], "intra_link": "nvlink4"},
        {"name": "n1", "devices": [{"type": "L4", "count": 2, "memory_cap_gb": 20}]},
    ],
    "inter_node_link": "eth100",
}


def test_examples_load_and_round_trip(tmp_path: Path) -> None:
    assert {p.name for p in EXAMPLES} >= {"mixed-16.yaml", "h100-a10.yaml", "emulated-h100-pair.yaml", "cpu-pair.yaml"}
    for p in EXAMPLES:
        c = load_cluster(p)
        assert load_cluster(c.to_dict()) == c
        f = tmp_path / (p.stem + ".json")
        c.save(f)
        assert load_cluster(f) == c
        assert len(set(c.device_ids)) == len(c.devices)
    mixed = load_cluster(ROOT / "examples/clusters/mixed-16.yaml")
    assert len(mixed.devices) == 16
    assert sum(d.spec.name == "H100-SXM" for d in mixed.devices) == 2


def test_emulated_examples_declare_emulation() -> None:
    pair = load_cluster(ROOT / "examples/clusters/emulated-h100-pair.yaml")
    assert pair.emulation is not None and pair.emulation.kind == "green_context"
    big, small = pair.devices
    assert (big.spec.num_sms, small.spec.num_sms) == (100, 32)
    assert big.emulation and small.emulation and "32 of 132" in small.emulation
    assert small.memory_bytes == 24 * GiB
    h = get_device("H100-SXM")
    assert small.spec.flops("bfloat16") == pytest.approx(h.flops("bfloat16") * 32 / 132)
    cpu = load_cluster(ROOT / "examples/clusters/cpu-pair.yaml")
    assert cpu.emulation is not None and cpu.emulation.kind == "paced_cpu"
    full, half = cpu.devices
    assert half.spec.flops("float32") == pytest.approx(full.spec.flops("float32") / 2)
    assert cpu.link_between(full, half).kind == "shm"


def test_ids_caps_and_link_precedence() -> None:
    d = copy.deepcopy(BASE)
    d["links"] = [{"between": ["n0:2", "n1:0"], "link": "pcie5x16"}, {"between": ["n0", "n1"], "link": "roce100"}]
    c = load_cluster(d)
    assert c.device_ids == ["n0:0", "n0:1", "n0:2", "n1:0", "n1:1"]
    assert c.device("n1:0").memory_bytes == 20 * GiB
    assert c.device("n0:0").memory_bytes == 80 * GiB
    assert c.link_between("n0:0", "n0:0") is LOCAL_LINK
    assert c.link_between("n0:0", "n0:1").name == "nvlink4"  # node intra_link
    assert c.link_between("n1:0", "n1:1").name == "pcie4x16"  # default: the L4's host link
    assert c.link_between("n0:2", "n1:0").name == "pcie5x16"  # device pair beats node pair
    assert c.link_between("n1:0", "n0:2").name == "pcie5x16"
    assert c.link_between("n0:0", "n1:1").name == "roce100"  # node pair beats inter_node_link
    del d["links"]
    assert load_cluster(d).link_between("n0:0", "n1:1").name == "eth100"
    del d["inter_node_link"]
    assert load_cluster(d).link_between("n0:0", "n1:1").name == "eth25"


def test_default_intra_link_is_slowest_host_link() -> None:
    c = load_cluster({"nodes": [{"name": "a", "devices": [{"type": "H100-SXM"}, {"type": "A10"}]}]})
    assert c.link_between("a:0", "a:1") == get_link("pcie4x16")


def test_custom_and_cpu_devices() -> None:
    c = load_cluster(
        {
            "nodes": [
                {
                    "name": "n",
                    "devices": [
                        {
                            "type": "custom",
                            "name": "X1",
                            "memory_gb": 10,
                            "tflops_bf16": 50,
                            "hbm_gbps": 500,
                            "count": 2,
                        },
                        {"type": "cpu", "cores": 8, "memory_gb": 32},
                    ],
                }
            ],
            "links": [
                {
                    "between": ["n:0", "n:1"],
                    "link": {"name": "slow", "kind": "ethernet", "bandwidth_gbit_per_s": 8, "latency_us": 100},
                }
            ],
        }
    )
    x = c.devices[0].spec
    assert (x.name, x.memory_bytes, x.flops("bfloat16"), x.hbm_bytes_per_s) == ("X1", 10 * GiB, 50e12, 500e9)
    assert c.devices[2].spec.vendor == "cpu" and c.devices[2].spec.num_sms == 8
    lk = c.link_between("n:1", "n:0")
    assert lk.bandwidth_bytes_per_s == pytest.approx(1e9) and lk.latency_s == pytest.approx(1e-4)
    assert load_cluster(c.to_dict()) == c


def _set(d: dict[str, Any], path: list[Any], value: Any) -> None:
    for k in path[:-1]:
        d = d[k]
    d[path[-1]] = value


CASES = [
    (["nodes", 1, "devices", 0, "type"], "B300", "nodes[1].devices[0].type"),
    (["nodes", 0, "devices", 0, "count"], 0, "nodes[0].devices[0].count"),
    (["nodes", 0, "devices", 1, "count"], "two", "nodes[0].devices[1].count"),
    (["nodes", 1, "devices", 0, "memory_cap_gb"], 30, "nodes[1].devices[0].memory_cap_gb"),
    (["nodes", 0, "intra_link"], "nvlink7", "nodes[0].intra_link"),
    (["nodes", 1, "name"], "n0", "nodes[1].name"),
    (["nodes", 1, "name"], "n0:1", "nodes[1].name"),
    (["nodes", 0, "devices", 0, "colour"], "red", "nodes[0].devices[0].colour"),
    (["inter_node_link"], "eth9000", "inter_node_link"),
    (["nodez"], [], "nodez"),
    (["nodes"], [], "nodes"),
    (["links"], [{"between": ["n0", "n7"], "link": "eth25"}], "links[0].between"),
    (
        ["links"],
        [{"between": ["n0", "n1"], "link": {"name": "x", "kind": "ethernet", "bandwidth_gbps": 3}}],
        "links[0].link.bandwidth_gbps",
    ),
    (
        ["nodes", 1, "devices", 0],
        {"type": "custom", "name": "Z", "memory_gb": 8, "hbm_gbps": 100},
        "nodes[1].devices[0].tflops_bf16",
    ),
    (
        ["nodes", 1, "devices", 0],
        {"type": "custom", "name": "Z", "memory_gb": 8, "hbm_gbps": 100, "tflops_bf16": 1, "kv_layout": "XYZ"},
        "nodes[1].devices[0].kv_layout",
    ),
    (["emulation"], {"kind": "magic", "of": "H100-SXM", "partitions": [{"name": "p", "num_sms": 8}]}, "emulation.kind"),
    (
        ["emulation"],
        {"kind": "green_context", "of": "H100-SXM", "partitions": [{"name": "p", "num_sms": 140}]},
        "emulation.partitions[0].num_sms",
    ),
    (
        ["emulation"],
        {
            "kind": "green_context",
            "of": "H100-SXM",
            "partitions": [{"name": "p", "num_sms": 100}, {"name": "q", "num_sms": 64}],
        },
        "emulation.partitions",
    ),
    (
        ["emulation"],
        {"kind": "mps", "of": "H100-SXM", "partitions": [{"name": "p", "num_sms": 30}]},
        "emulation.partitions[0].num_sms",
    ),
    (
        ["emulation"],
        {
            "kind": "paced_cpu",
            "of": {"type": "cpu", "cores": 2, "memory_gb": 4},
            "partitions": [{"name": "p", "speed": 2}],
        },
        "emulation.partitions[0].speed",
    ),
]


@pytest.mark.parametrize(("path", "value", "field"), CASES, ids=[c[2] for c in CASES])
def test_validation_errors_name_the_key_path(path: list[Any], value: Any, field: str) -> None:
    d = copy.deepcopy(BASE)
    _set(d, path, value)
    with pytest.raises(ValidationError) as e:
        load_cluster(d)
    assert e.value.field == field, str(e.value)


def test_error_lists_allowed_values() -> None:
    d = copy.deepcopy(BASE)
    d["nodes"][1]["devices"][0]["type"] = "B300"
    with pytest.raises(ValidationError) as e:
        load_cluster(d)
    assert "H100-SXM" in e.value.message and "custom" in e.value.message
    d = copy.deepcopy(BASE)
    d["emulation"] = {"kind": "magic", "of": "H100-SXM", "partitions": []}
    with pytest.raises(ValidationError) as e:
        load_cluster(d)
    assert "green_context" in e.value.message and "paced_cpu" in e.value.message


def test_partition_use_must_fit_one_gpu() -> None:
    d = {
        "emulation": {
            "kind": "green_context",
            "of": "H100-SXM",
            "partitions": [{"name": "big", "num_sms": 100, "memory_gb": 40}],
        },
        "nodes": [{"name": "g", "devices": [{"type": "big", "count": 2}]}],
    }
    with pytest.raises(ValidationError) as e:
        load_cluster(d)
    assert e.value.field == "emulation.partitions"


def test_json_works_without_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "c.json"
    f.write_text(json.dumps(BASE))
    y = tmp_path / "c.yaml"
    y.write_text("nodes: []\n")
    monkeypatch.setitem(sys.modules, "yaml", None)
    assert len(load_cluster(f).devices) == 5
    with pytest.raises(ValidationError) as e:
        load_cluster(y)
    assert "pyyaml" in e.value.message
    with pytest.raises(ValidationError) as e:
        load_cluster(tmp_path / "missing.json")
    assert e.value.field == "cluster"
