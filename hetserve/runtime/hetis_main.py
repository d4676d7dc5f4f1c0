"""The Hetis main worker's side: launches its attention workers, shrinks the runner's KV cache to the kept
heads, wraps the runner's backend in :class:`HeadSplitBackend`, and re-dispatches heads on command.

Installed by ``worker.py`` when ``WorkerSpec.hetis`` is set (:func:`install`). The attention workers are
``python -m hetserve.runtime.attn_worker`` children of this process, each on its own socket pair; every
receive waits at most ``HetisSpec.recv_timeout_s``, and a worker that died, closed or stayed silent raises
:class:`AttnLinkError`, which fails the step (the coordinator then drops this instance and retries or fails
its requests). The children are stopped at exit; if this process is killed they see their socket close and
exit by themselves.

Re-dispatch (between steps): the heads that change holder have their KV for the blocks in use copied, all
layers, from the old holder to the new one (through this process), then every holder re-allocates its cache
to its new head range, the heads that stay keeping their KV.

Data path per layer (``HetisSpec.data_path``, env ``HETSERVE_HETIS_DATA_PATH``): by default each worker gets a
mailbox (``hetis_mailbox.py``: CUDA IPC when both sides are on CUDA, else a host shm file) at launch; a layer's
q / k / v are copied into it, fenced, and only a ``LayerMB`` header goes on the socket; the backend computes the
kept heads before it waits for ``LayerDone`` and reads the output from the mailbox. A step too large for the
mailbox grows it (re-announced); where none can be opened (or above ``MAILBOX_MAX_BYTES``) the tensors go as
socket frames, as before. ``HetisInfo.data_paths`` / ``mailbox_layers`` / ``frame_layers`` say which was used.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import time
from typing import Any

import torch

from hetserve.engine.attention.base import AttentionMetadata
from hetserve.engine.attention.head_split import HeadSplitBackend, RemoteHeads, head_ranges
from hetserve.runtime.hetis_mailbox import Mailbox, backings, region_bytes
from hetserve.runtime.hetis_messages import (
    Assigned,
    AssignHeads,
    AttnError,
    AttnReady,
    AttnSpec,
    AttnStop,
    AttnWorkerConf,
    FetchHeads,
    HeadsKV,
    HetisInfo,
    HetisQuery,
    HetisSpec,
    LayerDone,
    LayerMB,
    LayerOut,
    LayerReq,
    MailboxReady,
    Redispatch,
    StepMeta,
)
from hetserve.runtime.hetis_wire import WIRE_DTYPES, AttnLinkError, FrameSocket, metas

DATA_PATHS = ("auto", "mailbox", "frames")
MAILBOX_MIN_TOKENS = 256  # a first mailbox holds this many tokens of all KV heads; it grows (x2) on demand
MAILBOX_MAX_BYTES = 1 << 30  # a step needing more goes through the socket


class AttnWorkerClient(RemoteHeads):
    """One attention worker process and this end of its socket."""

    def __init__(self, conf: AttnWorkerConf, spec: AttnSpec, recv_timeout_s: float) -> None:
        self.conf = conf
        self.spec = spec
        self.head_start = spec.head_start
        self.num_heads = spec.num_heads_held
        self.recv_timeout_s = recv_timeout_s
        ours, theirs = socket.socketpair()
        fd = theirs.fileno()
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "hetserve.runtime.attn_worker", str(fd)], pass_fds=(fd,), close_fds=True,
            env={**os.environ, **conf.env} if conf.env else None,
        )
        theirs.close()
        self.pid = self.popen.pid
        self.link = FrameSocket(ours, recv_timeout_s, f"attention worker {conf.device_id} (pid {self.pid})")
        self.link.send(spec)
        self.device = ""
        self.backend = ""
        self._tensors: list[torch.Tensor] = []  # of the last frame received
        # the data path (setup_data_path): a shared mailbox, or the socket frames
        self.mailbox: Mailbox | None = None
        self.data_path = "frames"
        self.main_device = torch.device("cpu")
        self.stats = {"mailbox_layers": 0, "frame_layers": 0, "mailbox_opens": 0}
        self._gen = 0
        self._use_mb = False  # this step's layers go through the mailbox
        self._pending: tuple[int, int] | None = None  # (tokens, heads) of the layer sent through the mailbox
        self.last_compute_s = 0.0  # the worker's time on the last layer answered

    def wait_ready(self, timeout_s: float) -> None:
        self.link.sock.settimeout(timeout_s)
        try:
            msg = self._recv()
        finally:
            self.link.sock.settimeout(self.recv_timeout_s)
        if not isinstance(msg, AttnReady):
            raise AttnLinkError(f"{self.link.peer} did not start: {msg}")
        self.device, self.backend = msg.device, msg.backend

    def _recv(self, want: type | None = None) -> Any:
        try:
            msg, ts = self.link.recv()
        except AttnLinkError as e:
            code = self.popen.poll()
            raise AttnLinkError(f"{e}{'' if code is None else f' (exit code {code})'}") from None
        if isinstance(msg, AttnError):
            raise AttnLinkError(f"{self.link.peer} failed: {msg.error}")
        if want is not None and not isinstance(msg, want):
            raise AttnLinkError(f"{self.link.peer} answered {type(msg).__name__}, expected {want.__name__}")
        self._tensors = ts
        return msg

    # ---- the data path ---------------------------------------------------------------------------
    def setup_data_path(self, main_device: torch.device | str, mode: str = "auto",
                        tokens: int = MAILBOX_MIN_TOKENS) -> str:
        """Choose how layers travel: a mailbox of the best backing both sides can open (``mode`` "auto" or
        "mailbox"; "mailbox" raises without one), else the socket frames. Returns the path taken."""
        if mode not in DATA_PATHS:
            raise ValueError(f"hetis data_path {mode!r}: one of {', '.join(DATA_PATHS)}")
        self.main_device = torch.device(main_device)
        if mode != "frames":
            s = self.spec
            nbytes = region_bytes(tokens, s.num_kv_heads, s.num_heads // s.num_kv_heads, s.head_dim,
                                  WIRE_DTYPES[s.dtype].itemsize)
            errors = self._open_mailbox(nbytes)
            if self.mailbox is None and mode == "mailbox":
                raise AttnLinkError(f"no mailbox with {self.link.peer}: {'; '.join(errors)}")
        self.data_path = self.mailbox.kind if self.mailbox is not None else "frames"
        return self.data_path

    def _open_mailbox(self, nbytes: int) -> list[str]:
        """Allocate and announce a mailbox of ``nbytes`` (the old one stays until a new one is open)."""
        s = self.spec
        errors = []
        kinds = backings(self.main_device, self.device or "cpu")
        if self.mailbox is not None:  # growing: keep the backing that works
            kinds = [self.mailbox.kind]
        for kind in kinds:
            self._gen += 1
            try:
                mb = Mailbox.create(kind, nbytes, WIRE_DTYPES[s.dtype], s.num_heads // s.num_kv_heads, s.head_dim,
                                    self.main_device, self._gen)
            except Exception as e:  # noqa: BLE001 - try the next backing, then the socket
                errors.append(f"{kind}: {type(e).__name__}: {e}")
                continue
            try:
                self.link.send(mb.announce())
                msg = self._recv(MailboxReady)
            except BaseException:
                mb.close()
                raise
            mb.unlink()  # the worker has it open (or failed to): no file needs to stay behind
            if msg.ok and msg.gen == mb.gen:
                if self.mailbox is not None:
                    self.mailbox.close()
                self.mailbox = mb
                self.stats["mailbox_opens"] += 1
                return errors
            mb.close()
            errors.append(f"{kind}: {msg.error}")
        return errors

    def _ensure_mailbox(self, tokens: int) -> bool:
        """Whether this step's layers (``tokens`` rows of the held heads) go through the mailbox."""
        mb = self.mailbox
        if mb is None:
            return False
        if mb.fits(tokens, self.num_heads):
            return True
        need = mb.need(tokens, self.num_heads)
        if need > MAILBOX_MAX_BYTES:
            return False
        self._open_mailbox(min(max(need, 2 * mb.nbytes), MAILBOX_MAX_BYTES))
        return self.mailbox is not None and self.mailbox.fits(tokens, self.num_heads)

    def close_mailbox(self) -> None:
        if self.mailbox is not None:
            self.mailbox.close()
            self.mailbox = None

    # ---- RemoteHeads ----------------------------------------------------------------------------
    def start_step(self, meta: AttentionMetadata) -> None:
        ts = [meta.positions, meta.slot_mapping, meta.query_start_loc, meta.seq_lens, meta.block_tables]
        ts = [t[: meta.num_tokens] for t in ts[:2]] + ts[2:]
        self._use_mb = self._ensure_mailbox(meta.num_tokens)
        self.link.send(StepMeta(num_tokens=meta.num_tokens, num_seqs=meta.num_seqs, max_query_len=meta.max_query_len,
                                max_seq_len=meta.max_seq_len, tensors=metas(ts)), ts)

    def send_layer(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   sliding_window: int | None) -> None:
        mb = self.mailbox
        if self._use_mb and mb is not None:
            tokens, heads = int(k.shape[0]), int(k.shape[1])
            qm, km, vm, _ = mb.views(tokens, heads)
            cross = q.device.type != mb.device.type  # a device <-> host copy: async, then the fence
            qm.copy_(q, non_blocking=cross)
            km.copy_(k, non_blocking=cross)
            vm.copy_(v, non_blocking=cross)
            mb.fence(q.device)  # the data is there before the header says so
            self.link.send(LayerMB(layer=layer, scale=scale, sliding_window=sliding_window, num_tokens=tokens,
                                   num_heads=heads, gen=mb.gen))
            self._pending = (tokens, heads)
            self.stats["mailbox_layers"] += 1
            return
        self._pending = None
        ts = [q, k, v]
        self.link.send(LayerReq(layer=layer, scale=scale, sliding_window=sliding_window, tensors=metas(ts)), ts)
        self.stats["frame_layers"] += 1

    def recv_layer(self) -> torch.Tensor:
        if self._pending is not None and self.mailbox is not None:
            tokens, heads = self._pending
            self._pending = None
            self.last_compute_s = self._recv(LayerDone).compute_s
            # a view: read before the next send_layer (the backend concatenates or projects it first)
            return self.mailbox.views(tokens, heads)[3]
        self.last_compute_s = self._recv(LayerOut).compute_s
        return self._tensors[0]

    # ---- re-dispatch ----------------------------------------------------------------------------
    def fetch(self, heads: list[int], block_ids: list[int]) -> torch.Tensor:
        self.link.send(FetchHeads(heads=heads, block_ids=block_ids))
        self._recv(HeadsKV)
        return self._tensors[0]

    def assign(self, head_start: int, num_heads: int, block_ids: list[int], incoming: list[int],
               data: torch.Tensor | None) -> None:
        ts = [data] if data is not None else []
        self.link.send(AssignHeads(head_start=head_start, num_heads=num_heads, block_ids=block_ids,
                                   incoming=incoming, tensors=metas(ts)), ts)
        msg = self._recv(Assigned)
        self.head_start, self.num_heads = msg.head_start, msg.num_heads

    def stop(self, timeout_s: float = 2.0) -> None:
        if self.popen.poll() is None:
            try:
                self.link.send(AttnStop())
            except AttnLinkError:
                pass
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(2.0)
        self.link.close()
        self.close_mailbox()


def _caches(n_layers: int, like: torch.Tensor, num_heads: int) -> list[torch.Tensor]:
    _, nb, bs, _, d = like.shape
    return [torch.zeros(2, nb, bs, num_heads, d, dtype=like.dtype, device=like.device) for _ in range(n_layers)]


class HetisMain:
    """The split installed in one runner (``runner.kv_caches`` / ``runner.backend`` are replaced)."""

    def __init__(self, runner: Any, spec: HetisSpec, name: str = "main") -> None:
        mc = runner.model_config
        if len(spec.assignment) != len(spec.workers):
            raise ValueError(f"hetis.assignment has {len(spec.assignment)} entries for {len(spec.workers)} workers")
        self.runner = runner
        self.spec = spec
        self.num_kv_heads = mc.num_key_value_heads
        self.num_layers = mc.num_hidden_layers
        self.assignment = list(spec.assignment)
        kept, ranges = head_ranges(self.num_kv_heads, self.assignment)
        full = runner.kv_caches
        self.dtype_name = str(full[0].dtype).removeprefix("torch.")
        self.clients: list[AttnWorkerClient] = []
        atexit.register(self.close)
        for i, (conf, (start, n)) in enumerate(zip(spec.workers, ranges)):
            aspec = AttnSpec(name=f"{name}/attn{i}", num_layers=self.num_layers, num_heads=mc.num_attention_heads,
                             num_kv_heads=self.num_kv_heads, head_dim=mc.head_dim, num_blocks=int(full[0].shape[1]),
                             block_size=int(full[0].shape[2]), dtype=self.dtype_name, head_start=start,
                             num_heads_held=n, device=conf.device, backend=conf.backend, speed=conf.speed,
                             torch_threads=conf.torch_threads)
            self.clients.append(AttnWorkerClient(conf, aspec, spec.recv_timeout_s))
        for c in self.clients:
            c.wait_ready(spec.start_timeout_s)
        mode = spec.data_path
        if mode == "auto":
            mode = os.environ.get("HETSERVE_HETIS_DATA_PATH", "auto") or "auto"
        for c in self.clients:
            c.setup_data_path(full[0].device, mode)
        # a runner built for this split already holds only the kept heads (no second, full-size cache on the way)
        local = full if int(full[0].shape[3]) == kept else _caches(self.num_layers, full[0], kept)
        del full
        runner.kv_caches = local
        runner.graphs = None  # a step now talks to other processes: no CUDA graph can hold it
        self.backend = HeadSplitBackend(runner.backend, mc.num_attention_heads, self.num_kv_heads, local,
                                        self.clients)
        runner.backend = self.backend
        self.full_bytes_per_token = self._bytes_per_token(self.num_kv_heads)

    def _bytes_per_token(self, heads: int) -> int:
        c = self.runner.kv_caches[0]
        return 2 * self.num_layers * heads * int(c.shape[4]) * c.element_size()

    # ---- commands from the coordinator --------------------------------------------------------------
    def handle(self, cmd: Redispatch | HetisQuery) -> HetisInfo:
        moved, dt = 0, 0.0
        try:
            if isinstance(cmd, Redispatch):
                t0 = time.perf_counter()
                moved = self.redispatch(list(cmd.assignment), list(cmd.block_ids))
                dt = time.perf_counter() - t0
        except Exception as e:  # noqa: BLE001 - the coordinator drops the instance
            return HetisInfo(seq=cmd.seq, ok=False, error=f"{type(e).__name__}: {e}", assignment=self.assignment)
        return self.info(cmd.seq, moved, dt)

    def info(self, seq: int = 0, moved_bytes: int = 0, redispatch_s: float = 0.0) -> HetisInfo:
        kept = self.backend.num_kept
        return HetisInfo(seq=seq, ok=True, assignment=list(self.assignment), num_kept_heads=kept,
                         local_cache_shape=list(self.runner.kv_caches[0].shape),
                         local_kv_bytes_per_token=self._bytes_per_token(kept),
                         full_kv_bytes_per_token=self.full_bytes_per_token,
                         worker_pids=[c.pid for c in self.clients],
                         worker_heads=[[c.head_start, c.num_heads] for c in self.clients],
                         moved_bytes=moved_bytes, redispatch_s=redispatch_s,
                         data_paths=[c.data_path for c in self.clients],
                         mailbox_layers=[c.stats["mailbox_layers"] for c in self.clients],
                         frame_layers=[c.stats["frame_layers"] for c in self.clients])

    def redispatch(self, new: list[int], block_ids: list[int]) -> int:
        """Move to assignment ``new``; returns the KV bytes copied."""
        if len(new) != len(self.clients):
            raise ValueError(f"assignment {new} for {len(self.clients)} attention workers")
        K = self.num_kv_heads
        old_kept, old_ranges = head_ranges(K, self.assignment)
        new_kept, new_ranges = head_ranges(K, new)

        def owners(kept: int, ranges: list[tuple[int, int]]) -> list[int]:
            out = [-1] * kept
            for i, (_, n) in enumerate(ranges):
                out += [i] * n
            return out

        before, after = owners(old_kept, old_ranges), owners(new_kept, new_ranges)
        moving = [h for h in range(K) if before[h] != after[h]]
        blocks = sorted(set(block_ids))
        local = self.runner.kv_caches
        # 1. the moved heads' KV out of their old holders (before anyone re-allocates)
        kv: dict[int, torch.Tensor] = {}  # head -> [L, 2, nb, block, D] on the CPU
        if blocks:
            blk = torch.tensor(blocks, dtype=torch.long, device=local[0].device)
            for src in sorted({before[h] for h in moving}):
                heads = [h for h in moving if before[h] == src]
                if src == -1:
                    data = torch.stack([torch.stack([c[:, blk, :, h] for h in heads], dim=3) for c in local]).cpu()
                else:
                    data = self.clients[src].fetch(heads, blocks)
                for j, h in enumerate(heads):
                    kv[h] = data[:, :, :, :, j]
        moved_bytes = sum(t.numel() * t.element_size() for t in kv.values())
        # 2. every holder takes its new range; heads that stay keep their KV
        for i, c in enumerate(self.clients):
            start, n = new_ranges[i]
            incoming = [h for h in moving if after[h] == i and h in kv]
            if (start, n) == (c.head_start, c.num_heads) and not incoming:
                continue
            data = torch.stack([kv[h] for h in incoming], dim=4) if incoming else None
            c.assign(start, n, blocks, incoming, data)
        new_local = _caches(self.num_layers, local[0], new_kept)
        keep = min(old_kept, new_kept)
        for o, n in zip(local, new_local):
            n[:, :, :, :keep] = o[:, :, :, :keep]
        incoming = [h for h in moving if after[h] == -1 and h in kv]
        if incoming:
            blk = torch.tensor(blocks, dtype=torch.long, device=new_local[0].device)
            for h in incoming:
                data = kv[h].to(new_local[0].device)
                for layer, n in enumerate(new_local):
                    n[:, blk, :, h] = data[layer].to(n.dtype)
        self.runner.kv_caches = new_local
        self.backend.set_split(new_local, self.clients)
        self.assignment = list(new)
        return moved_bytes

    def close(self) -> None:
        for c in self.clients:
            c.stop()
        self.clients = []


def install(runner: Any, spec: HetisSpec, name: str = "main") -> HetisMain:
    """Give ``runner`` (a ``ModelRunner``) a Hetis split: the one call ``worker.py`` makes."""
    return HetisMain(runner, spec, name)
