"""Hetis: head-level attention offload. A high-end "main" instance runs the dense layers (QKV and output
projections, MLP, LM head) for every request; the attention of some KV heads runs on attention workers
(low-end GPUs, the host CPU) that hold those heads' KV.

Timing of one step, per layer: the main computes QKV, then its own heads' attention overlaps the
workers' (q and the new k, v go out, the attention output comes back), then the output projection and MLP
run. The layers are alike, so summed over them::

    step = (main's step with its kept heads) - (its attention) + max(its attention, slowest worker path)
    worker path = attention of its heads on the worker + layers x (2 link latencies + bytes / bandwidth)

KV capacity: the main stores only its kept heads' KV, each worker its heads'; the pool holds the tokens
the tightest holder can store. A :class:`HeadDispatcher` picks heads per worker from compute, memory and
link, and re-dispatches while serving (moving heads' KV, whose time the main's next step pays) when the
live batch makes another split faster by more than the move costs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hetserve.core.devices import LinkSpec
from hetserve.core.model_config import dtype_num_bytes
from hetserve.core.outputs import SchedulerOutput
from hetserve.planner.costmodel import BatchShape, CostModel
from hetserve.strategies.base import InstancePlan, InstanceView, batch_shape
from hetserve.strategies.dp import DPDeployment


@dataclass(frozen=True)
class AttentionWorker:
    """A device that holds some KV heads of a main instance and runs their attention."""

    name: str  # its device id
    cost: CostModel  # the model on the worker's device (tp 1); only attention_time_s is used
    link: LinkSpec  # to the main instance
    kv_budget_bytes: int  # memory it may fill with KV


class HeadDispatcher:
    """Which KV heads run where for one main instance: ``assignment[i]`` heads on worker ``i``, the rest on
    the main. All heads are counted in model units (the main runs tp 1)."""

    def __init__(
        self,
        main_cost: CostModel,
        main_kv_bytes: int,
        workers: list[AttentionWorker],
        link_between: Callable[[str, str], LinkSpec] | None = None,
    ) -> None:
        if main_cost.tp != 1:
            raise ValueError("a Hetis main instance runs tp 1")
        m = main_cost.model
        self.main_cost = main_cost
        self.main_kv_bytes = main_kv_bytes
        self.workers = workers
        self.link_between = link_between
        self.num_kv_heads = m.num_key_value_heads
        self.num_layers = m.num_hidden_layers
        self.head_dim = m.head_dim
        self.q_per_kv = m.num_attention_heads // m.num_key_value_heads
        self.act_bytes = main_cost.a_bytes
        # one token's KV of one head over all layers
        self.head_token_bytes = 2 * self.num_layers * self.head_dim * dtype_num_bytes(main_cost.kv_cache_dtype)
        self.assignment: tuple[int, ...] = (0,) * len(workers)
        self.num_redispatches = 0
        self.moved_bytes = 0

    @property
    def kept(self) -> int:
        return self.num_kv_heads - sum(self.assignment)

    # ---- time ---------------------------------------------------------------------------------
    def worker_path_s(self, i: int, shape: BatchShape, heads: int) -> float:
        if heads == 0:
            return 0.0
        w = self.workers[i]
        per_token = self.act_bytes * self.head_dim * heads * (2 * self.q_per_kv + 2)  # q + new k, v + output
        hop = 2 * w.link.latency_s + shape.num_tokens * per_token / w.link.bandwidth_bytes_per_s
        return w.cost.attention_time_s(shape, heads) + self.num_layers * hop

    def step_time_s(self, shape: BatchShape, assignment: tuple[int, ...] | None = None) -> float:
        a = self.assignment if assignment is None else assignment
        kept = self.num_kv_heads - sum(a)
        total = self.main_cost.step_time_s(shape, kept)
        if not any(a) or total == 0.0:
            return total
        own = self.main_cost.attention_time_s(shape, kept)
        slowest = max(self.worker_path_s(i, shape, h) for i, h in enumerate(a))
        return total - own + max(own, slowest)

    # ---- memory -------------------------------------------------------------------------------
    def capacity_tokens(self, assignment: tuple[int, ...] | None = None) -> int:
        """Tokens of KV the tightest holder of ``assignment`` can store."""
        a = self.assignment if assignment is None else assignment
        kept = self.num_kv_heads - sum(a)
        caps = []
        if kept:
            caps.append(self.main_kv_bytes // (kept * self.head_token_bytes))
        for w, h in zip(self.workers, a):
            if h:
                caps.append(max(0, w.kv_budget_bytes) // (h * self.head_token_bytes))
        return int(min(caps)) if caps else 0

    def head_bounds(self, pool_tokens: int) -> tuple[int, list[int]]:
        """Most heads the main and each worker can hold when the pool has ``pool_tokens`` tokens."""
        per = max(1, pool_tokens * self.head_token_bytes)
        main = min(self.num_kv_heads, self.main_kv_bytes // per)
        return main, [min(self.num_kv_heads, max(0, w.kv_budget_bytes) // per) for w in self.workers]

    # ---- choosing -----------------------------------------------------------------------------
    def _fill(self, offload: int, shape: BatchShape, bounds: list[int] | None = None) -> tuple[int, ...] | None:
        """``offload`` heads onto workers one at a time, each to the worker whose path stays shortest."""
        a = [0] * len(self.workers)
        for _ in range(offload):
            best, best_t = -1, float("inf")
            for i in range(len(a)):
                if bounds is not None and a[i] >= bounds[i]:
                    continue
                t = self.worker_path_s(i, shape, a[i] + 1)
                if t < best_t:
                    best, best_t = i, t
            if best < 0:
                return None
            a[best] += 1
        return tuple(a)

    def dispatch(
        self,
        max_num_seqs: int,
        mean_context_tokens: float,
        min_tokens: int = 0,
        fixed: tuple[int | None, ...] | None = None,
    ) -> tuple[int, ...]:
        """Initial heads per worker: the split with the highest decode throughput ``B / step(B)``, where
        the batch ``B`` is ``max_num_seqs`` or what the split's KV capacity holds at ``mean_context_tokens``
        each. ``fixed[i]`` (not None) pins worker ``i``'s head count. Sets and returns the assignment."""
        best: tuple[int, ...] | None = None
        best_score = -1.0
        for kept in range(self.num_kv_heads, -1, -1):
            offload = self.num_kv_heads - kept
            if fixed is not None and any(f is not None for f in fixed):
                pinned = sum(f or 0 for f in fixed)
                free = [i for i, f in enumerate(fixed) if f is None]
                if pinned > offload or (pinned < offload and not free):
                    continue
                rest = self._fill_subset(offload - pinned, free)
                if rest is None:
                    continue
                a = tuple(f if f is not None else rest[i] for i, f in enumerate(fixed))
            else:
                cand = self._fill(offload, BatchShape((), max_num_seqs, int(max_num_seqs * mean_context_tokens)))
                if cand is None:
                    continue
                a = cand
            cap = self.capacity_tokens(a)
            if cap < min_tokens:
                continue
            batch = int(min(max_num_seqs, cap // max(mean_context_tokens, 1)))
            if batch < 1:
                continue
            t = self.step_time_s(BatchShape((), batch, int(batch * mean_context_tokens)), a)
            score = batch / t
            if score > best_score * (1 + 1e-9):
                best, best_score = a, score
        if best is None:
            raise ValueError("no head split leaves room for the KV of one batch")
        self.assignment = best
        return best

    def _fill_subset(self, n: int, idx: list[int]) -> dict[int, int] | None:
        if n and not idx:
            return None
        out = {i: 0 for i in idx}
        for j in range(n):
            out[idx[j % len(idx)]] += 1
        return out

    def rebalance(self, shape: BatchShape, pool_tokens: int, max_moves: int = 16) -> tuple[int, ...]:
        """Local search from the current split for ``shape``: move one head at a time between holders
        (index -1 = the main) while it shortens the step and every holder keeps room for ``pool_tokens``."""
        main_max, bounds = self.head_bounds(pool_tokens)
        a = list(self.assignment)
        t = self.step_time_s(shape, tuple(a))
        holders = [-1, *range(len(a))]
        for _ in range(max_moves):
            best = None
            best_t = t * (1 - 1e-6)
            for src in holders:
                if (src == -1 and self.num_kv_heads - sum(a) == 0) or (src >= 0 and a[src] == 0):
                    continue
                for dst in holders:
                    if dst == src:
                        continue
                    b = a[:]
                    if src >= 0:
                        b[src] -= 1
                    if dst >= 0:
                        if b[dst] + 1 > bounds[dst]:
                            continue
                        b[dst] += 1
                    if self.num_kv_heads - sum(b) > main_max:
                        continue
                    tb = self.step_time_s(shape, tuple(b))
                    if tb < best_t:
                        best, best_t = b, tb
            if best is None:
                break
            a, t = best, best_t
        return tuple(a)

    def move_time_s(self, new: tuple[int, ...], used_tokens: int) -> float:
        """Moving the KV of the heads that change holder (``used_tokens`` tokens each); transfers to or
        from the main use the worker's link, between workers the cluster's link, one after another."""
        if new == self.assignment:
            return 0.0
        per_head = used_tokens * self.head_token_bytes
        t = 0.0
        gains = [(i, n - o) for i, (o, n) in enumerate(zip(self.assignment, new))]
        senders = [(i, -d) for i, d in gains if d < 0]
        takers = [(i, d) for i, d in gains if d > 0]
        main_delta = sum(self.assignment) - sum(new)  # > 0: heads come back to the main
        if main_delta > 0:
            takers.append((-1, main_delta))
        elif main_delta < 0:
            senders.append((-1, -main_delta))
        for si, sn in senders:
            for ti, tn in takers:
                n = min(sn, tn)
                if n <= 0:
                    continue
                link = self._link(si, ti)
                t += link.latency_s + n * per_head / link.bandwidth_bytes_per_s
                sn -= n
                takers = [(i, d - n) if i == ti else (i, d) for i, d in takers]
        return t

    def _link(self, a: int, b: int) -> LinkSpec:
        if a == -1:
            return self.workers[b].link
        if b == -1 or self.link_between is None:
            return self.workers[a].link
        return self.link_between(self.workers[a].name, self.workers[b].name)

    def apply(self, new: tuple[int, ...], used_tokens: int) -> float:
        t = self.move_time_s(new, used_tokens)
        if new != self.assignment:
            moved = sum(abs(n - o) for o, n in zip(self.assignment, new))
            self.moved_bytes += moved * used_tokens * self.head_token_bytes
            self.num_redispatches += 1
            self.assignment = new
        return t


class HetisDeployment(DPDeployment):
    """Main instances with attention workers, plus optional plain (``mixed``) replicas; requests are routed
    among instances as in DP."""

    strategy = "hetis"

    def __init__(
        self,
        plans: list[InstancePlan],
        link_between: Any,
        params: dict[str, Any] | None = None,
        dispatchers: dict[str, HeadDispatcher] | None = None,
    ) -> None:
        super().__init__(plans, link_between, params)
        self.dispatchers = dict(dispatchers or {})
        for name in self.dispatchers:
            if self.plans[name].role != "main":
                raise ValueError(f"instance {name!r} has attention workers but role {self.plans[name].role!r}")
        self.redispatch_every_steps = int(self.params.get("redispatch_every_steps", 64))
        self._steps: dict[str, int] = {n: 0 for n in self.dispatchers}
        self._penalty_s: dict[str, float] = {n: 0.0 for n in self.dispatchers}
        self.redispatch_log: list[dict[str, Any]] = []

    def stage_times_s(self, name: str, so: SchedulerOutput, serial: bool = False) -> list[float]:
        d = self.dispatchers.get(name)
        if d is None:
            return super().stage_times_s(name, so, serial)
        t = d.step_time_s(batch_shape(so)) + self._penalty_s[name]
        self._penalty_s[name] = 0.0
        return [t]

    def on_step_done(self, name: str, views: dict[str, InstanceView], now_s: float) -> None:
        d = self.dispatchers.get(name)
        if d is None or self.redispatch_every_steps <= 0:
            return
        self._steps[name] += 1
        if self._steps[name] % self.redispatch_every_steps:
            return
        view = views[name]
        running = view.scheduler.running
        if not running:
            return
        ctx = sum(r.num_computed_tokens for r in running)
        shape = BatchShape((), len(running), ctx)
        plan = view.plan
        pool_tokens = (plan.num_kv_blocks - 1) * plan.block_size
        new = d.rebalance(shape, pool_tokens)
        if new == d.assignment:
            return
        used_tokens = (plan.num_kv_blocks - 1 - view.scheduler.kv.pool.num_free_blocks) * plan.block_size
        gain_s = (d.step_time_s(shape) - d.step_time_s(shape, new)) * self.redispatch_every_steps
        move_s = d.move_time_s(new, used_tokens)
        if gain_s <= move_s:
            return
        old = d.assignment
        self._penalty_s[name] += d.apply(new, used_tokens)
        self.redispatch_log.append(
            {"time_s": now_s, "instance": name, "from": list(old), "to": list(new), "move_s": move_s}
        )

    def describe(self) -> dict[str, Any]:
        out = super().describe()
        for inst in out["instances"]:
            d = self.dispatchers.get(inst["name"])
            if d is not None:
                inst["workers"] = [{"device": w.name, "kv_heads": h} for w, h in zip(d.workers, d.assignment)]
                inst["num_redispatches"] = d.num_redispatches
        return out
