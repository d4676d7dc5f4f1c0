"""NIXL transport (RDMA / NVLink / UCX through NVIDIA's NIXL), usable only where ``import nixl`` works.

Control travels as in the TCP transport (pyzmq, msgspec header, acknowledgement); the payload does not: the
sender copies its buffers into one registered staging tensor and sends the staging region's descriptor and
its agent metadata; the receiver registers a buffer of its own, READs the region one-sidedly, then
acknowledges, after which the sender deregisters and frees the staging tensor. Written against the NIXL
Python API (``nixl._api.nixl_agent``); it is not exercised in CI (NIXL is not installed there).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

import zmq

from hetserve.runtime.messages import Envelope, MessageDecodeError
from hetserve.runtime.transport.base import Buffer, TransportError, as_bytes_view, buffer_nbytes
from hetserve.runtime.transport.tcp import ZmqTransport

_READ_TIMEOUT_S = 60.0


def nixl_unavailable_reason() -> str | None:
    """None when NIXL can be used here, else why not."""
    try:
        import nixl._api  # noqa: F401
    except ImportError as e:
        return f"NIXL is not importable ({e}); install NIXL with a UCX backend, or use the tcp or shm transport"
    return None


class NixlTransport(ZmqTransport):
    name = "nixl"

    def __init__(self, bind: str = "tcp://127.0.0.1:*", connect_timeout_s: float = 1.0, max_queued: int = 64,
                 backends: Sequence[str] = ("UCX",)) -> None:
        reason = nixl_unavailable_reason()
        if reason is not None:
            raise TransportError(reason)
        from nixl._api import nixl_agent, nixl_agent_config

        self._agent = nixl_agent(f"hetserve-{uuid.uuid4().hex[:12]}", nixl_agent_config(backends=list(backends)))
        self._remote_agents: dict[bytes, str] = {}
        super().__init__(bind, connect_timeout_s, max_queued)

    def _pack(self, peer: str, msg_id: int, buffers: Sequence[Buffer]) -> tuple[Envelope, list[Any], Any]:
        import torch

        env = Envelope(msg_id=msg_id, sender=self.address, num_buffers=len(buffers))
        sizes = [buffer_nbytes(b) for b in buffers]
        cuda = [getattr(b, "is_cuda", False) is True for b in buffers]
        device = next((b.device for b, c in zip(buffers, cuda, strict=True) if c), torch.device("cpu"))
        staging = torch.empty(max(sum(sizes), 1), dtype=torch.uint8, device=device)
        off = 0
        spans = []
        for b, n in zip(buffers, sizes, strict=True):
            if n:
                if hasattr(b, "untyped_storage"):  # a torch tensor, possibly on the GPU
                    src = b.detach().contiguous().reshape(-1).view(torch.uint8)
                else:
                    src = torch.frombuffer(as_bytes_view(b), dtype=torch.uint8)
                staging[off : off + n].copy_(src)
            spans.append((off, n))
            off += n
        reg = self._agent.register_memory([staging])
        mem = "VRAM" if staging.is_cuda else "DRAM"
        dev = staging.device.index or 0
        env.kind = "nixl"
        env.spans = spans
        env.handles = [{
            "agent_meta": self._agent.get_agent_metadata(), "addr": staging.data_ptr(), "size": staging.numel(),
            "mem": mem, "dev": dev,
        }]
        return env, [], (reg, staging)

    def _release(self, state: Any) -> None:
        reg, _staging = state
        self._agent.deregister_memory(reg)

    def _unpack(self, env: Envelope, frames: list[zmq.Frame]) -> list[Buffer]:
        if env.kind != "nixl":
            return super()._unpack(env, frames)
        import torch

        if len(env.handles) != 1 or env.handles[0] is None:
            raise MessageDecodeError("a nixl message carries one staging region")
        region = env.handles[0]
        meta = region["agent_meta"]
        remote = self._remote_agents.get(meta)
        if remote is None:
            remote = self._agent.add_remote_agent(meta)
            self._remote_agents[meta] = remote
        local = torch.empty(region["size"], dtype=torch.uint8)
        reg = self._agent.register_memory([local])
        try:
            local_descs = self._agent.get_xfer_descs([(local.data_ptr(), local.numel(), 0)], "DRAM")
            remote_descs = self._agent.get_xfer_descs([(region["addr"], region["size"], region["dev"])],
                                                      region["mem"])
            handle = self._agent.initialize_xfer("READ", local_descs, remote_descs, remote, b"")
            try:
                state = self._agent.transfer(handle)
                end = time.monotonic() + _READ_TIMEOUT_S
                while state != "DONE":
                    if state == "ERR" or time.monotonic() > end:
                        raise OSError(f"NIXL read from {env.sender} failed ({state})")
                    time.sleep(1e-4)
                    state = self._agent.check_xfer_state(handle)
            finally:
                self._agent.release_xfer_handle(handle)
        finally:
            self._agent.deregister_memory(reg)
        view = memoryview(local.numpy().data)
        return [view[off : off + n] for off, n in env.spans]
