"""The step loop: schedule -> execute -> update. Plain data in, plain data out."""

from __future__ import annotations

from hetserve.core.interfaces import Executor
from hetserve.core.outputs import EngineCoreOutput
from hetserve.engine.sched.scheduler import Scheduler


class EngineCore:
    def __init__(self, scheduler: Scheduler, executor: Executor) -> None:
        self.scheduler = scheduler
        self.executor = executor

    def step(self) -> list[EngineCoreOutput]:
        step = self.scheduler.schedule()
        if step.is_empty and not step.finished_req_ids and not step.preempted_req_ids:
            return []
        result = self.executor.execute(step)
        return self.scheduler.update_from_output(step, result)
