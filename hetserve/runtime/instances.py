"""An instance's worker processes, as the coordinator sees them: one per (pipeline stage, TP rank).

``worker_specs`` lays an ``InstancePlan`` out as workers: its stage layer ranges (``stage_costs[i].layers``)
times its TP degree (``cost.tp``), stage-major. A TP group rendezvous at a TCP store on a port chosen here
(each group its own); stage ``s + 1`` listens for stage ``s``'s hidden states on another (same TP rank), with a
per-instance random token. Every worker receives every step (``send_all``); only the last stage's TP rank 0
answers it (``Instance.worker``), so the coordinator's books see one reply per step as for a single worker. A
pipeline keeps up to ``num_stages`` steps in flight (``in_flight`` is a FIFO: steps finish in order).

Any worker of the group failing (exit, a ``Failed`` reply, silence) takes the whole instance down: its stages
cannot run without each other.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from hetserve.core.config import CacheConfig, SchedulerConfig
from hetserve.core.errors import ValidationError
from hetserve.core.model_config import ModelConfig
from hetserve.core.outputs import SchedulerOutput
from hetserve.engine.sched.scheduler import Scheduler
from hetserve.runtime.kv_layout import KVDescriptor
from hetserve.runtime.stage_link import free_port
from hetserve.runtime.worker import Ready, Shutdown, WorkerDied, WorkerHandle, WorkerSpec, encode_msg
from hetserve.strategies.base import InstancePlan


@dataclass(frozen=True)
class InstanceOptions:
    """How one instance's workers run. ``kv_layout`` is the layout the device declares for received KV."""

    dtype: str = "float32"
    speed: float = 1.0
    kv_layout: str = "NHD"
    kv_stall_s: float = 0.0
    device: str = "cpu"
    # per device of the instance (a pipeline's stages, a TP group's ranks, in order); empty: ``speed`` for all
    speeds: tuple[float, ...] = ()
    load_format: str = "auto"
    # per device of the instance, like ``speeds``: extra environment of its worker (MPS share, memory cap)
    envs: tuple[dict[str, str], ...] = ()

    def speed_of(self, i: int) -> float:
        return self.speeds[i % len(self.speeds)] if self.speeds else self.speed

    def env_of(self, i: int) -> dict[str, str]:
        return dict(self.envs[i % len(self.envs)]) if self.envs else {}


@dataclass
class Instance:
    name: str
    scheduler: Scheduler
    workers: list[WorkerHandle]  # workers[stage * tp + rank]
    descs: list[KVDescriptor]  # each worker's cache: its stage's layers, its rank's heads
    desc: KVDescriptor  # the instance's cache as a whole (every layer; tp_size ranks)
    declared: KVDescriptor  # what the device asks received KV to arrive as
    num_stages: int = 1
    tp: int = 1
    # (answering worker's seq, step, sent at): oldest first
    in_flight: deque[tuple[int, SchedulerOutput, float]] = field(default_factory=deque)
    max_in_flight_seen: int = 0
    # async scheduling (one worker: no PP, no TP, not a Hetis main): one more step is sent while the worker
    # runs the current one, its decodes on placeholders the worker's runner fills from its last tokens
    lookahead: bool = False
    last_reply_s: float = field(default_factory=time.monotonic)
    ping_sent_s: float | None = None
    pongs_due: int = 0
    alive: bool = True

    @property
    def worker(self) -> WorkerHandle:
        """The worker that answers steps (last stage, TP rank 0); a single-worker instance's only one."""
        return self.workers[(self.num_stages - 1) * self.tp]

    def layer_range(self, i: int) -> tuple[int, int]:
        start = self.workers[i].spec.layer_start
        return start, start + self.descs[i].num_layers

    def send_all(self, make: Any) -> list[int]:
        """Send ``make(seq)`` to every worker (each numbers its own commands); the seqs used, in worker order.
        Raises WorkerDied naming the worker whose pipe broke."""
        seqs = []
        for w in self.workers:
            seq = w.next_seq()
            w.send(make(seq))
            seqs.append(seq)
        return seqs

    def dead_worker(self) -> str | None:
        """Why a worker of the group is gone (None while all run)."""
        for w in self.workers:
            if not w.alive():
                code = None if w.process is None else w.process.exitcode
                return (
                    w.dead_reason
                    if w.dead_reason not in (None, "stopped")
                    else f"worker {w.spec.name} exited (code {code})"
                )
        return None

    def stop(self, timeout_s: float) -> None:
        stop_workers(self.workers, timeout_s)


def stop_workers(workers: list[WorkerHandle], timeout_s: float) -> None:
    """Ask every worker to shut down first, then stop each (so their exits overlap instead of queueing)."""
    for w in workers:
        if w.conn is not None and w.process is not None and w.process.is_alive():
            try:
                w.conn.send_bytes(encode_msg(Shutdown(seq=w.next_seq())))
            except OSError:
                pass
    for w in workers:
        w.stop(timeout_s)


def worker_name(instance: str, stage: int, rank: int, num_stages: int, tp: int) -> str:
    """A single-worker instance's worker carries the instance's name; others add stage and rank."""
    if num_stages == 1 and tp == 1:
        return instance
    return f"{instance}.s{stage}r{rank}" if tp > 1 else f"{instance}.s{stage}"


def worker_devices(plan: InstancePlan) -> dict[str, str]:
    """Worker name -> the device id it runs on: stage ``s`` rank ``r`` on the plan's device ``s * tp + r``."""
    tp, ids = plan.cost.tp, plan.device_ids
    return {
        worker_name(plan.name, s, r, plan.num_stages, tp): ids[(s * tp + r) % len(ids)]
        for s in range(plan.num_stages)
        for r in range(tp)
    }


def worker_specs(
    plan: InstancePlan,
    model: str,
    model_config: ModelConfig,
    opt: InstanceOptions,
    max_model_len: int,
    host: str = "127.0.0.1",
    **extra: Any,
) -> list[WorkerSpec]:
    """The workers of ``plan``, stage-major; ``extra`` goes to every spec (e.g. Hetis' ``hetis``)."""
    from hetserve.engine.model.parallel import check_tp

    tp = plan.cost.tp
    try:
        check_tp(model_config, tp)
    except ValidationError as e:
        raise ValidationError(f"{plan.name}.tp", e.message) from None
    ranges = [c.layers for c in plan.stage_costs]
    num_stages = len(ranges)
    token = secrets.token_hex(16) if num_stages > 1 else ""
    listen = [[f"{host}:{free_port(host)}" if s > 0 else "" for _ in range(tp)] for s in range(num_stages)]
    stores = [f"{host}:{free_port(host)}" if tp > 1 else "" for _ in range(num_stages)]
    specs = []
    for s, (start, end) in enumerate(ranges):
        for r in range(tp):
            specs.append(
                WorkerSpec(
                    name=worker_name(plan.name, s, r, num_stages, tp),
                    model=model,
                    block_size=plan.block_size,
                    num_blocks=plan.num_kv_blocks,
                    dtype=opt.dtype,
                    max_num_seqs=plan.max_num_seqs,
                    max_num_batched_tokens=plan.max_num_batched_tokens,
                    max_model_len=max_model_len,
                    speed=opt.speed_of(s * tp + r),
                    kv_stall_s=opt.kv_stall_s,
                    device=opt.device,
                    load_format=opt.load_format,
                    env=opt.env_of(s * tp + r),
                    layer_start=start,
                    layer_end=end,
                    tp_rank=r,
                    tp_size=tp,
                    tp_store=stores[s],
                    pp_listen=listen[s][r],
                    pp_next=listen[s + 1][r] if s + 1 < num_stages else "",
                    pp_token=token,
                    **extra,
                )
            )
    return specs


def make_instance(
    plan: InstancePlan, workers: list[WorkerHandle], readies: list[Ready], opt: InstanceOptions, max_model_len: int
) -> Instance:
    """The coordinator's instance over started workers: its scheduler (the smallest KV pool of its workers)
    and its descriptors."""
    tp = plan.cost.tp
    num_blocks = min(w.num_kv_blocks for w in workers)
    sched = Scheduler(
        SchedulerConfig(max_num_batched_tokens=plan.max_num_batched_tokens, max_num_seqs=plan.max_num_seqs),
        CacheConfig(block_size=plan.block_size, num_blocks=num_blocks, enable_prefix_caching=False),
        num_blocks,
        max_model_len,
    )
    descs = [r.desc for r in readies]
    num_layers = sum(d.num_layers for d in descs[::tp])
    whole = dataclasses.replace(descs[0], num_layers=num_layers, tp_rank=0)
    declared = dataclasses.replace(whole, layout=opt.kv_layout)  # type: ignore[arg-type]
    return Instance(plan.name, sched, workers, descs, whole, declared, num_stages=plan.num_stages, tp=tp)


def launch_all(
    plans: dict[str, InstancePlan],
    specs: dict[str, list[WorkerSpec]],
    options: dict[str, InstanceOptions],
    max_model_len: int,
    placement: Any = None,
    timeout_s: float = 120.0,
) -> dict[str, Instance]:
    """Start every worker of every instance (they load in parallel), then wait for each to be ready. On any
    failure every started worker is stopped and the error re-raised."""
    handles: dict[str, list[WorkerHandle]] = {}
    try:
        for name, ss in specs.items():
            handles[name] = [WorkerHandle(s, placement).launch() for s in ss]
        out = {}
        for name, hs in handles.items():
            readies = []
            for h in hs:
                try:
                    readies.append(h.wait_ready(timeout_s))
                except WorkerDied as e:
                    raise WorkerDied(f"instance {name}: {e}") from None
            out[name] = make_instance(plans[name], hs, readies, options.get(name, InstanceOptions()), max_model_len)
        return out
    except BaseException:
        stop_workers([h for hs in handles.values() for h in hs], 1.0)
        raise
