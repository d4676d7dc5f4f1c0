"""Gather and scatter by runs of block ids against ``index_select`` / ``index_copy_`` (brute force)."""

from __future__ import annotations

import random

import pytest
import torch

from hetserve.runtime.kv_blocks import MAX_RUNS, block_runs, gather, scatter


def _ids(rng: random.Random, n_blocks: int, runs: int) -> list[int]:
    """Ids in ``runs`` runs of consecutive blocks (distinct), in a random order of runs."""
    cuts = sorted(rng.sample(range(1, n_blocks), runs * 2 - 1))
    bounds = [0, *cuts, n_blocks]
    pieces = [list(range(bounds[i], bounds[i + 1])) for i in range(0, len(bounds) - 1, 2)]
    rng.shuffle(pieces)
    return [b for p in pieces for b in p]


def test_block_runs_brute_force() -> None:
    rng = random.Random(0)
    for _ in range(200):
        ids = rng.sample(range(30), rng.randint(1, 12))
        runs = block_runs(ids)
        breaks = 1 + sum(ids[i] != ids[i - 1] + 1 for i in range(1, len(ids)))
        if breaks > MAX_RUNS:
            assert runs is None
        else:
            assert runs is not None and len(runs) == breaks
            assert [i for off, first, n in runs for i in range(first, first + n)] == ids
            assert [off for off, _, _ in runs] == [sum(n for _, _, n in runs[:k]) for k in range(len(runs))]


@pytest.mark.parametrize("dim", [0, 1, 2])
@pytest.mark.parametrize("runs", [1, 2, MAX_RUNS, MAX_RUNS + 3])
def test_gather_and_scatter_match_indexed_kernels(dim: int, runs: int) -> None:
    rng = random.Random(dim * 10 + runs)
    g = torch.Generator().manual_seed(runs)
    shape = [3, 2, 6, 4, 5]
    shape[dim] = 40
    x = torch.randn(*shape, generator=g)
    ids = _ids(rng, shape[dim], runs)
    got = gather(x, dim, ids)
    want = x.index_select(dim, torch.tensor(ids))
    assert torch.equal(got, want) and got.is_contiguous()
    got[(slice(None),) * dim + (0,)] = 7.0  # a new tensor: the cache is untouched
    assert torch.equal(x.index_select(dim, torch.tensor(ids)), want)
    src = torch.randn(*want.shape, generator=g)
    a, b = x.clone(), x.clone()
    scatter(a, dim, ids, src)
    b.index_copy_(dim, torch.tensor(ids), src)
    assert torch.equal(a, b)
