"""MPS clients as emulated devices (``shared/GPU.md`` option 3): one process per device, its own CUDA context,
an SM share (``CUDA_MPS_ACTIVE_THREAD_PERCENTAGE``) and a real memory cap (``CUDA_MPS_PINNED_DEVICE_MEM_LIMIT``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hetserve.core.errors import ValidationError
from hetserve.device.emulation import EmulationError


class MpsDaemon:
    """``with MpsDaemon() as mps: p = mps.launch([...], thread_percentage=25)``: the control daemon runs for the
    block, with pipe and log directories of its own under ``root`` (a fresh temporary directory by default),
    and is told to quit on exit whatever happened inside. Clients must carry :meth:`client_env` to reach it.
    Processes not started with that environment use no MPS at all.

    ``visible_devices`` (``CUDA_VISIBLE_DEVICES`` of the daemon, best GPU UUIDs) puts only those GPUs under MPS,
    e.g. GPU1 of a pair whose GPU0 runs a whole-GPU worker; the daemon renumbers them from 0 for its clients, so a
    client names its GPU by UUID or not at all (NVIDIA's MPS guide, CUDA_VISIBLE_DEVICES). None: the daemon sees
    what this process sees.
    """

    def __init__(self, root: str | Path | None = None, control: str = "nvidia-cuda-mps-control",
                 timeout_s: float = 30.0, visible_devices: str | None = None) -> None:
        self.control = control
        self.timeout_s = timeout_s
        self.visible_devices = visible_devices
        self._root_given = root is not None
        self.root = Path(root) if root is not None else None
        self.started = False
        self._children: list[subprocess.Popen[Any]] = []

    @property
    def pipe_dir(self) -> Path:
        assert self.root is not None
        return self.root / "pipe"

    @property
    def log_dir(self) -> Path:
        assert self.root is not None
        return self.root / "log"

    def _env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        env = dict(os.environ if base is None else base)
        env["CUDA_MPS_PIPE_DIRECTORY"] = str(self.pipe_dir)
        env["CUDA_MPS_LOG_DIRECTORY"] = str(self.log_dir)
        return env

    def log_tail(self, num_chars: int = 2000) -> str:
        out = []
        if self.root is not None:
            for f in sorted(self.log_dir.glob("*.log")):
                try:
                    out.append(f"{f.name}: {f.read_text(errors='replace')[-num_chars:]}")
                except OSError:
                    pass
        return "\n".join(out)

    def start(self) -> MpsDaemon:
        if self.started:
            return self
        exe = shutil.which(self.control)
        if exe is None:
            raise EmulationError(f"MPS needs {self.control} on PATH (part of the NVIDIA driver utilities); not found")
        if self.root is None:
            self.root = Path(tempfile.mkdtemp(prefix="hetserve-mps-", dir="/tmp"))
        self.pipe_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = self._env()
        if self.visible_devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = self.visible_devices
        r = subprocess.run([exe, "-d"], env=env, capture_output=True, text=True, timeout=self.timeout_s, check=False)
        if r.returncode != 0:
            raise EmulationError(
                f"{self.control} -d exited {r.returncode}: {(r.stderr or r.stdout).strip()[-500:]} {self.log_tail(500)}"
            )
        self.started = True
        return self

    def client_env(
        self,
        thread_percentage: float | None = None,
        memory_limit_bytes: int | None = None,
        device_index: int = 0,
        base: Mapping[str, str] | None = None,
    ) -> dict[str, str]:
        """Environment of an MPS client limited to ``thread_percentage`` of the SMs and ``memory_limit_bytes``
        of device memory (device ordinals as the client sees them)."""
        env = self._env(base)
        if thread_percentage is not None:
            if not 0 < thread_percentage <= 100:
                raise ValidationError("thread_percentage", f"must be in (0, 100], got {thread_percentage}")
            env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = f"{thread_percentage:g}"
        if memory_limit_bytes is not None:
            env["CUDA_MPS_PINNED_DEVICE_MEM_LIMIT"] = f"{device_index}={max(1, memory_limit_bytes // 2**20)}M"
        return env

    def launch(
        self,
        argv: Sequence[str],
        thread_percentage: float | None = None,
        memory_limit_bytes: int | None = None,
        device_index: int = 0,
        extra_env: Mapping[str, str] | None = None,
        **popen_kwargs: Any,
    ) -> subprocess.Popen[Any]:
        """Start one client process; it is killed on exit if still running."""
        if not self.started:
            raise EmulationError("MpsDaemon.launch before start (use it as a context manager)")
        env = self.client_env(thread_percentage, memory_limit_bytes, device_index)
        if extra_env:
            env.update(extra_env)
        p = subprocess.Popen(list(argv), env=env, **popen_kwargs)
        self._children.append(p)
        return p

    def stop(self) -> None:
        """Kill clients still running, then ``quit`` the daemon and wait until its pid file is gone."""
        for p in self._children:
            if p.poll() is None:
                p.kill()
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass
        self._children.clear()
        if not self.started:
            return
        self.started = False
        exe = shutil.which(self.control) or self.control
        try:
            subprocess.run([exe], input="quit\n", env=self._env(), capture_output=True, text=True,
                           timeout=self.timeout_s, check=False)
        finally:
            pid_file = self.pipe_dir / "nvidia-cuda-mps-control.pid"
            deadline = time.monotonic() + self.timeout_s
            while pid_file.exists() and time.monotonic() < deadline:
                time.sleep(0.1)
            if not self._root_given and self.root is not None:
                shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> MpsDaemon:  # noqa: PYI034
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
