"""The simulator runs the engine's own scheduler objects; queueing against theory; every strategy finishes every
request with no KV block left behind on any instance."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from hetserve.core.cluster import load_cluster
from hetserve.core.model_config import ModelConfig
from hetserve.core.request import KVTransferParams, Request
from hetserve.engine.kv.block_pool import BlockPool
from hetserve.engine.kv.kv_cache_manager import KVCacheManager
from hetserve.engine.sched.scheduler import Scheduler
from hetserve.sim.simulator import Simulator, unfinished
from hetserve.sim.workload import SimRequest
from hetserve.strategies.base import Deployment, InstancePlan, InstanceView
from hetserve.strategies.build import build_deployment

ROOT = Path(__file__).resolve().parents[2]
MODEL = ModelConfig.from_path(ROOT / "examples/models/llama-3.1-8b")
CLUSTER = load_cluster(ROOT / "examples/clusters/h100-a10.yaml")


def workload(n: int, rate: float, seed: int = 0, lo: int = 20, hi: int = 900) -> list[SimRequest]:
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(SimRequest(t, rng.randint(lo, hi), rng.randint(1, 48)))
        t += rng.expovariate(rate)
    return out


def assert_clean(sim: Simulator) -> None:
    """Nothing waiting, running, receiving or pinned, and every block back in the free queue."""
    for name, inst in sim.instances.items():
        s = inst.scheduler
        assert not s.has_unfinished(), name
        assert not s.pinned and not s.receiving and not s.requests, name
        assert not s.kv.req_to_blocks, name
        assert s.kv.pool.num_free_blocks == s.kv.pool.num_usable_blocks, f"{name} leaked blocks"
        s.kv.check_invariants()


def run(cfg: dict[str, Any], wl: list[SimRequest]) -> tuple[Simulator, Any]:
    dep = build_deployment(CLUSTER, MODEL, cfg)
    sim = Simulator(dep)
    res = sim.run(wl)
    return sim, res


def test_simulator_runs_the_engines_own_classes() -> None:
    cfg = {"strategy": "dp", "instances": [{"devices": ["n0:0"]}, {"devices": ["n0:1"]}]}
    sim, res = run(cfg, workload(20, 5.0))
    for inst in sim.instances.values():
        assert type(inst.scheduler) is Scheduler
        assert type(inst.scheduler.kv) is KVCacheManager
        assert type(inst.scheduler.kv.pool) is BlockPool
    assert all(r.success for r in res.records)
    assert_clean(sim)


# ---- M/D/1 -----------------------------------------------------------------------------------


class ConstantCost:
    """Cost-model stand-in: every step takes ``step_s``."""

    tp = 1
    kv_cache_dtype = "bfloat16"

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s
        self.layers = (0, 1)

    def step_time_s(self, shape: Any, num_kv_heads: int | None = None, serial: bool = False) -> float:
        return self.step_s if shape.num_tokens else 0.0


class OneInstance(Deployment):
    strategy = "one"

    def route(self, req: Request, views: dict[str, InstanceView], now_s: float) -> tuple[str, KVTransferParams | None]:
        return next(iter(self.plans)), None


def _md1(rho: float, n: int, seed: int) -> tuple[list[SimRequest], float, Simulator]:
    step_s = 0.01
    plan = InstancePlan(
        "q",
        ("d0",),
        "mixed",
        (ConstantCost(step_s),),
        num_kv_blocks=64,  # type: ignore[arg-type]
        max_num_seqs=1,
    )
    rng = random.Random(seed)
    t, wl = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rho / step_s)
        wl.append(SimRequest(t, 4, 1))
    return wl, step_s, Simulator(OneInstance([plan], lambda a, b: None))  # type: ignore[arg-type,return-value]


def test_constant_service_waits_follow_the_lindley_recursion() -> None:
    """Request by request, the wait equals W_{n+1} = max(0, W_n + D - A_{n+1}) of a FIFO D/1 server."""
    wl, step_s, sim = _md1(0.8, 3000, 5)
    res = sim.run(wl)
    w, prev = 0.0, wl[0].arrival_s
    for rec, spec in zip(res.records, wl):
        w = max(0.0, w + step_s - (spec.arrival_s - prev)) if spec is not wl[0] else 0.0
        prev = spec.arrival_s
        assert rec.ttft_s - step_s == pytest.approx(w, abs=1e-9)
    assert_clean(sim)


class WakingCost(ConstantCost):
    """Every step takes ``step_s``; a step that starts after an idle gap takes ``wake_s`` more."""

    def __init__(self, step_s: float, wake_s: float) -> None:
        super().__init__(step_s)
        self.wake_s = wake_s

    def idle_wake_s(self, idle_s: float) -> float:
        return self.wake_s if idle_s > 0 else 0.0


def test_a_step_after_an_idle_gap_pays_the_wake_up_and_arrivals_wait_for_the_running_step() -> None:
    """One request per step (max_num_seqs 1, one token): the departure recursion of a FIFO server whose
    service is D, plus W when the server was idle when the request arrived (it found no step running)."""
    step_s, wake_s = 0.01, 0.004
    plan = InstancePlan("q", ("d0",), "mixed", (WakingCost(step_s, wake_s),), num_kv_blocks=64,  # type: ignore[arg-type]
                        max_num_seqs=1)
    rng = random.Random(3)
    t, wl = 0.0, []
    for _ in range(2000):
        t += rng.expovariate(0.6 / step_s)
        wl.append(SimRequest(t, 4, 1))
    res = Simulator(OneInstance([plan], lambda a, b: None)).run(wl)  # type: ignore[arg-type,return-value]
    free = 0.0
    num_woken = 0
    for rec, spec in zip(res.records, wl, strict=True):
        idle = spec.arrival_s > free
        num_woken += idle
        free = max(free, spec.arrival_s) + step_s + (wake_s if idle else 0.0)
        assert rec.ttft_s == pytest.approx(free - spec.arrival_s, abs=1e-9)
    assert 0 < num_woken < len(wl)  # both cases occur


def test_new_requests_first_step_carries_the_measured_host_cost() -> None:
    """A lone request's TTFT is its first step (new-request terms included) plus the wake-up after the idle
    gap since time 0; its later steps are plain decode steps."""
    from hetserve.core.devices import get_device
    from hetserve.planner.costmodel import BatchShape, CostModel
    from hetserve.planner.profile import DeviceProfile, Table1D, model_shape_hash

    prof = DeviceProfile(
        device_name="A10", emulation=None, model_name="m", shape_hash=model_shape_hash(MODEL), dtype="bfloat16",
        kv_cache_dtype="bfloat16", tp=1, dense=Table1D((1.0, 1024.0), (1e-4, 1e-3)), step_overhead_s=2e-4,
        step_overhead_per_seq_s=1e-5, new_seq_overhead_s=3e-4, new_seq_overhead_per_token_s=1e-6,
        idle_wake=Table1D((0.0, 0.01), (0.0, 5e-4)),
    )
    cost = CostModel(MODEL, get_device("A10"), profile=prof)
    plan = InstancePlan("q", ("d0",), "mixed", (cost,), num_kv_blocks=256, max_num_seqs=4,
                        max_num_batched_tokens=512)
    res = Simulator(OneInstance([plan], lambda a, b: None)).run([SimRequest(0.5, 100, 3)])  # type: ignore[arg-type]
    rec = res.records[0]
    layers = MODEL.num_hidden_layers
    attn = cost.attention_time_s(BatchShape(((100, 0),)))  # roofline: the profile has no attention tables
    lm = cost.breakdown(BatchShape(((100, 0),)))["lm_head"] + cost.breakdown(BatchShape(((100, 0),)))["embedding"]
    dense = 1e-4 + 9e-4 * 99 / 1023
    first = layers * dense + attn + lm + 2e-4 + 1e-5 + 3e-4 + 100 * 1e-6
    assert rec.ttft_s == pytest.approx(first + 5e-4, rel=1e-9)  # idle since 0: the whole wake-up
    assert rec.itl_s[0] == pytest.approx(cost.step_time_s(BatchShape((), 1, 100)), rel=1e-9)


def test_async_scheduling_overlaps_busy_steps_but_not_the_first_after_a_gap() -> None:
    """An async cost model: a lone request's first step (an idle engine, nothing in flight to hide the host work
    behind) costs host + device in series; its decode steps right after it cost max(host, device)."""
    from hetserve.core.devices import get_device
    from hetserve.planner.costmodel import BatchShape, CostModel
    from hetserve.planner.profile import DeviceProfile, Table1D, model_shape_hash

    prof = DeviceProfile(
        device_name="A10", emulation=None, model_name="m", shape_hash=model_shape_hash(MODEL), dtype="bfloat16",
        kv_cache_dtype="bfloat16", tp=1, dense=Table1D((1.0, 1024.0), (1e-4, 1e-3)), step_overhead_s=2e-2,
        step_overhead_per_seq_s=1e-5, new_seq_overhead_s=3e-4, new_seq_overhead_per_token_s=1e-6,
    )
    cost = CostModel(MODEL, get_device("A10"), profile=prof)
    cost.async_scheduling = True
    plan = InstancePlan("q", ("d0",), "mixed", (cost,), num_kv_blocks=256, max_num_seqs=4,
                        max_num_batched_tokens=512)
    res = Simulator(OneInstance([plan], lambda a, b: None)).run([SimRequest(0.5, 100, 3)])  # type: ignore[arg-type]
    rec = res.records[0]
    first, decode = BatchShape(((100, 0),), 0, 0, 1, 1, 100), BatchShape((), 1, 100)  # first: a new request
    assert rec.ttft_s == pytest.approx(cost.step_time_s(first, serial=True), rel=1e-9)
    # the host's 20 ms overhead outweighs the small decode on the device: a busy step costs the host's time
    assert rec.itl_s[0] == pytest.approx(cost.step_time_s(decode), rel=1e-9)
    assert cost.step_time_s(decode) < cost.step_time_s(decode, serial=True)
    assert cost.step_time_s(first, serial=True) > cost.step_time_s(first)


class AsyncConstantCost(ConstantCost):
    """Every step takes ``step_s``; the engine schedules one step ahead (async scheduling)."""

    async_scheduling = True


@pytest.mark.parametrize("lookahead", [False, True])
def test_async_engine_schedules_one_step_ahead(lookahead: bool) -> None:
    """A busy engine (request A decodes one token a step of D); B arrives mid-step. Without async scheduling B's
    prefill is the next step: TTFT = 0.5 D + D. With it, the next step was scheduled when the running one started,
    so B's prefill is the step after: TTFT = 0.5 D + 2 D. A's decodes run on placeholders and its tokens still come
    one a step (a token every D)."""
    d = 0.01
    cost = AsyncConstantCost(d) if lookahead else ConstantCost(d)
    plan = InstancePlan("q", ("d0",), "mixed", (cost,), num_kv_blocks=256, max_num_seqs=4,  # type: ignore[arg-type]
                        max_num_batched_tokens=512)
    sim = Simulator(OneInstance([plan], lambda a, b: None))  # type: ignore[arg-type]
    res = sim.run([SimRequest(0.0, 8, 40), SimRequest(10.5 * d, 8, 2)])
    a, b = res.records
    assert b.ttft_s == pytest.approx((2.5 if lookahead else 1.5) * d, abs=1e-9)
    assert a.ttft_s == pytest.approx(d, abs=1e-9)
    assert all(x == pytest.approx(d, abs=1e-9) for x in a.itl_s)
    assert sim.instances["q"].scheduler.async_scheduling == lookahead
    assert_clean(sim)


@pytest.mark.parametrize("rho", [0.5, 0.7])
def test_constant_service_reproduces_md1_mean_wait(rho: float) -> None:
    """max_num_seqs = 1 and one-token outputs: each request is one step of D seconds, served FIFO. The
    Pollaczek-Khinchine mean wait of M/D/1 is rho / (2 mu (1 - rho)) with mu = 1 / D. With 40k requests the
    sampling noise of the mean is about 2% (rho 0.5) to 3% (rho 0.7) of it."""
    wl, step_s, sim = _md1(rho, 40_000, 1234)
    res = sim.run(wl)
    waits = [r.ttft_s - step_s for r in res.records]
    assert all(w >= -1e-9 for w in waits)
    mu = 1 / step_s
    expected = rho / (2 * mu * (1 - rho))
    assert sum(waits) / len(waits) == pytest.approx(expected, rel=0.05)
    assert_clean(sim)


# ---- every strategy finishes every request, no leaks ------------------------------------------

H, A1, A2 = "n0:0", "n0:1", "n0:2"
CONFIGS: dict[str, dict[str, Any]] = {
    "pd-low-prefill": {
        "strategy": "pd",
        "instances": [
            {"role": "prefill", "devices": [A1]},
            {"role": "prefill", "devices": [A2]},
            {"role": "decode", "devices": [H]},
        ],
    },
    "pd-high-prefill": {
        "strategy": "pd",
        "instances": [{"role": "prefill", "devices": [H]}, {"role": "decode", "devices": [A1, A2], "tp": 2}],
    },
    "pp": {"strategy": "pp", "instances": [{"devices": [H, A1, A2], "layers": "auto"}]},
    "hetis-none": {
        "strategy": "hetis",
        "instances": [{"role": "main", "devices": [H], "workers": [{"device": A1, "kv_heads": 0}]}],
    },
    "hetis-some": {
        "strategy": "hetis",
        "instances": [
            {"role": "main", "devices": [H], "workers": [{"device": A1, "kv_heads": 2}, {"device": A2, "kv_heads": 1}]}
        ],
    },
    "hetis-all": {
        "strategy": "hetis",
        "instances": [
            {"role": "main", "devices": [H], "workers": [{"device": A1, "kv_heads": 4}, {"device": A2, "kv_heads": 4}]}
        ],
    },
    "hetis-redispatch": {
        "strategy": "hetis",
        "redispatch_every_steps": 4,
        "instances": [
            {"role": "main", "devices": [H], "workers": [{"device": A1, "kv_heads": 6}, {"device": A2, "kv_heads": 0}]}
        ],
    },
}
for _k in (0, 1, 16, 24, 10_000):
    CONFIGS[f"cronus-k{_k}"] = {
        "strategy": "cronus",
        "split_policy": {"kind": "fixed", "k": _k},
        "instances": [{"role": "head", "devices": [A1]}, {"role": "main", "devices": [H]}],
    }
CONFIGS["cronus-adaptive"] = {
    "strategy": "cronus",
    "split_policy": {"kind": "adaptive", "tbt_slo_ms": 50},
    "instances": [
        {"role": "head", "devices": [A1]},
        {"role": "head", "devices": [A2]},
        {"role": "main", "devices": [H]},
    ],
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_strategy_finishes_every_request_without_leaks(name: str) -> None:
    wl = workload(80, 12.0, seed=7)
    sim, res = run(CONFIGS[name], wl)
    assert not unfinished(sim)
    bad = [r.error for r in res.records if not r.success]
    assert not bad, bad[:3]
    for rec, spec in zip(res.records, wl):
        assert rec.output_len == spec.output_len
        assert len(rec.itl_s) == spec.output_len - 1
    assert_clean(sim)
    if name == "hetis-redispatch":
        d = sim.deployment.dispatchers["i0"]  # type: ignore[attr-defined]
        assert d.num_redispatches >= 1 and sim.deployment.redispatch_log  # type: ignore[attr-defined]
    if name.startswith("cronus-k") and name != "cronus-k0":
        # the head computed something for every request whose prompt was longer than nothing
        head = sim.instances["i0"]
        assert head.num_steps > 0


def test_cronus_k0_is_plain_serving_on_the_main_instance() -> None:
    wl = workload(120, 8.0, seed=3)
    main = {"role": "main", "devices": [H], "max_num_batched_tokens": 512}
    cronus = {
        "strategy": "cronus",
        "split_policy": {"kind": "fixed", "k": 0},
        "instances": [{"role": "head", "devices": [A1]}, main],
    }
    alone = {"strategy": "dp", "instances": [{"devices": [H], "max_num_batched_tokens": 512}]}
    sim_c, res_c = run(cronus, wl)
    _, res_d = run(alone, wl)
    assert sim_c.instances["i0"].num_steps == 0
    for c, d in zip(res_c.records, res_d.records):
        assert c.ttft_s == d.ttft_s and c.itl_s == d.itl_s and c.e2el_s == d.e2el_s


def test_transfers_share_a_link_first_come_first_served() -> None:
    """Two hand-offs over one slow link at once: the second waits for the first."""
    slow = {"name": "slow", "kind": "ethernet", "bandwidth_gb_per_s": 0.5, "latency_us": 0}
    cl = load_cluster(
        {
            "nodes": [{"name": "a", "devices": [{"type": "A10"}]}, {"name": "b", "devices": [{"type": "H100-SXM"}]}],
            "inter_node_link": slow,
        }
    )
    cfg = {
        "strategy": "pd",
        "instances": [{"role": "prefill", "devices": ["a:0"]}, {"role": "decode", "devices": ["b:0"]}],
    }
    dep = build_deployment(cl, MODEL, cfg)
    xfer = dep.transfer_time_s("i0", "i1", 500)
    wl = [SimRequest(0.0, 500, 2), SimRequest(0.0, 500, 2)]
    sim = Simulator(dep)
    res = sim.run(wl)
    # both prompts are prefilled in one step, so both transfers start together; the second lands one
    # transfer later than the first
    ends = sorted(r.ttft_s + r.itl_s[0] for r in res.records)
    assert ends[1] - ends[0] == pytest.approx(xfer, rel=0.05)
    assert_clean(sim)
