"""Gather and scatter a request's blocks along a cache's block axis: plain copies of runs of consecutive block ids
(a request's blocks mostly are: the pool hands them out in order), an indexed kernel only for scattered ids.

A copy of a run needs no index tensor on the device (a pinned host allocation and a host-to-device copy each
time) and no indexed kernel. On the emulated pair (session 9, ``docs/NOTES.md``) the sampled receiving worker
spent about half its busy samples on the line of the indexed write and the sender a fifth on the index tensor;
with run copies neither shows, though a burst of hand-offs got no measurably faster (the time went elsewhere)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

MAX_RUNS = 4  # more runs than this: one indexed kernel instead of a copy per run


def block_runs(ids: Sequence[int]) -> list[tuple[int, int, int]] | None:
    """``(offset in ids, first id, count)`` of each run of consecutive ids; None past ``MAX_RUNS`` runs."""
    runs: list[tuple[int, int, int]] = []
    start = 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[i - 1] + 1:
            runs.append((start, ids[start], i - start))
            if len(runs) > MAX_RUNS:
                return None
            start = i
    return runs


def index_tensor(ids: Sequence[int], device: torch.device) -> torch.Tensor:
    """Block ids as an int64 tensor on ``device``. On a GPU through pinned memory without blocking: a
    pageable copy would make the host wait for everything queued on the stream first."""
    if device.type != "cuda":
        return torch.tensor(list(ids), dtype=torch.int64, device=device)
    return torch.tensor(list(ids), dtype=torch.int64, pin_memory=True).to(device, non_blocking=True)


def gather(x: torch.Tensor, dim: int, ids: Sequence[int]) -> torch.Tensor:
    """A new contiguous tensor of ``x``'s blocks ``ids`` along ``dim`` (``x.index_select(dim, ids)``)."""
    runs = block_runs(ids)
    if runs is None:
        return x.index_select(dim, index_tensor(ids, x.device))
    if len(runs) == 1:
        part = x.narrow(dim, runs[0][1], runs[0][2])
        return part.clone() if part.is_contiguous() else part.contiguous()
    return torch.cat([x.narrow(dim, first, n) for _, first, n in runs], dim=dim)


def scatter(dst: torch.Tensor, dim: int, ids: Sequence[int], src: torch.Tensor) -> None:
    """``dst``'s blocks ``ids`` along ``dim`` = ``src`` (``dst.index_copy_(dim, ids, src)``)."""
    runs = block_runs(ids)
    if runs is None:
        dst.index_copy_(dim, index_tensor(ids, dst.device), src)
        return
    for off, first, n in runs:
        dst.narrow(dim, first, n).copy_(src.narrow(dim, off, n))
