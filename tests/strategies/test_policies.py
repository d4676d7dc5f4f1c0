"""Cronus split policy, Hetis head dispatcher, PD routing: properties they must have, against the cost model."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from hetserve.core.cluster import load_cluster
from hetserve.core.devices import LinkSpec, get_device
from hetserve.core.errors import ValidationError
from hetserve.core.model_config import ModelConfig
from hetserve.core.request import Request
from hetserve.core.sampling_params import SamplingParams
from hetserve.planner.costmodel import BatchShape, CostModel
from hetserve.sim.simulator import Simulator
from hetserve.strategies.build import build_deployment
from hetserve.strategies.cronus import AdaptiveSplit, tbt_token_budget
from hetserve.strategies.hetis import AttentionWorker, HeadDispatcher

ROOT = Path(__file__).resolve().parents[2]
MODEL = ModelConfig.from_path(ROOT / "examples/models/llama-3.1-8b")
CLUSTER = load_cluster(ROOT / "examples/clusters/h100-a10.yaml")
H, A1, A2 = "n0:0", "n0:1", "n0:2"


def _req(rid: str, n: int, out: int = 64) -> Request:
    return Request(rid, [1] * n, SamplingParams(max_tokens=out, ignore_eos=True, detokenize=False))


def _cronus(policy: dict[str, Any]) -> Any:
    return build_deployment(
        CLUSTER,
        MODEL,
        {
            "strategy": "cronus",
            "split_policy": policy,
            "instances": [
                {"name": "head", "role": "head", "devices": [A1]},
                {"name": "main", "role": "main", "devices": [H]},
            ],
        },
    )


# ---- Cronus -------------------------------------------------------------------------------------


def test_tbt_budget_is_the_largest_chunk_within_the_slo() -> None:
    c = CostModel(MODEL, get_device("H100-SXM"))
    for nd, ctx, tbt in ((0, 0, 0.02), (32, 1024, 0.03), (128, 2048, 0.05)):
        p = tbt_token_budget(c, tbt, nd, ctx, 8192)
        assert c.step_time_s(BatchShape(((p, 0),) if p > 1 else (), nd, nd * ctx)) <= tbt
        assert c.step_time_s(BatchShape(((p + 1, 0),), nd, nd * ctx)) > tbt
    # decodes alone over the SLO: nothing fits
    assert tbt_token_budget(c, 1e-4, 64, 4096) == 0


def test_adaptive_split_adapts_to_queues() -> None:
    dep = _cronus({"kind": "adaptive", "tbt_slo_ms": 60})
    sim = Simulator(dep)
    views = sim.views
    policy = dep.policy
    assert isinstance(policy, AdaptiveSplit)
    L = 2000
    idle = policy.choose_k(L, views, 0.0, "head", "main", dep)
    # a long prefill backlog on the main instance: the head should take a larger share
    for i in range(12):
        sim.instances["main"].scheduler.add_request(_req(f"m{i}", 4000))
    busy_main = policy.choose_k(L, views, 0.0, "head", "main", dep)
    assert 0 <= idle < busy_main <= L
    # then a backlog on the head as well: it should take less than with the head idle
    for i in range(12):
        sim.instances["head"].scheduler.add_request(_req(f"h{i}", 4000))
    both = policy.choose_k(L, views, 0.0, "head", "main", dep)
    assert both < busy_main


def _predicted_ttft(dep: Any, sim: Simulator, L: int) -> Any:
    """The adaptive policy's TTFT prediction for split k of an L-token prompt, written out by hand."""
    policy = dep.policy
    hv, mv = sim.views["head"], sim.views["main"]
    rate, step_s = policy.main_spare(mv)
    main_free = mv.pending_prefill_tokens() / rate

    def ttft(k: int) -> float:
        if k == 0:
            return main_free + L / rate + step_s
        ready = hv.plan.cost.prefill_time_s(min(k, hv.plan.max_num_batched_tokens))
        ready += max(0, k - hv.plan.max_num_batched_tokens) * dep.head_rate["head"]
        if k == L:
            return ready
        return max(ready + dep.transfer_time_s("head", "main", k), main_free) + (L - k) / rate + step_s

    return ttft


def test_adaptive_split_picks_near_the_best_predicted_ttft() -> None:
    """Against brute force over every k (step 1) of the same prediction: within the offload slack."""
    dep = _cronus({"kind": "adaptive", "tbt_slo_ms": 60, "granularity": 16})
    sim = Simulator(dep)
    for i in range(6):
        sim.instances["main"].scheduler.add_request(_req(f"m{i}", 3000))
    policy = dep.policy
    L = 1500
    k = policy.choose_k(L, sim.views, 0.0, "head", "main", dep)
    ttft = _predicted_ttft(dep, sim, L)
    best = min(ttft(x) for x in range(L + 1))
    assert ttft(k) <= best * (1 + policy.offload_slack) * 1.05


def test_fixed_split_never_exceeds_the_prompt() -> None:
    dep = _cronus({"kind": "fixed", "k": 512})
    sim = Simulator(dep)
    name, kt = dep.route(_req("a", 100), sim.views, 0.0)
    assert name == "head" and kt is not None and kt.compute_limit == 100 and kt.send


# ---- Hetis --------------------------------------------------------------------------------------


def _dispatcher(
    worker_bw: float = 25e9, latency_s: float = 5e-6, main_mem: int | None = None, worker: str = "A10"
) -> HeadDispatcher:
    main = CostModel(MODEL, get_device("H100-SXM"))
    kv_bytes = main.memory_footprint(256, 2048, main_mem)["kv_bytes_available"]
    link = LinkSpec("l", "pcie", worker_bw, latency_s)
    if worker == "instant":
        spec = dataclasses.replace(
            get_device("H100-SXM"), name="instant", hbm_bytes_per_s=1e18, peak_flops={"bfloat16": 1e22}
        )
    else:
        spec = get_device(worker)
    workers = [AttentionWorker(f"w{i}", CostModel(MODEL, spec), link, 20 * 2**30) for i in range(2)]
    return HeadDispatcher(main, kv_bytes, workers)


def test_no_offload_is_the_plain_step() -> None:
    d = _dispatcher()
    shape = BatchShape(((256, 0),), 48, 48 * 1500)
    assert d.step_time_s(shape, (0, 0)) == d.main_cost.step_time_s(shape)


def test_instant_workers_hide_their_heads_attention() -> None:
    """Workers with an instant link and device: the step is the main's step with only its kept heads."""
    d = _dispatcher(worker_bw=1e18, latency_s=0.0, worker="instant")
    shape = BatchShape(((128, 512),), 64, 64 * 2000)
    assert d.step_time_s(shape, (2, 2)) == pytest.approx(d.main_cost.step_time_s(shape, 4), rel=1e-6)
    assert d.step_time_s(shape, (2, 2)) < d.step_time_s(shape, (0, 0))


def test_a_slow_worker_device_bounds_the_step() -> None:
    """An A10 holding 4 heads at long context is slower than the H100 doing all 8: the step waits for it."""
    d = _dispatcher(worker_bw=1e18, latency_s=0.0)
    shape = BatchShape((), 64, 64 * 2000)
    a10_attn = d.workers[0].cost.attention_time_s(shape, 4)
    assert a10_attn > d.main_cost.attention_time_s(shape, 4)
    expected = d.main_cost.step_time_s(shape, 4) - d.main_cost.attention_time_s(shape, 4) + a10_attn
    assert d.step_time_s(shape, (4, 0)) == pytest.approx(expected, rel=1e-9)


def test_slow_links_make_offload_a_loss_and_the_dispatcher_keeps_heads() -> None:
    d = _dispatcher(worker_bw=1e6, latency_s=1e-3)
    a = d.dispatch(256, 1500)
    assert a == (0, 0)


def test_offload_grows_kv_capacity_when_memory_binds() -> None:
    d = _dispatcher(main_mem=24 * 2**30)
    base = d.capacity_tokens((0, 0))
    assert d.capacity_tokens((2, 2)) == pytest.approx(base * 2, rel=0.01)
    a = d.dispatch(256, 1500)
    assert sum(a) > 0 and d.capacity_tokens(a) > base


def test_hetis_main_pool_is_larger_with_heads_offloaded() -> None:
    cl = load_cluster(
        {"nodes": [{"name": "n", "devices": [{"type": "H100-SXM", "memory_cap_gb": 24}, {"type": "A10", "count": 2}]}]}
    )

    def pool(workers: list[dict[str, Any]]) -> int:
        dep = build_deployment(
            cl,
            MODEL,
            {"strategy": "hetis", "instances": [{"name": "m", "role": "main", "devices": ["n:0"], "workers": workers}]},
        )
        return dep.plans["m"].num_kv_blocks

    kept_all = pool([{"device": "n:1", "kv_heads": 0}])
    half = pool([{"device": "n:1", "kv_heads": 2}, {"device": "n:2", "kv_heads": 2}])
    assert half > 1.9 * kept_all


def test_rebalance_respects_memory_bounds_and_improves() -> None:
    d = _dispatcher()
    d.assignment = (6, 0)
    shape = BatchShape((), 128, 128 * 1500)
    pool_tokens = 10_000
    new = d.rebalance(shape, pool_tokens)
    main_max, bounds = d.head_bounds(pool_tokens)
    assert d.step_time_s(shape, new) < d.step_time_s(shape, (6, 0))
    assert all(h <= b for h, b in zip(new, bounds)) and d.num_kv_heads - sum(new) <= main_max
    assert d.move_time_s(new, 5000) > 0


# ---- PD -----------------------------------------------------------------------------------------


def test_pd_routes_to_the_least_loaded_prefill_and_hands_off_the_prompt() -> None:
    dep = build_deployment(
        CLUSTER,
        MODEL,
        {
            "strategy": "pd",
            "instances": [
                {"name": "p1", "role": "prefill", "devices": [A1]},
                {"name": "p2", "role": "prefill", "devices": [A2]},
                {"name": "d", "role": "decode", "devices": [H]},
            ],
        },
    )
    sim = Simulator(dep)
    sim.instances["p1"].scheduler.add_request(_req("busy", 3000))
    name, kt = dep.route(_req("x", 500), sim.views, 0.0)
    assert name == "p2" and kt is not None and kt.send and kt.compute_limit is None
    dst, n = dep.handoff("p2", _req("x", 500), sim.views, 0.0)
    assert dst == "d" and n == 500
    # a slower link costs more transfer time, and a different TP degree adds a conversion pass
    fast = dep.transfer_time_s("p2", "d", 1000)
    assert fast > 0


def test_adaptive_split_ties_go_where_asked() -> None:
    """Among the k within the slack of the best predicted TTFT: ``head`` takes the largest, ``main`` the smallest,
    ``auto`` the smallest while the main has no prefill backlog and the largest once it has one."""
    L = 1200

    def pick(ties: str, busy_main: bool) -> tuple[int, list[int]]:
        dep = _cronus({"kind": "adaptive", "tbt_slo_ms": 60, "ties": ties, "offload_slack": 5.0})
        sim = Simulator(dep)
        if busy_main:
            for i in range(8):
                sim.instances["main"].scheduler.add_request(_req(f"m{i}", 3000))
        policy = dep.policy
        assert isinstance(policy, AdaptiveSplit)
        k = policy.choose_k(L, sim.views, 0.0, "head", "main", dep)
        ttft = _predicted_ttft(dep, sim, L)  # the same predictions by hand: which candidates are within the slack
        cands = policy._candidates(L)
        best = min(ttft(x) for x in cands)
        return k, [x for x in cands if ttft(x) <= best * 6.0]

    for busy in (False, True):
        k_head, within = pick("head", busy)
        assert min(within) < max(within), "the slack must leave a real choice for the test to mean anything"
        assert k_head == max(within)
        k_main, within = pick("main", busy)
        assert k_main == min(within)
        k_auto, within = pick("auto", busy)
        assert k_auto == (max(within) if busy else min(within))
    with pytest.raises(ValidationError, match="split_policy.ties"):
        _cronus({"kind": "adaptive", "ties": "sideways"})
