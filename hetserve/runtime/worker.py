"""A worker process per device: owns one instance's ``ModelRunner`` (the real KV tensors) and answers typed
control messages from the coordinator over a pipe.

Every message is a msgspec Struct serialised as MessagePack by ``encode_cmd`` / ``encode_reply`` (the step
dataclasses ``SchedulerOutput`` / ``ModelRunnerOutput`` are plain data, so they travel as they are); the pipe
carries length-prefixed bytes only (a socket pair; the worker is a ``python -m hetserve.runtime.worker``
subprocess, so nothing from ``multiprocessing``, whose pipes would pickle). The worker handles one message at a time,
in order: a KV insert sent before a step is written before that step runs, which is what lets the coordinator
give up on a late transfer and reuse its blocks safely.

Pacing (``speed`` < 1, emulation declared in the cluster file as ``paced_cpu``): the computation is real; the
worker then sleeps so that a step takes ``measured / speed``, as a device of that relative speed would.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import sys
import time
from typing import Any, Union

import msgspec

from hetserve.core.errors import HetserveError
from hetserve.core.outputs import ModelRunnerOutput, SchedulerOutput
from hetserve.runtime.kv_layout import KVDescriptor


class WorkerDied(HetserveError):
    """A worker process exited, closed its pipe or stopped answering."""


class WorkerSpec(msgspec.Struct, frozen=True):
    """Everything a worker needs to build its instance's model runner."""

    name: str
    model: str
    block_size: int = 16
    num_blocks: int = 256
    dtype: str = "float32"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_model_len: int = 1024
    # relative speed of the emulated device (1.0: as fast as this CPU process runs)
    speed: float = 1.0
    # test hook: seconds an ExtractKV waits before answering (a stalled link)
    kv_stall_s: float = 0.0
    torch_threads: int = 1
    seed: int = 0


class _Cmd(msgspec.Struct, tag_field="type"):
    seq: int


class Execute(_Cmd, tag="execute"):
    so: SchedulerOutput


class ExtractKV(_Cmd, tag="extract_kv"):
    """Copy a request's first ``num_tokens`` tokens' KV out of ``block_ids`` and convert it to ``wire``."""

    transfer_id: str
    block_ids: list[int]
    num_tokens: int
    wire: KVDescriptor


class InsertKV(_Cmd, tag="insert_kv"):
    """Convert a payload in ``wire`` format to this worker's cache format and write it into ``block_ids``."""

    transfer_id: str
    block_ids: list[int]
    num_tokens: int
    wire: KVDescriptor
    head_start: int
    shapes: list[list[int]]
    buffers: list[bytes]


class Ping(_Cmd, tag="ping"):
    pass


class Shutdown(_Cmd, tag="shutdown"):
    pass


class Ready(_Cmd, tag="ready"):
    num_kv_blocks: int
    desc: KVDescriptor
    pid: int


class StepDone(_Cmd, tag="step_done"):
    ro: ModelRunnerOutput
    step_s: float


class KVOut(_Cmd, tag="kv_out"):
    transfer_id: str
    ok: bool
    error: str = ""
    wire: KVDescriptor | None = None
    head_start: int = 0
    shapes: list[list[int]] = []
    buffers: list[bytes] = []


class KVIn(_Cmd, tag="kv_in"):
    transfer_id: str
    ok: bool
    error: str = ""


class Pong(_Cmd, tag="pong"):
    pass


class Failed(_Cmd, tag="failed"):
    """A command raised; the worker keeps running (the coordinator decides)."""

    error: str


Command = Union[Execute, ExtractKV, InsertKV, Ping, Shutdown]  # noqa: UP007 - msgspec needs a real Union
Reply = Union[Ready, StepDone, KVOut, KVIn, Pong, Failed]  # noqa: UP007

_enc = msgspec.msgpack.Encoder()
_cmd_dec = msgspec.msgpack.Decoder(Command)
_reply_dec = msgspec.msgpack.Decoder(Reply)


def encode_msg(msg: msgspec.Struct) -> bytes:
    return _enc.encode(msg)


def decode_cmd(data: bytes) -> Any:
    return _cmd_dec.decode(data)


def decode_reply(data: bytes) -> Any:
    return _reply_dec.decode(data)


class Channel:
    """Length-prefixed byte messages over one end of a socket pair."""

    _HEAD = struct.Struct("!Q")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def send_bytes(self, data: bytes) -> None:
        self.sock.sendall(self._HEAD.pack(len(data)) + data)

    def _exact(self, n: int) -> bytes:
        chunks, got = [], 0
        while got < n:
            c = self.sock.recv(min(n - got, 1 << 20))
            if not c:
                raise EOFError("the peer closed the channel")
            chunks.append(c)
            got += len(c)
        return b"".join(chunks)

    def recv_bytes(self) -> bytes:
        (n,) = self._HEAD.unpack(self._exact(self._HEAD.size))
        return self._exact(n)

    def poll(self, timeout_s: float) -> bool:
        if self.sock.fileno() < 0:
            raise EOFError("closed")
        r, _, _ = select.select([self.sock], [], [], max(0.0, timeout_s))
        return bool(r)

    def close(self) -> None:
        self.sock.close()


def wait_readable(channels: list[Channel], timeout_s: float) -> list[Channel]:
    if not channels:
        return []
    r, _, _ = select.select(channels, [], [], max(0.0, timeout_s))
    return r


# ---- inside the worker process ------------------------------------------------------------------------
def runner_descriptor(spec: WorkerSpec, num_layers: int, num_kv_heads: int, head_dim: int) -> KVDescriptor:
    """The ModelRunner's cache: layer-major NHD, one tensor ``[2, B, block, H, D]`` per layer."""
    return KVDescriptor(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                        block_size=spec.block_size, dtype=spec.dtype, layout="NHD",  # type: ignore[arg-type]
                        arrangement="layer_major")


def _worker_main(conn: Channel) -> None:
    import torch

    from hetserve.core.config import EngineConfig
    from hetserve.engine.runner import ModelRunner
    from hetserve.runtime.kv_convert import TORCH_DTYPES, KVPayload, convert
    from hetserve.runtime.kv_transfer import extract_blocks, insert_blocks

    spec = msgspec.msgpack.decode(conn.recv_bytes(), type=WorkerSpec)
    torch.set_num_threads(spec.torch_threads)
    cfg = EngineConfig.from_kwargs(
        spec.model, block_size=spec.block_size, num_blocks=spec.num_blocks, dtype=spec.dtype, device="cpu",
        max_num_seqs=spec.max_num_seqs, max_num_batched_tokens=spec.max_num_batched_tokens,
        max_model_len=spec.max_model_len, enable_prefix_caching=False, seed=spec.seed,
    )
    runner = ModelRunner(cfg)
    mc = runner.model_config
    desc = runner_descriptor(spec, mc.num_hidden_layers, mc.num_key_value_heads, mc.head_dim)
    conn.send_bytes(encode_msg(Ready(seq=0, num_kv_blocks=runner.num_kv_blocks, desc=desc, pid=os.getpid())))
    while True:
        try:
            cmd = decode_cmd(conn.recv_bytes())
        except (EOFError, OSError):
            return  # the coordinator went away: nothing to answer to
        try:
            if isinstance(cmd, Shutdown):
                return
            if isinstance(cmd, Ping):
                reply: msgspec.Struct = Pong(seq=cmd.seq)
            elif isinstance(cmd, Execute):
                t0 = time.perf_counter()
                ro = runner.execute(cmd.so)
                dt = time.perf_counter() - t0
                if spec.speed < 1.0:
                    time.sleep(dt * (1.0 / spec.speed - 1.0))
                reply = StepDone(seq=cmd.seq, ro=ro, step_s=time.perf_counter() - t0)
            elif isinstance(cmd, ExtractKV):
                if spec.kv_stall_s > 0:
                    time.sleep(spec.kv_stall_s)
                src = extract_blocks(runner.kv_caches, cmd.block_ids, cmd.num_tokens, desc)
                p = convert(src, desc, cmd.wire, cmd.num_tokens)
                bufs = [t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() for t in p.tensors]
                reply = KVOut(seq=cmd.seq, transfer_id=cmd.transfer_id, ok=True, wire=p.desc,
                              head_start=p.head_start, shapes=[list(t.shape) for t in p.tensors], buffers=bufs)
            elif isinstance(cmd, InsertKV):
                dt_ = TORCH_DTYPES[cmd.wire.dtype]
                tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8).view(dt_).view(s)
                           for b, s in zip(cmd.buffers, cmd.shapes, strict=True)]
                payload = KVPayload(cmd.wire, cmd.num_tokens, tensors, cmd.head_start, None)
                kv = convert(payload, cmd.wire, desc, cmd.num_tokens)
                insert_blocks(runner.kv_caches, cmd.block_ids, kv, desc)
                reply = KVIn(seq=cmd.seq, transfer_id=cmd.transfer_id, ok=True)
            else:
                reply = Failed(seq=cmd.seq, error=f"unknown command {type(cmd).__name__}")
        except Exception as e:  # noqa: BLE001 - reported to the coordinator, which decides
            if isinstance(cmd, ExtractKV):
                reply = KVOut(seq=cmd.seq, transfer_id=cmd.transfer_id, ok=False, error=f"{type(e).__name__}: {e}")
            elif isinstance(cmd, InsertKV):
                reply = KVIn(seq=cmd.seq, transfer_id=cmd.transfer_id, ok=False, error=f"{type(e).__name__}: {e}")
            else:
                reply = Failed(seq=cmd.seq, error=f"{type(e).__name__}: {e}")
        try:
            conn.send_bytes(encode_msg(reply))
        except (BrokenPipeError, OSError):
            return


# ---- the coordinator's handle ---------------------------------------------------------------------------
class WorkerHandle:
    """A started worker process and its end of the pipe. ``start`` blocks until the worker is ready."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        parent, self._child = socket.socketpair()
        self.conn = Channel(parent)
        self.process: _Process | None = None
        self._seq = 0
        self.dead_reason: str | None = None
        self.num_kv_blocks = 0
        self.desc: KVDescriptor | None = None

    def launch(self) -> WorkerHandle:
        """Start the process without waiting for it (several workers then load in parallel)."""
        fd = self._child.fileno()
        self.process = _Process(subprocess.Popen(
            [sys.executable, "-m", "hetserve.runtime.worker", str(fd)], pass_fds=(fd,), close_fds=True,
        ))
        self._child.close()
        self.conn.send_bytes(encode_msg(self.spec))
        return self

    def wait_ready(self, timeout_s: float = 120.0) -> Ready:
        ready = self.recv(timeout_s)
        if not isinstance(ready, Ready):
            raise WorkerDied(f"worker {self.spec.name} did not start: {ready}")
        self.num_kv_blocks, self.desc = ready.num_kv_blocks, ready.desc
        return ready

    def start(self, timeout_s: float = 120.0) -> WorkerHandle:
        self.launch().wait_ready(timeout_s)
        return self

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def send(self, cmd: msgspec.Struct) -> None:
        try:
            self.conn.send_bytes(encode_msg(cmd))
        except (BrokenPipeError, OSError, EOFError) as e:
            self.dead_reason = self.dead_reason or f"pipe to worker {self.spec.name} broke: {e}"
            raise WorkerDied(self.dead_reason) from None

    def recv(self, timeout_s: float) -> Any:
        """The next reply, or WorkerDied when the worker exited or stayed silent for ``timeout_s``."""
        try:
            if not self.conn.poll(timeout_s):
                if not self.process.is_alive():
                    self.dead_reason = f"worker {self.spec.name} exited (code {self.process.exitcode})"
                else:
                    self.dead_reason = f"worker {self.spec.name} did not answer within {timeout_s:.1f} s"
                raise WorkerDied(self.dead_reason)
            return decode_reply(self.conn.recv_bytes())
        except (EOFError, OSError, BrokenPipeError):
            self.dead_reason = f"worker {self.spec.name} exited (code {self.process.exitcode})"
            raise WorkerDied(self.dead_reason) from None

    def alive(self) -> bool:
        return self.dead_reason is None and self.process is not None and self.process.is_alive()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Shut down politely, then terminate, then kill: never leaves an orphan."""
        if self.process is None:
            return
        if self.process.is_alive():
            try:
                self.conn.send_bytes(encode_msg(Shutdown(seq=self.next_seq())))
            except (BrokenPipeError, OSError):
                pass
            self.process.join(timeout_s)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(2.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(2.0)
        try:
            self.conn.close()
        except OSError:
            pass
        if self.dead_reason is None:
            self.dead_reason = "stopped"


class _Process:
    """The few process calls the coordinator needs, over ``subprocess.Popen``."""

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self.pid = popen.pid

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()

    def join(self, timeout_s: float | None = None) -> None:
        try:
            self.popen.wait(timeout_s)
        except subprocess.TimeoutExpired:
            pass

    def terminate(self) -> None:
        if self.is_alive():
            self.popen.terminate()

    def kill(self) -> None:
        if self.is_alive():
            self.popen.kill()


if __name__ == "__main__":
    _worker_main(Channel(socket.socket(fileno=int(sys.argv[1]))))
