"""The builder: cluster file + model + strategy params -> deployment; errors name the config key."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hetserve.core.cluster import load_cluster
from hetserve.core.errors import ValidationError
from hetserve.core.model_config import ModelConfig
from hetserve.planner.costmodel import CostModel
from hetserve.strategies import STRATEGIES
from hetserve.strategies.build import build_deployment, load_run_config

ROOT = Path(__file__).resolve().parents[2]
MODEL = ModelConfig.from_path(ROOT / "examples/models/llama-3.1-8b")
MIXED = load_cluster(ROOT / "examples/clusters/mixed-16.yaml")


def test_registry_has_every_strategy() -> None:
    assert STRATEGIES.names() == ["cronus", "dp", "hetis", "pd", "pp"]
    for name in STRATEGIES.names():
        assert STRATEGIES.get(name).strategy == name


@pytest.mark.parametrize(
    ("cfg", "field", "words"),
    [
        ({"strategy": "nope", "instances": [{"devices": ["n0:0"]}]}, "strategy", "one of"),
        ({"strategy": "dp", "instances": []}, "instances", "non-empty"),
        ({"strategy": "dp", "instances": [{"devices": ["n9:0"]}]}, "instances[0].devices", "no device"),
        ({"strategy": "dp", "instances": [{"devices": ["n2:2"]}]}, "instances[0].devices", "weights do not fit on T4"),
        (
            {"strategy": "dp", "instances": [{"devices": ["n0:0"]}, {"devices": ["n0:0"]}]},
            "instances[1].devices",
            "already used",
        ),
        ({"strategy": "dp", "instances": [{"devices": ["n0:0", "n0:2"]}]}, "instances[0].devices", "one type"),
        ({"strategy": "dp", "instances": [{"devices": ["n0:0"], "tp": 2}]}, "instances[0].tp", "devices"),
        ({"strategy": "pd", "instances": [{"role": "main", "devices": ["n0:0"]}]}, "instances[0].role", "prefill"),
        ({"strategy": "pd", "instances": [{"role": "prefill", "devices": ["n0:0"]}]}, "instances", "decode"),
        ({"strategy": "dp", "instances": [{"devices": ["n0:0"], "bogus": 1}]}, "instances[0].bogus", "unknown"),
        (
            {"strategy": "pp", "instances": [{"devices": ["n0:2", "n0:3"], "layers": [[0, 10], [12, 32]]}]},
            "instances[0].layers",
            "contiguous",
        ),
        (
            {
                "strategy": "cronus",
                "split_policy": {"kind": "fixed"},
                "instances": [{"role": "main", "devices": ["n0:0"]}],
            },
            "split_policy.k",
            "required",
        ),
        (
            {
                "strategy": "hetis",
                "instances": [{"role": "main", "devices": ["n0:0"], "workers": [{"device": "n0:2", "kv_heads": 9}]}],
            },
            "instances[0].workers",
            "more than",
        ),
        (
            {"strategy": "dp", "instances": [{"devices": ["n0:0"], "workers": [{"device": "n0:2"}]}]},
            "instances[0].workers",
            "Hetis",
        ),
        ({"strategy": "dp", "instances": [{"devices": ["n0:0"]}], "extra_key": 1}, "extra_key", "unknown"),
    ],
)
def test_errors_name_the_key(cfg: dict[str, Any], field: str, words: str) -> None:
    with pytest.raises(ValidationError) as e:
        build_deployment(MIXED, MODEL, cfg)
    assert e.value.field == field
    assert words in e.value.message


def test_tp_group_and_pipeline_are_sized_from_memory() -> None:
    dep = build_deployment(
        MIXED,
        MODEL,
        {
            "strategy": "dp",
            "instances": [
                {"name": "t4pair", "devices": ["n2:2", "n2:3"]},
                {"name": "pipe", "devices": ["n1:0", "n1:1"], "layers": "auto"},
            ],
        },
    )
    t4 = dep.plans["t4pair"]
    assert t4.cost.tp == 2 and t4.cost.weight_bytes() < MODEL.weight_bytes() / 2 + 2**30
    # the capped 14 GiB is what the pool is sized from, not the T4's 16 GiB
    fp = CostModel(MODEL, t4.cost.device, tp=2).memory_footprint(256, 2048, 14 * 2**30)
    assert (t4.num_kv_blocks - 1) * 16 <= fp["kv_bytes_available"] // t4.cost.kv_bytes_per_token()
    pipe = dep.plans["pipe"]
    assert pipe.num_stages == 2 and pipe.stage_costs[0].layers[1] == pipe.stage_costs[1].layers[0]
    assert pipe.stage_link is not None and pipe.notes["layers"]


def test_run_config_reads_paths_relative_to_the_file(tmp_path: Path) -> None:
    import json

    cfg = {
        "strategy": "dp",
        "cluster": str(ROOT / "examples/clusters/h100-a10.yaml"),
        "model": str(ROOT / "examples/models/llama-3.1-8b"),
        "instances": [{"devices": ["n0:0"]}],
    }
    p = tmp_path / "c.json"
    p.write_text(json.dumps(cfg))
    rc = load_run_config(p)
    assert rc.deployment.strategy == "dp" and rc.cluster.name == "h100-a10"
    with pytest.raises(ValidationError) as e:
        load_run_config({**cfg, "cluster": "nowhere.yaml"})
    assert e.value.field == "cluster"
