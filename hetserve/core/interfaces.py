"""Small abstract classes for the extension points that live above the core.

Each concrete class is registered by name in one place (see hetserve.core.registry).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from hetserve.core.outputs import ModelRunnerOutput, SchedulerOutput


class Executor(ABC):
    """Runs one step. Contract: for every ``ScheduledRequest`` in the step, writes the KV of its
    ``token_ids`` into its blocks; when ``sample`` is set, returns one sampled token for it (empty list
    otherwise). ``req_ids`` in the result follow the order of ``scheduled``. Forgets requests named in
    ``finished_req_ids`` and ``preempted_req_ids`` before running the step. Never mutates the step."""

    @property
    @abstractmethod
    def num_kv_blocks(self) -> int:
        """Blocks in this executor's KV pool, block 0 (the null block) included."""

    @abstractmethod
    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput: ...

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Release devices and processes."""
