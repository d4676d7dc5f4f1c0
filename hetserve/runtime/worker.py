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

A pipeline stage or TP rank (``layer_start`` / ``layer_end``, ``tp_rank`` / ``tp_size``: ``shard.py``) is one
worker of a multi-worker instance: it runs every step it is sent, but only the last stage's TP rank 0 answers
it (``StepDone``); its KV commands act on its own layers and heads.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Union

import msgspec

from hetserve.core.errors import HetserveError
from hetserve.core.outputs import ModelRunnerOutput, SchedulerOutput
from hetserve.runtime.hetis_messages import HetisInfo, HetisQuery, HetisSpec, Redispatch
from hetserve.runtime.kv_layout import KVDescriptor
from hetserve.runtime.kv_messages import CancelKV, ExpectKV, KVIn, KVSent, SendKV

if TYPE_CHECKING:
    from hetserve.runtime.connect import Placement


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
    # Hetis main: attention workers holding some KV heads (hetis_main.py)
    hetis: HetisSpec | None = None
    # PP / TP (shard.py): this worker's layers [layer_start, layer_end) (None: to the last) and TP rank; the TP
    # group's store (host:port, rank 0 hosts it); the stage link: where to listen for the previous stage, where
    # the next stage listens, and the token both present
    device: str = "cpu"
    # "auto": the checkpoint's weights; "dummy": random weights made on the device from config.json (benchmarks
    # of shapes whose weights are not here)
    load_format: str = "auto"
    # extra environment of the worker process (an MPS client's thread share and memory cap)
    env: dict[str, str] = {}
    layer_start: int = 0
    layer_end: int | None = None
    tp_rank: int = 0
    tp_size: int = 1
    tp_store: str = ""
    tp_timeout_s: float = 60.0
    pp_listen: str = ""
    pp_next: str = ""
    pp_token: str = ""
    # direct KV hand-offs (kv_direct.py): the transport kinds this worker receives KV over (empty: KV goes
    # through the coordinator), and the host its tcp endpoint binds
    kv_transports: tuple[str, ...] = ()
    kv_host: str = "127.0.0.1"


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


class KVShard(msgspec.Struct):
    """Part of a request's KV in a ``wire`` format: one buffer per layer from ``layer_start``, global kv heads
    from ``head_start`` (what one sender worker extracted, cut to the receiver's layers)."""

    layer_start: int
    head_start: int
    shapes: list[list[int]]
    buffers: list[bytes]


class InsertKV(_Cmd, tag="insert_kv"):
    """Join ``shards`` (in ``wire`` format) into this worker's layers, heads and cache format and write them
    into ``block_ids``."""

    transfer_id: str
    block_ids: list[int]
    num_tokens: int
    wire: KVDescriptor
    shards: list[KVShard]


class Ping(_Cmd, tag="ping"):
    pass


class Shutdown(_Cmd, tag="shutdown"):
    pass


class Ready(_Cmd, tag="ready"):
    num_kv_blocks: int
    desc: KVDescriptor
    pid: int
    kv_addresses: dict[str, str] = {}  # transport kind -> this worker's KV endpoint (direct hand-offs)


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
    layer_start: int = 0  # the first layer of ``buffers`` (one per layer): the sender's pipeline stage


class Pong(_Cmd, tag="pong"):
    pass


class Failed(_Cmd, tag="failed"):
    """A command raised; the worker keeps running (the coordinator decides)."""

    error: str


# msgspec needs real Unions; Redispatch, HetisQuery, HetisInfo are Hetis commands (hetis_messages.py)
Command = Union[Execute, ExtractKV, InsertKV, SendKV, ExpectKV, CancelKV, Ping, Shutdown, Redispatch, HetisQuery]  # noqa: UP007
Reply = Union[Ready, StepDone, KVOut, KVIn, KVSent, Pong, Failed, HetisInfo]  # noqa: UP007

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
    from hetserve.runtime.shard import build_runner, extract_kv, insert_kv, local_descriptor

    spec = msgspec.msgpack.decode(conn.recv_bytes(), type=WorkerSpec)
    torch.set_num_threads(spec.torch_threads)
    cfg = EngineConfig.from_kwargs(
        spec.model, block_size=spec.block_size, num_blocks=spec.num_blocks, dtype=spec.dtype, device=spec.device,
        max_num_seqs=spec.max_num_seqs, max_num_batched_tokens=spec.max_num_batched_tokens,
        max_model_len=spec.max_model_len, enable_prefix_caching=False, seed=spec.seed,
        enforce_eager=spec.hetis is not None,  # a Hetis main's steps talk to other processes: no CUDA graphs
    )
    runner = build_runner(spec, cfg)  # ModelRunner(cfg) unless a pipeline stage or TP rank
    hetis = None
    if spec.hetis is not None:
        from hetserve.runtime.hetis_main import install

        hetis = install(runner, spec.hetis, spec.name)
    desc = local_descriptor(spec, runner)  # runner_descriptor's, for this worker's layers and heads
    lock = threading.Lock()  # the KV sender thread answers too

    def send_reply(msg: msgspec.Struct) -> None:
        with lock:
            conn.send_bytes(encode_msg(msg))

    direct = None
    if spec.kv_transports:
        from hetserve.runtime.kv_direct import DirectKV, open_endpoints

        direct = DirectKV(runner, desc, open_endpoints(spec.kv_transports, spec.kv_host), send_reply,
                          stall_s=spec.kv_stall_s, sink=spec.hetis is None)
        direct.install_layer_hooks()
    conn.send_bytes(encode_msg(Ready(seq=0, num_kv_blocks=runner.num_kv_blocks, desc=desc, pid=os.getpid(),
                                     kv_addresses=direct.addresses if direct is not None else {})))
    while True:
        try:
            if direct is not None:  # register KV that came ahead of its ExpectKV (streamed pieces)
                for done in direct.poll(0):
                    send_reply(done)
            while direct is not None and direct.busy and not conn.poll(0):
                for done in direct.poll(0.002):  # KV arriving for expected hand-offs, between commands
                    send_reply(done)
            cmd = decode_cmd(conn.recv_bytes())
        except (EOFError, OSError):
            return  # the coordinator went away: nothing to answer to
        try:
            if direct is not None and not isinstance(cmd, SendKV):
                direct.flush_sends()  # deferred sends go first: command order
            if isinstance(cmd, Shutdown):
                if direct is not None:
                    direct.close()
                return
            if isinstance(cmd, (SendKV, ExpectKV, CancelKV)):
                if direct is None:
                    raise ValueError("this worker has no KV endpoint (kv_transports is empty)")
                if isinstance(cmd, SendKV):
                    # sends queued back to back may share one message (kv_batch.py): wait while more are queued
                    direct.send(cmd, defer=True)
                    if not conn.poll(0):
                        direct.flush_sends()
                elif isinstance(cmd, ExpectKV):
                    direct.expect(cmd)
                else:
                    direct.cancel(cmd.transfer_id)
                continue
            if isinstance(cmd, Ping):
                reply: msgspec.Struct = Pong(seq=cmd.seq)
            elif isinstance(cmd, Execute):
                t0 = time.perf_counter()
                if direct is not None:
                    direct.begin_step()
                try:
                    ro = runner.execute(cmd.so)
                finally:
                    if direct is not None:
                        direct.end_step()
                dt = time.perf_counter() - t0
                if spec.speed < 1.0:
                    time.sleep(dt * (1.0 / spec.speed - 1.0))
                if not runner.samples:
                    continue  # another stage or TP rank of this instance answers the step
                reply = StepDone(seq=cmd.seq, ro=ro, step_s=time.perf_counter() - t0)
            elif isinstance(cmd, ExtractKV):
                if spec.kv_stall_s > 0:
                    time.sleep(spec.kv_stall_s)
                reply = extract_kv(runner, desc, cmd)
            elif isinstance(cmd, InsertKV):
                reply = insert_kv(runner, desc, cmd)
            elif isinstance(cmd, (Redispatch, HetisQuery)) and hetis is not None:
                reply = hetis.handle(cmd)
            else:
                reply = Failed(seq=cmd.seq, error=f"unknown command {type(cmd).__name__}")
        except Exception as e:  # noqa: BLE001 - reported to the coordinator, which decides
            if isinstance(cmd, ExtractKV):
                reply = KVOut(seq=cmd.seq, transfer_id=cmd.transfer_id, ok=False, error=f"{type(e).__name__}: {e}")
            elif isinstance(cmd, (InsertKV, ExpectKV)):
                reply = KVIn(seq=cmd.seq, transfer_id=cmd.transfer_id, ok=False, error=f"{type(e).__name__}: {e}")
            elif isinstance(cmd, SendKV):
                reply = KVSent(seq=cmd.seq, transfer_id=cmd.transfer_id, ok=False, error=f"{type(e).__name__}: {e}")
            else:
                reply = Failed(seq=cmd.seq, error=f"{type(e).__name__}: {e}")
        try:
            send_reply(reply)
        except (BrokenPipeError, OSError):
            return


# ---- the coordinator's handle ---------------------------------------------------------------------------
class WorkerHandle:
    """A started worker process and its end of the pipe. ``start`` blocks until the worker is ready.

    ``placement`` (``connect.py``: TCP, Ray) starts the process elsewhere and hands over a connected socket in
    ``wait_ready``; None is a local subprocess on a socket pair. Either way ``conn`` is a ``Channel``."""

    def __init__(self, spec: WorkerSpec, placement: Placement | None = None) -> None:
        self.spec = spec
        self.placement = placement
        self.conn: Channel = None  # type: ignore[assignment] # set by launch (socket pair) or wait_ready
        self.process: Any = None  # _Process, or a placement's process-like object
        self._seq = 0
        self.dead_reason: str | None = None
        self.num_kv_blocks = 0
        self.desc: KVDescriptor | None = None
        self.kv_addresses: dict[str, str] = {}

    def launch(self) -> WorkerHandle:
        """Start the process without waiting for it (several workers then load in parallel)."""
        if self.placement is not None:
            self.process = self.placement.launch(self.spec)
            return self
        parent, child = socket.socketpair()
        self.conn = Channel(parent)
        fd = child.fileno()
        self.process = _Process(subprocess.Popen(
            [sys.executable, "-m", "hetserve.runtime.worker", str(fd)], pass_fds=(fd,), close_fds=True,
            env={**os.environ, **self.spec.env} if self.spec.env else None,
        ))
        child.close()
        self.conn.send_bytes(encode_msg(self.spec))
        return self

    def wait_ready(self, timeout_s: float = 120.0) -> Ready:
        if self.conn is None:  # a placement's worker dials in; it was sent its spec on connecting
            self.conn = self.placement.connect(self.spec, self.process, timeout_s)
        ready = self.recv(timeout_s)
        if not isinstance(ready, Ready):
            raise WorkerDied(f"worker {self.spec.name} did not start: {ready}")
        self.num_kv_blocks, self.desc = ready.num_kv_blocks, ready.desc
        self.kv_addresses = dict(ready.kv_addresses)
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
        if self.process.is_alive() and self.conn is not None:
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
            if self.conn is not None:
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
    if sys.argv[1].startswith("--"):  # --connect HOST:PORT [--token T]: dial the coordinator (connect.py)
        from hetserve.runtime.connect import channel_from_argv

        _worker_main(channel_from_argv(sys.argv[1:]))
    else:
        _worker_main(Channel(socket.socket(fileno=int(sys.argv[1]))))
    # nothing left to save: skip the interpreter's teardown (with torch loaded it takes a second or more, and
    # shutting a cluster down waits for it)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
