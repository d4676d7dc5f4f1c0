"""A Hetis attention worker: ``python -m hetserve.runtime.attn_worker FD``, launched by a main worker (see
``hetis_main.py``) with one end of a socket pair as ``FD``.

It holds the KV of KV heads ``[head_start, head_start + num_heads)`` for every layer (same block count and
block ids as the main's cache, those heads only), on any torch device, and runs their attention with the
engine's own backends (``torch_ref`` on CPU, Triton on CUDA). Messages (``hetis_messages``), one at a time, in
order: ``StepMeta`` (no answer), ``LayerReq`` -> ``LayerOut``, ``FetchHeads`` -> ``HeadsKV``, ``AssignHeads``
-> ``Assigned``, ``AttnStop``. A failing command answers ``AttnError``; the socket closing ends the process.

The mailbox path (``hetis_mailbox.py``): ``MailboxOpen`` -> ``MailboxReady`` opens the main's shared buffer
once (a new one replaces the old); ``LayerMB`` -> ``LayerDone`` is a layer whose q / k / v are read from it
and whose output is written to it (synchronised before the answer goes out). Both paths stay open: the main
picks per step.

Pacing (``speed`` < 1, an emulated slower device): after each layer the worker sleeps so that the layer takes
``measured / speed``.
"""

from __future__ import annotations

import os
import socket
import sys
import time

import torch

from hetserve.engine.attention import get_attention_backend
from hetserve.engine.attention.base import AttentionMetadata
from hetserve.runtime.hetis_mailbox import Mailbox
from hetserve.runtime.hetis_messages import (
    Assigned,
    AssignHeads,
    AttnError,
    AttnReady,
    AttnSpec,
    AttnStop,
    FetchHeads,
    HeadsKV,
    LayerDone,
    LayerMB,
    LayerOut,
    LayerReq,
    MailboxOpen,
    MailboxReady,
    StepMeta,
)
from hetserve.runtime.hetis_wire import WIRE_DTYPES, AttnLinkError, FrameSocket, metas


class AttentionHolder:
    """The worker's state: caches of its heads and the current step's metadata."""

    def __init__(self, spec: AttnSpec) -> None:
        self.spec = spec
        dev = spec.device
        if dev == "auto":
            dev = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(dev)
        self.dtype = WIRE_DTYPES[spec.dtype]
        self.backend = get_attention_backend(spec.backend, self.device)
        self.head_start = spec.head_start
        self.caches = self._alloc(spec.num_heads_held)
        self.meta: AttentionMetadata | None = None
        self.mailbox: Mailbox | None = None

    def _alloc(self, num_heads: int) -> list[torch.Tensor]:
        s = self.spec
        return [
            torch.zeros(2, s.num_blocks, s.block_size, num_heads, s.head_dim, dtype=self.dtype, device=self.device)
            for _ in range(s.num_layers)
        ]

    @property
    def num_heads(self) -> int:
        return int(self.caches[0].shape[3])

    def set_meta(self, m: StepMeta, ts: list[torch.Tensor]) -> None:
        positions, slots, qsl, seq_lens, tables = (t.to(self.device) for t in ts)
        self.meta = AttentionMetadata(
            num_tokens=m.num_tokens, num_seqs=m.num_seqs, positions=positions, slot_mapping=slots,
            query_start_loc=qsl, seq_lens=seq_lens, block_tables=tables, max_query_len=m.max_query_len,
            max_seq_len=m.max_seq_len, query_start_loc_cpu=ts[2].tolist(), seq_lens_cpu=ts[3].tolist(),
        )

    def layer(self, req: LayerReq, ts: list[torch.Tensor]) -> torch.Tensor:
        if self.meta is None:
            raise RuntimeError("a layer request came before any step metadata")
        q, k, v = (t.to(self.device, non_blocking=True) for t in ts)
        if k.shape[1] != self.num_heads:
            raise RuntimeError(f"layer request for {k.shape[1]} heads; this worker holds {self.num_heads}")
        return self.backend.forward(q, k, v, self.caches[req.layer], self.meta, req.scale, req.sliding_window)

    def open_mailbox(self, m: MailboxOpen) -> None:
        if m.kind == "cuda_ipc" and self.device.type != "cuda":
            raise RuntimeError(f"a CUDA IPC mailbox on a {self.device} worker")
        mb = Mailbox.open(m)
        if self.mailbox is not None:
            self.mailbox.close()
        self.mailbox = mb

    def layer_mb(self, req: LayerMB) -> None:
        mb = self.mailbox
        if self.meta is None:
            raise RuntimeError("a layer request came before any step metadata")
        if mb is None or mb.gen != req.gen:
            raise RuntimeError(f"layer request for mailbox {req.gen}; open: {None if mb is None else mb.gen}")
        if req.num_heads != self.num_heads:
            raise RuntimeError(f"layer request for {req.num_heads} heads; this worker holds {self.num_heads}")
        qm, km, vm, om = mb.views(req.num_tokens, req.num_heads)
        if mb.device != self.device:
            qm, km, vm = (t.to(self.device, non_blocking=True) for t in (qm, km, vm))
        out = self.backend.forward(qm, km, vm, self.caches[req.layer], self.meta, req.scale, req.sliding_window)
        om.copy_(out)
        mb.fence(self.device)  # the output is there before LayerDone says so

    def fetch(self, heads: list[int], block_ids: list[int]) -> torch.Tensor:
        """[L, 2, nb, block, len(heads), D] on the CPU."""
        blk = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        idx = [h - self.head_start for h in heads]
        if any(i < 0 or i >= self.num_heads for i in idx):
            raise RuntimeError(f"heads {heads} are not all held here ({self.head_start}+{self.num_heads})")
        return torch.stack([torch.stack([c[:, blk, :, i] for i in idx], dim=3) for c in self.caches]).cpu()

    def assign(self, m: AssignHeads, ts: list[torch.Tensor]) -> None:
        old, old_start = self.caches, self.head_start
        new = self._alloc(m.num_heads)
        lo = max(old_start, m.head_start)
        hi = min(old_start + self.num_heads, m.head_start + m.num_heads)
        if hi > lo:
            for o, n in zip(old, new):
                n[:, :, :, lo - m.head_start : hi - m.head_start] = o[:, :, :, lo - old_start : hi - old_start]
        if m.incoming:
            data = ts[0].to(self.device)
            blk = torch.tensor(m.block_ids, dtype=torch.long, device=self.device)
            for j, h in enumerate(m.incoming):
                if not m.head_start <= h < m.head_start + m.num_heads:
                    raise RuntimeError(f"incoming head {h} outside the new range")
                for layer, n in enumerate(new):
                    n[:, blk, :, h - m.head_start] = data[layer, :, :, :, j].to(self.dtype)
        self.caches, self.head_start = new, m.head_start


def serve(link: FrameSocket) -> None:
    spec, _ = link.recv(type=AttnSpec)
    torch.set_num_threads(max(1, spec.torch_threads))
    try:
        holder = AttentionHolder(spec)
    except Exception as e:  # noqa: BLE001 - reported to the main worker, which raises
        link.send(AttnError(error=f"{type(e).__name__}: {e}"))
        return
    link.send(AttnReady(pid=os.getpid(), device=str(holder.device), backend=holder.backend.name))
    slow = spec.speed < 1.0
    while True:
        msg, ts = link.recv()
        try:
            if isinstance(msg, StepMeta):
                holder.set_meta(msg, ts)
            elif isinstance(msg, LayerReq):
                t0 = time.perf_counter()
                out = holder.layer(msg, ts)
                if holder.device.type == "cuda":
                    torch.cuda.synchronize(holder.device)
                dt = time.perf_counter() - t0
                if slow:
                    time.sleep(dt * (1.0 / spec.speed - 1.0))
                link.send(LayerOut(layer=msg.layer, compute_s=dt, tensors=metas([out])), [out])
            elif isinstance(msg, LayerMB):
                t0 = time.perf_counter()
                holder.layer_mb(msg)
                dt = time.perf_counter() - t0
                if slow:
                    time.sleep(dt * (1.0 / spec.speed - 1.0))
                link.send(LayerDone(layer=msg.layer, compute_s=dt))
            elif isinstance(msg, MailboxOpen):
                try:
                    holder.open_mailbox(msg)
                except Exception as e:  # noqa: BLE001 - the main falls back to another backing or the socket
                    link.send(MailboxReady(gen=msg.gen, ok=False, error=f"{type(e).__name__}: {e}"))
                else:
                    link.send(MailboxReady(gen=msg.gen, ok=True, kind=msg.kind))
            elif isinstance(msg, FetchHeads):
                kv = holder.fetch(msg.heads, msg.block_ids)
                link.send(HeadsKV(heads=msg.heads, tensors=metas([kv])), [kv])
            elif isinstance(msg, AssignHeads):
                holder.assign(msg, ts)
                link.send(Assigned(head_start=holder.head_start, num_heads=holder.num_heads))
            elif isinstance(msg, AttnStop):
                return
            else:
                link.send(AttnError(error=f"unexpected message {type(msg).__name__}"))
        except AttnLinkError:
            raise
        except Exception as e:  # noqa: BLE001 - the main worker decides (it raises and the instance is dropped)
            link.send(AttnError(error=f"{type(e).__name__}: {e}"))


def main(fd: int) -> None:
    link = FrameSocket(socket.socket(fileno=fd), None, "main worker")
    try:
        serve(link)
    except AttnLinkError:
        pass  # the main worker went away: nothing left to serve
    finally:
        link.close()


if __name__ == "__main__":
    main(int(sys.argv[1]))
