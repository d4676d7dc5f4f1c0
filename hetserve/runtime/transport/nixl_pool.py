"""The registered memory of the NIXL transport (``nixl.py``): blocks registered once with the endpoint's agent and
reused across messages, ranges held per message, a larger block when one has no room."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import numpy as np

from hetserve.runtime.transport.shm_pool import first_fit

if TYPE_CHECKING:
    from hetserve.runtime.transport.nixl import NixlTransport

_ALIGN = 256
MIB = 2**20


def layout(sizes: list[int]) -> tuple[list[int], int]:
    """Offsets of buffers of ``sizes`` placed back to back at ``_ALIGN``, and the bytes they take."""
    offs, total = [], 0
    for n in sizes:
        offs.append(total)
        total += -(-n // _ALIGN) * _ALIGN
    return offs, total


class Block:
    """One registered block of memory: DRAM (a numpy array) or VRAM (a torch uint8 tensor on ``dev``)."""

    def __init__(self, owner: NixlTransport, mem: str, dev: int, size: int, staging: bool) -> None:
        self.mem, self.dev, self.size = mem, dev, size
        if mem == "VRAM":
            import torch

            self.buf: Any = torch.empty(size, dtype=torch.uint8, device=f"cuda:{dev}")
            self.addr = self.buf.data_ptr()
        else:
            self.buf = np.empty(size, dtype=np.uint8)
            self.buf[:: 4096] = 0  # fault the pages in now, not during the first transfer
            self.addr = self.buf.ctypes.data
        self.reg = owner._call("register_memory", np.array([[self.addr, size, dev]], dtype=np.uint64), mem)
        if staging:  # peers read it: they need metadata that knows it
            owner._epoch += 1
        self.held: dict[int, tuple[int, int]] = {}  # key -> (offset, bytes)

    def alloc(self, key: int, nbytes: int) -> int | None:
        return first_fit(self.held, self.size, key, nbytes, _ALIGN)


class Region:
    """Sender side (WRITE): a landing region a peer granted this endpoint, allocated here: ranges are held from
    the message that writes them until the peer reports them free. ``unsafe_until``: a wall time before which a
    write this endpoint gave up on may still land in it (the peer keeps the memory until then)."""

    def __init__(self, grant: dict[str, Any], agent: str) -> None:
        self.gid, self.addr, self.size = int(grant["gid"]), int(grant["addr"]), int(grant["size"])
        self.mem, self.dev, self.agent = str(grant["mem"]), int(grant["dev"]), agent
        self.held: dict[int, tuple[int, int]] = {}
        self.unsafe_until = 0.0
        self.stale = False  # its connection was lost: the frees for it went with it

    def alloc(self, key: int, nbytes: int) -> int | None:
        return first_fit(self.held, self.size, key, nbytes, _ALIGN)

    def free(self, key: int) -> None:
        self.held.pop(key, None)


class Grant:
    """Receiver side (WRITE): a registered block one sender (``owner``: its agent) writes into. ``views``: messages
    whose bytes in it are still lent; ``retire_after``: once the sender moved on to a newer grant, the wall time
    after which none of its writes can still land here (the block goes once that passed and nothing is lent)."""

    def __init__(self, blk: Block, owner: str, gid: int) -> None:
        self.blk, self.owner, self.gid = blk, owner, gid
        self.views = 0
        self.retire_after: float | None = None


class Pool:
    """The blocks of one memory kind: ranges from the newest; a larger block when it has no room."""

    def __init__(self, owner: NixlTransport, mem: str, dev: int, staging: bool) -> None:
        self.owner, self.mem, self.dev, self.staging = owner, mem, dev, staging
        self.blocks: list[Block] = []
        self.lock = threading.Lock()
        self.quarantined: list[tuple[float, Block, int]] = []  # (free after this monotonic time, block, key)

    def alloc(self, key: int, nbytes: int) -> tuple[Block, int]:
        with self.lock:
            self._reclaim()
            if self.blocks:
                off = self.blocks[-1].alloc(key, nbytes)
                if off is not None:
                    return self.blocks[-1], off
            last = self.blocks[-1].size if self.blocks else 0
            size = max(2 * last, -(-nbytes // MIB) * MIB, self.owner.pool_bytes)
            blk = Block(self.owner, self.mem, self.dev, size, self.staging)
            self.blocks.append(blk)
            blk.held[key] = (0, nbytes)
            self._retire()
            return blk, 0

    def free(self, blk: Block, key: int, hold_until_s: float = 0.0) -> None:
        with self.lock:
            if hold_until_s > time.monotonic():
                self.quarantined.append((hold_until_s, blk, key))
                return
            blk.held.pop(key, None)
            self._retire()

    def _reclaim(self) -> None:
        now = time.monotonic()
        for _, blk, key in [q for q in self.quarantined if q[0] <= now]:
            blk.held.pop(key, None)
        self.quarantined = [q for q in self.quarantined if q[0] > now]

    def _retire(self) -> None:
        """Deregister every older block that holds nothing (its memory goes once no view refers to it)."""
        for blk in [b for b in self.blocks[:-1] if not b.held]:
            self.blocks.remove(blk)
            self.owner._call("deregister_memory", blk.reg)

    def close(self) -> None:
        with self.lock:
            for blk in self.blocks:
                self.owner._call("deregister_memory", blk.reg)
            self.blocks.clear()
