"""The coordinator's side of Hetis in a ``ClusterEngine``: what each main worker is told at launch, and the
re-dispatch decisions taken between its steps.

After every step of a Hetis main instance the strategy object decides, exactly as in the simulator
(``HetisDeployment.on_step_done`` -> ``HeadDispatcher.rebalance`` / ``apply``); when the dispatcher's
assignment differs from the one the worker holds, a :class:`Redispatch` (with the blocks in use) goes to the
worker before its next step (the worker handles commands in order). :meth:`HetisControl.force` is the test
hook: a given assignment at a given step of an instance. A failed re-dispatch (an attention worker gone) drops
the instance like any dead worker: its requests are retried elsewhere or fail.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from hetserve.core.errors import ValidationError
from hetserve.runtime.hetis_messages import AttnWorkerConf, HetisInfo, HetisQuery, HetisSpec, Redispatch
from hetserve.strategies.base import Deployment, InstanceView
from hetserve.strategies.hetis import HeadDispatcher


class HetisControl:
    def __init__(self, deployment: Deployment, speeds: dict[str, float] | None = None,
                 recv_timeout_s: float = 30.0, envs: dict[str, dict[str, str]] | None = None) -> None:
        self.deployment = deployment
        self.envs = dict(envs or {})  # device id -> extra environment of the attention worker there
        self.dispatchers: dict[str, HeadDispatcher] = dict(getattr(deployment, "dispatchers", None) or {})
        self.speeds = dict(speeds or {})
        self.recv_timeout_s = recv_timeout_s
        self.held = {n: tuple(d.assignment) for n, d in self.dispatchers.items()}  # what the worker holds
        self.steps = {n: 0 for n in self.dispatchers}
        self.forced: dict[str, dict[int, tuple[int, ...]]] = {n: {} for n in self.dispatchers}
        self.info: dict[str, HetisInfo] = {}
        self.log: list[dict[str, Any]] = []

    def worker_spec(self, name: str) -> HetisSpec | None:
        """``WorkerSpec.hetis`` for instance ``name`` (None: not a Hetis main)."""
        d = self.dispatchers.get(name)
        if d is None:
            return None
        confs = [
            AttnWorkerConf(device_id=w.name, device="cpu" if w.cost.device.vendor == "cpu" else "auto",
                           speed=float(self.speeds.get(w.name, 1.0)), env=dict(self.envs.get(w.name, {})))
            for w in d.workers
        ]
        return HetisSpec(workers=confs, assignment=list(d.assignment), recv_timeout_s=self.recv_timeout_s)

    def start(self, instances: dict[str, Any], timeout_s: float = 30.0) -> None:
        """Ask each ready Hetis main for its split (nothing else is in flight yet)."""
        for name in self.dispatchers:
            inst = instances[name]
            inst.worker.send(HetisQuery(seq=inst.worker.next_seq()))
            reply = inst.worker.recv(timeout_s)
            if not isinstance(reply, HetisInfo) or not reply.ok:
                raise RuntimeError(f"Hetis main {name} did not report its split: {reply}")
            self.info[name] = reply

    def force(self, name: str, at_step: int, assignment: tuple[int, ...] | list[int]) -> None:
        """Test hook: after step ``at_step`` of ``name`` (counted from 1 since start), move to ``assignment``."""
        d = self.dispatchers.get(name)
        if d is None:
            raise ValidationError("instance", f"{name!r} is not a Hetis main instance")
        a = tuple(int(x) for x in assignment)
        if len(a) != len(d.workers) or any(x < 0 for x in a) or sum(a) > d.num_kv_heads:
            raise ValidationError("assignment", f"{list(a)} does not fit {len(d.workers)} workers and "
                                                f"{d.num_kv_heads} KV heads")
        self.forced[name][at_step] = a

    def on_step_done(self, inst: Any, views: dict[str, InstanceView], on_dead: Callable[[Any, str], None]) -> None:
        name = inst.name
        d = self.dispatchers.get(name)
        if d is None or not inst.alive:
            return
        self.steps[name] += 1
        sched = inst.scheduler
        blocks = sorted({blk.block_id for table in sched.kv.req_to_blocks.values() for blk in table})
        forced = self.forced[name].pop(self.steps[name], None)
        if forced is not None:
            d.apply(forced, len(blocks) * sched.block_size)
        else:
            self.deployment.on_step_done(name, views, time.monotonic())
        new = tuple(d.assignment)
        if new == self.held[name]:
            return
        self.log.append({"instance": name, "step": self.steps[name], "from": list(self.held[name]),
                         "to": list(new), "num_blocks": len(blocks), "forced": forced is not None})
        self.held[name] = new
        try:
            inst.worker.send(Redispatch(seq=inst.worker.next_seq(), assignment=list(new), block_ids=blocks))
        except Exception as e:  # noqa: BLE001 - WorkerDied: handled as any dead worker
            on_dead(inst, str(e))

    def on_info(self, inst: Any, reply: HetisInfo, on_dead: Callable[[Any, str], None]) -> None:
        if not reply.ok:
            on_dead(inst, f"Hetis re-dispatch on {inst.name} failed: {reply.error}")
            return
        self.info[inst.name] = reply
        if self.log and self.log[-1]["instance"] == inst.name:
            self.log[-1].update(moved_bytes=reply.moved_bytes, redispatch_s=reply.redispatch_s)
