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
    LayerOut,
    LayerReq,
    Redispatch,
    StepMeta,
)
from hetserve.runtime.hetis_wire import AttnLinkError, FrameSocket, metas


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

    # ---- RemoteHeads ----------------------------------------------------------------------------
    def start_step(self, meta: AttentionMetadata) -> None:
        ts = [meta.positions, meta.slot_mapping, meta.query_start_loc, meta.seq_lens, meta.block_tables]
        ts = [t[: meta.num_tokens] for t in ts[:2]] + ts[2:]
        self.link.send(StepMeta(num_tokens=meta.num_tokens, num_seqs=meta.num_seqs, max_query_len=meta.max_query_len,
                                max_seq_len=meta.max_seq_len, tensors=metas(ts)), ts)

    def send_layer(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   sliding_window: int | None) -> None:
        ts = [q, k, v]
        self.link.send(LayerReq(layer=layer, scale=scale, sliding_window=sliding_window, tensors=metas(ts)), ts)

    def recv_layer(self) -> torch.Tensor:
        self._recv(LayerOut)
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
                         moved_bytes=moved_bytes, redispatch_s=redispatch_s)

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
