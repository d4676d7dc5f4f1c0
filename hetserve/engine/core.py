"""The step loop: schedule -> execute -> update. Plain data in, plain data out.

With async scheduling (an executor with ``execute_async``), one step stays in flight: ``step()`` schedules and
launches step N+1 first, then waits for step N and books its tokens, so the host's scheduling and input
preparation overlap the device's work. A decode in step N+1 whose token comes from step N is scheduled on a
placeholder (``ScheduledRequest.placeholder``) that the executor fills on the device; requests whose sampling
needs the previous token on the host wait one step instead (``Request.may_run_ahead``). Outputs come one
``step()`` call later than without it; a request that stops in step N (EOS, a stop string) wastes its slot in
step N+1, whose token for it is dropped.
"""

from __future__ import annotations

from typing import Any

from hetserve.core.interfaces import Executor
from hetserve.core.outputs import EngineCoreOutput, SchedulerOutput
from hetserve.engine.sched.scheduler import Scheduler


class EngineCore:
    def __init__(self, scheduler: Scheduler, executor: Executor, async_scheduling: bool | None = False) -> None:
        """``async_scheduling``: True / False, or None for auto: on where the executor's device works while the
        host does (``executor.overlaps_host``; a CPU runner computes on the host itself, so scheduling ahead would
        only delay its outputs)."""
        self.scheduler = scheduler
        self.executor = executor
        if async_scheduling is None:
            async_scheduling = bool(getattr(executor, "overlaps_host", False))
        self.async_scheduling = async_scheduling and callable(getattr(executor, "execute_async", None))
        scheduler.async_scheduling = self.async_scheduling
        self._in_flight: tuple[SchedulerOutput, Any] | None = None

    @property
    def has_step_in_flight(self) -> bool:
        return self._in_flight is not None

    def step(self) -> list[EngineCoreOutput]:
        if not self.async_scheduling:
            step = self.scheduler.schedule()
            if step.is_empty and not step.finished_req_ids and not step.preempted_req_ids:
                return []
            result = self.executor.execute(step)
            return self.scheduler.update_from_output(step, result)
        step = self.scheduler.schedule()
        launched = None
        if not (step.is_empty and not step.finished_req_ids and not step.preempted_req_ids):
            launched = (step, self.executor.execute_async(step))  # type: ignore[attr-defined]
        previous, self._in_flight = self._in_flight, launched
        if previous is None:
            return []
        return self.scheduler.update_from_output(previous[0], previous[1].result())
