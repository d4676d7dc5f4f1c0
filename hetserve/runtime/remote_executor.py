"""An ``Executor`` whose steps run in a worker process: ``LLMEngine(config, executor=RemoteExecutor(spec))``."""

from __future__ import annotations

from hetserve.core.interfaces import Executor
from hetserve.core.outputs import ModelRunnerOutput, SchedulerOutput
from hetserve.runtime.worker import Execute, Failed, StepDone, WorkerDied, WorkerHandle, WorkerSpec


class RemoteExecutor(Executor):
    """Forwards each step to one worker and waits for its answer (at most ``step_timeout_s``; a dead or silent
    worker raises ``WorkerDied``)."""

    def __init__(self, spec: WorkerSpec, step_timeout_s: float = 60.0) -> None:
        self.handle = WorkerHandle(spec).start()
        self.step_timeout_s = step_timeout_s

    @property
    def num_kv_blocks(self) -> int:
        return self.handle.num_kv_blocks

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        seq = self.handle.next_seq()
        self.handle.send(Execute(seq=seq, so=scheduler_output))
        reply = self.handle.recv(self.step_timeout_s)
        if isinstance(reply, Failed):
            raise WorkerDied(f"worker {self.handle.spec.name} failed a step: {reply.error}")
        assert isinstance(reply, StepDone) and reply.seq == seq, f"out-of-order reply {reply}"
        return reply.ro

    def shutdown(self) -> None:
        self.handle.stop()
