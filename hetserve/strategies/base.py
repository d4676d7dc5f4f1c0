"""What every strategy is: instances (each a real ``Scheduler`` plus a cost), and the rules that move
requests among them. Time-agnostic and pure Python: the simulator runs a deployment against predicted
time, the runtime against real workers; both call the same methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from hetserve.core.devices import LinkSpec
from hetserve.core.outputs import SchedulerOutput
from hetserve.core.request import KVTransferParams, Request
from hetserve.engine.sched.scheduler import Scheduler
from hetserve.planner.costmodel import BatchShape, CostModel

Role = Literal["mixed", "prefill", "decode", "head", "main"]


@dataclass
class InstancePlan:
    """One serving instance: a scheduler of its own over a group of devices."""

    name: str
    device_ids: tuple[str, ...]
    role: Role
    # one cost per pipeline stage (one entry without PP); each covers its layer range and TP degree
    stage_costs: tuple[CostModel, ...]
    num_kv_blocks: int
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int = 8192
    # hidden states between pipeline stages cross this link
    stage_link: LinkSpec | None = None
    # KV heads (per device) whose attention runs on this instance; None = all (Hetis offloads the rest)
    attention_kv_heads: int | None = None
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def cost(self) -> CostModel:
        return self.stage_costs[0]

    @property
    def num_stages(self) -> int:
        return len(self.stage_costs)


def batch_shape(so: SchedulerOutput) -> BatchShape:
    return BatchShape.from_scheduler_output(so)  # new requests counted too (their first step's host cost)


class InstanceView:
    """Read-only figures of a live instance that routing policies look at."""

    def __init__(self, plan: InstancePlan, scheduler: Scheduler) -> None:
        self.plan = plan
        self.scheduler = scheduler

    @property
    def name(self) -> str:
        return self.plan.name

    def pending_prefill_tokens(self) -> int:
        """Prompt tokens still to compute here: the waiting requests' (kept current by the scheduler) and the
        running requests' unfinished prompts."""
        return self.scheduler.num_waiting_prefill_tokens + self.running_prefill_tokens()

    def running_prefill_tokens(self) -> int:
        n = 0
        for r in self.scheduler.running:
            left = len(r.prompt_token_ids) - r.num_computed_tokens
            if left > 0:
                n += left
        return n

    def num_running(self) -> int:
        return self.scheduler.num_running + len(self.scheduler.receiving)

    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    def free_kv_tokens(self) -> int:
        return self.scheduler.kv.pool.num_free_blocks * self.plan.block_size


class Deployment(ABC):
    """A strategy laid out on a cluster. Subclasses decide where requests go and where KV moves."""

    strategy: ClassVar[str]

    def __init__(self, plans: list[InstancePlan], link_between: Callable[[str, str], LinkSpec],
                 params: dict[str, Any] | None = None) -> None:
        if not plans:
            raise ValueError("a deployment needs at least one instance")
        self.plans = {p.name: p for p in plans}
        self.link_between = link_between
        self.params = dict(params or {})

    @abstractmethod
    def route(self, req: Request, views: dict[str, InstanceView], now_s: float) -> tuple[str, KVTransferParams | None]:
        """Instance that takes a new request, and the KV hand-off it is set up for (None: served there alone)."""

    def handoff(self, src: str, req: Request, views: dict[str, InstanceView], now_s: float) -> tuple[str, int] | None:
        """A request finished on ``src`` with its KV pinned: the instance that continues it, and how many
        leading tokens' KV it receives. Strategies without hand-offs never get here."""
        raise NotImplementedError(f"{self.strategy} does not hand requests off")

    def transfer_time_s(self, src: str, dst: str, num_tokens: int) -> float:
        link = self.link_between(src, dst)
        sp, dp = self.plans[src], self.plans[dst]
        return sp.cost.kv_transfer_time_s(
            num_tokens, link, src_dtype=sp.cost.kv_cache_dtype, dst_dtype=dp.cost.kv_cache_dtype,
            conversion=sp.block_size != dp.block_size or sp.cost.kv_cache_dtype != dp.cost.kv_cache_dtype,
        )

    def stage_times_s(self, name: str, so: SchedulerOutput, serial: bool = False) -> list[float]:
        """Seconds each pipeline stage of instance ``name`` spends on the step (activations to the next
        stage included); ``serial``: host and device in series (see ``CostModel.step_time_s``)."""
        plan = self.plans[name]
        shape = batch_shape(so)
        times = [c.step_time_s(shape, plan.attention_kv_heads, serial) for c in plan.stage_costs]
        if plan.num_stages > 1 and plan.stage_link is not None:
            act = plan.cost.activation_bytes(shape.num_tokens)
            hop = plan.stage_link.latency_s + act / plan.stage_link.bandwidth_bytes_per_s
            times = [t + hop for t in times[:-1]] + [times[-1]]
        return times

    def on_step_done(self, name: str, views: dict[str, InstanceView], now_s: float) -> None:  # noqa: B027
        """Hook for online re-balancing (Hetis re-dispatch); no-op by default."""

    def describe(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "instances": [
                {"name": p.name, "devices": list(p.device_ids), "role": p.role, "tp": p.cost.tp,
                 "stages": [list(c.layers) for c in p.stage_costs], "num_kv_blocks": p.num_kv_blocks,
                 "attention_kv_heads": p.attention_kv_heads, **p.notes}
                for p in self.plans.values()
            ],
            "params": self.params,
        }


def make_plan(
    name: str,
    device_ids: tuple[str, ...],
    role: Role,
    costs: tuple[CostModel, ...],
    *,
    memory_bytes: int | None = None,
    max_num_seqs: int = 256,
    max_num_batched_tokens: int = 2048,
    max_model_len: int = 8192,
    block_size: int = 16,
    stage_link: LinkSpec | None = None,
    attention_kv_heads: int | None = None,
    kv_tokens_override: int | None = None,
) -> InstancePlan | None:
    """An instance sized from memory: its KV pool is what the tightest stage has left after weights and
    activations. None when the weights do not fit or no KV room remains."""
    kv_tokens = None
    for c in costs:
        fp = c.memory_footprint(max_num_seqs, max_num_batched_tokens, memory_bytes)
        if fp["kv_bytes_available"] <= 0:
            return None
        per_token = c.kv_bytes_per_token(num_kv_heads=attention_kv_heads)
        t = fp["kv_bytes_available"] // max(per_token, 1)
        kv_tokens = t if kv_tokens is None else min(kv_tokens, t)
    if kv_tokens_override is not None:
        kv_tokens = min(kv_tokens or 0, kv_tokens_override)
    num_blocks = int(kv_tokens // block_size) + 1  # + the null block
    if (num_blocks - 1) * block_size < max_model_len:
        return None
    return InstancePlan(
        name=name, device_ids=device_ids, role=role, stage_costs=costs, num_kv_blocks=num_blocks,
        block_size=block_size, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
        max_model_len=max_model_len, stage_link=stage_link, attention_kv_heads=attention_kv_heads,
    )
