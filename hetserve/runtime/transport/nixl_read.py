"""The READ path of the NIXL transport (``HETSERVE_NIXL_OP=READ``): the receiver READs each message's buffers from
the sender's registered staging into its own landing pools (see ``nixl.py``). Also the posting and polling of a
NIXL request, which the WRITE path shares."""

from __future__ import annotations

import contextlib
import time
import weakref
from typing import TYPE_CHECKING, Any

import numpy as np

from hetserve.runtime.messages import Envelope, MessageDecodeError
from hetserve.runtime.transport.base import Buffer
from hetserve.runtime.transport.nixl_pool import Block, Pool, layout

_READ_TIMEOUT_S = 60.0
_SKEW_S = 5.0  # wall clocks of two hosts agree to within this


def _cuda_current(dev: int) -> None:
    from hetserve.runtime.transport.nixl import _cuda_current as cur

    cur(dev)


class ReadPath:
    """Mixed into ``NixlTransport`` (which provides the agent, the pools and ``_service``)."""

    if TYPE_CHECKING:
        _agent: Any
        _agent_lock: Any
        _remote: dict[str, str]
        _landing: dict[tuple[str, int], Pool]
        _keys: Any
        _freed: Any

        def _call(self, method: str, *args: Any) -> Any: ...
        def _service(self) -> None: ...
        def _pool(self, table: dict[tuple[str, int], Pool], mem: str, dev: int) -> Pool: ...
        def _landing_kind(self, mem: str, dev: int) -> tuple[str, int]: ...

    def _read(self, env: Envelope) -> tuple[list[Buffer], list[tuple[Pool, Block, int]]]:
        """READ the message's buffers into landing ranges: (views, the ranges)."""
        self._service()
        hs = env.handles
        if len(hs) != env.num_buffers or not hs or any(not isinstance(h, dict) for h in hs):
            raise MessageDecodeError(f"{env.num_buffers} buffers announced, {len(hs)} descriptors")
        if hs[0].get("md"):  # newer metadata replaces the old (loading it again would merge: stale blocks stay)
            if env.segment in self._remote:
                self._call("remove_remote_agent", self._remote.pop(env.segment))
            name = self._call("add_remote_agent", hs[0]["md"])  # the peer's name, as bytes
            self._remote[env.segment] = name.decode() if isinstance(name, bytes) else str(name)
        if (remote := self._remote.get(env.segment)) is None:
            raise MessageDecodeError(f"no NIXL metadata for agent {env.segment!r} (it is sent once per connection)")
        left_s = min(_READ_TIMEOUT_S, float(hs[0].get("deadline_wall", 0.0)) + _SKEW_S - time.time())
        if left_s <= 0:
            raise OSError(f"the sender's deadline passed before its message {env.msg_id} was read")
        groups: dict[tuple[str, int], list[int]] = {}
        for i, h in enumerate(hs):
            groups.setdefault((h["mem"], int(h["dev"])), []).append(i)
        views: list[Buffer] = [b""] * len(hs)
        ranges: list[tuple[Pool, Block, int]] = []
        posted = []
        try:
            for (mem, dev), idx in groups.items():
                lmem, ldev = self._landing_kind(mem, dev)
                if lmem == "VRAM":
                    _cuda_current(ldev)
                offs, total = layout([int(hs[i]["n"]) for i in idx])
                pool = self._pool(self._landing, lmem, ldev)
                key = next(self._keys)
                blk, base = pool.alloc(key, total)
                ranges.append((pool, blk, key))
                rows = [(i, off) for i, off in zip(idx, offs, strict=True) if int(hs[i]["n"])]
                if rows:
                    local = np.array([[blk.addr + base + off, int(hs[i]["n"]), ldev] for i, off in rows], np.uint64)
                    far = np.array([[int(hs[i]["addr"]), int(hs[i]["n"]), dev] for i, _ in rows], np.uint64)
                    posted.append(self._post(local, lmem, far, mem, remote))
                self._views(blk, base, idx, offs, hs, views, pool, key)
            self._wait(posted, left_s, f"read of message {env.msg_id} from {env.sender}")
        except BaseException:
            for pool, blk, key in ranges:
                pool.free(blk, key)
            raise
        return views, ranges

    def _post(self, local: np.ndarray, lmem: str, far: np.ndarray, rmem: str, remote: str, op: str = "READ") -> Any:
        try:
            with self._agent_lock:
                h = self._agent.initialize_xfer(op, self._agent.get_xfer_descs(local, lmem),
                                                self._agent.get_xfer_descs(far, rmem), remote)
                state = self._agent.transfer(h)
        except Exception as e:  # noqa: BLE001 - NIXL's errors are not OSErrors: refuse the message
            raise OSError(f"NIXL {op} could not be posted: {type(e).__name__}: {e}") from None
        return [h, state]

    def _wait(self, posted: list[list[Any]], left_s: float, what: str) -> None:
        end = time.monotonic() + left_s
        polls = 0
        try:
            for entry in posted:
                while entry[1] == "PROC":
                    if time.monotonic() > end:
                        raise TimeoutError(f"NIXL {what} timed out")
                    polls += 1
                    if polls > 64:
                        time.sleep(2e-5)  # let the process's other threads have the GIL
                    try:
                        entry[1] = self._call("check_xfer_state", entry[0])
                    except Exception as e:  # noqa: BLE001 - e.g. the peer went away: refuse, keep the thread
                        entry[1] = f"{type(e).__name__}: {e}"
                if entry[1] != "DONE":
                    raise OSError(f"NIXL {what} failed ({entry[1]})")
        finally:
            for h, _ in posted:
                with contextlib.suppress(Exception):  # a transfer NIXL could not abort: leave the handle
                    self._call("release_xfer_handle", h)

    def _views(self, blk: Block, base: int, idx: list[int], offs: list[int], hs: list[dict[str, Any]],
               views: list[Buffer], pool: Pool, key: int) -> None:
        """Views of the landing block (host: of one read-only array that frees the range once it is gone)."""
        hi = offs[-1] + int(hs[idx[-1]]["n"])
        if blk.mem == "VRAM":
            import torch

            for i, off in zip(idx, offs, strict=True):
                t = blk.buf.narrow(0, base + off, int(hs[i]["n"]))
                if "dtype" in hs[i]:
                    t = t.view(getattr(torch, hs[i]["dtype"])).view(hs[i]["shape"])
                views[i] = t
            return
        arr = np.frombuffer(blk.buf, dtype=np.uint8, count=hi, offset=base)
        arr.flags.writeable = False
        weakref.finalize(arr, self._freed.append, (pool, blk, key))
        whole = memoryview(arr)
        for i, off in zip(idx, offs, strict=True):
            views[i] = whole[off: off + int(hs[i]["n"])]

