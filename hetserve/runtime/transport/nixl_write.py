"""The WRITE path of the NIXL transport (the default; see ``nixl.py``): the sender WRITEs into a landing region
the receiver granted it, then sends the header naming where the bytes lie.

- Grants: the first message of a memory kind to a peer (and the first after a lost connection) sends a
  ``nixl-hello`` (the kind, the bytes needed) on the message's connection; the receiver registers a block for
  that sender alone and answers with it and its agent metadata (one round trip per peer and kind, not per
  message). The sender allocates ranges in it itself (``Region``): a range is held from the message that writes
  it until the receiver reports it free (``{"free": [msg_id]}``, once the views it lent are gone). No room: the
  sender takes the frees that came, then asks for a larger grant (twice the size, up to the receiver's
  ``landing_max_mb``), then waits for frees until its deadline (``TransferTimeout``); a message larger than that
  limit is refused at once. Nothing is ever written into a range the sender does not hold.
- A newer grant retires the older one at the receiver once nothing it lent is alive and no write the sender gave
  up on can still land (``retire_after``: its deadline plus ``2 * _SKEW_S``, wall clock); the memory stays
  registered until then. After a lost connection the sender forgets its ranges and asks for a new grant.
- ``send``: the buffers are copied into staging, WRITten in one NIXL request per memory kind and polled to DONE
  (the staging is free at once), then the envelope goes. The receiver only checks the ranges and lends views.
"""

from __future__ import annotations

import collections
import contextlib
import os
import threading
import time
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from hetserve.runtime.messages import Ack, Envelope, MessageDecodeError, encode
from hetserve.runtime.transport.base import Buffer, PeerUnavailable, TransferTimeout, TransportError
from hetserve.runtime.transport.nixl_pool import MIB, Block, Grant, Region, layout

_SKEW_S = 5.0
_POLL_S = 0.05


class _Lent:
    """One received message's groups still lent; the sender hears ``free`` once none is left."""

    __slots__ = ("ident", "msg_id", "n")

    def __init__(self, ident: bytes, msg_id: int) -> None:
        self.ident, self.msg_id, self.n = ident, msg_id, 0


class WritePath:
    """Mixed into ``NixlTransport``."""

    if TYPE_CHECKING:
        _name: str
        _peers: dict[str, Any]
        _msg_ids: Any
        _keys: Any
        _tls: Any
        _unpacking_for: bytes
        pool_bytes: int

        def _call(self, method: str, *args: Any) -> Any: ...
        def _send_frames(self, conn: Any, frames: list[Any], deadline_s: float) -> None: ...
        def _wait_acks(self, conn: Any, limit: int, deadline_s: float) -> None: ...
        def _take_replies(self, conn: Any) -> None: ...
        def _reply_to(self, ident: bytes, reply: Any) -> None: ...
        def _landing_kind(self, mem: str, dev: int) -> tuple[str, int]: ...
        def _post(self, local: np.ndarray, lmem: str, far: np.ndarray, rmem: str, remote: str,
                  op: str = "READ") -> Any: ...
        def _wait(self, posted: list[list[Any]], left_s: float, what: str) -> None: ...

    def _init_write(self, landing_max_mb: float | None) -> None:
        mb = float(os.environ.get("HETSERVE_NIXL_LANDING_MAX_MB", "4096")) if landing_max_mb is None else landing_max_mb
        self.landing_max_bytes = max(self.pool_bytes, int(mb * MIB))
        # sender side
        self._regions: dict[tuple[str, tuple[str, int]], Region] = {}  # (peer, source kind) -> its grant here
        self._written: dict[str, dict[int, list[tuple[Region, int]]]] = {}  # peer -> msg_id -> ranges it holds
        self._grants_in: dict[tuple[str, int], dict[str, Any]] = {}  # (peer, hello id) -> the grant answered
        self._remote_md: dict[str, tuple[bytes, str]] = {}  # receiver agent -> (metadata loaded, NIXL's name)
        # receiver side
        self._grants: dict[tuple[str, tuple[str, int]], Grant] = {}  # (sender agent, source kind) -> current
        self._grant_ids: dict[int, Grant] = {}  # every grant still registered, current or retiring
        self._wlock = threading.Lock()
        self._wfreed: collections.deque[tuple[bytes, int]] = collections.deque()
        self._wlent: list[tuple[Grant, _Lent]] = []  # VRAM groups a sink borrowed
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    # ---- sender -------------------------------------------------------------------------------
    def _write_out(self, peer: str, env: Envelope, buffers: Sequence[Buffer], handles: list[dict[str, Any]],
                   staged: Any) -> None:
        """WRITE the staged ``buffers`` (``handles``: where they lie in staging) into ``peer``'s grant; rewrite
        ``handles`` to name the landing ranges."""
        conn = self._peers[peer]
        deadline = staged.deadline_s
        groups: dict[tuple[str, int], list[int]] = {}
        for i, h in enumerate(handles):
            groups.setdefault((h["mem"], int(h["dev"])), []).append(i)
        held = self._written.setdefault(peer, {})[env.msg_id] = []
        posted: list[list[Any]] = []
        regions: list[Region] = []
        try:
            for kind, idx in groups.items():
                sizes = [int(handles[i]["n"]) for i in idx]
                offs, total = layout(sizes)
                region, roff = self._landing_range(conn, peer, kind, env.msg_id, total, deadline)
                held.append((region, env.msg_id))
                regions.append(region)
                rows = [(i, off) for i, off in zip(idx, offs, strict=True) if int(handles[i]["n"])]
                if rows:
                    if kind[0] == "VRAM":
                        from hetserve.runtime.transport.nixl import _cuda_current

                        _cuda_current(kind[1])
                    local = np.array([[handles[i]["addr"], handles[i]["n"], kind[1]] for i, _ in rows], np.uint64)
                    far = np.array([[region.addr + roff + off, handles[i]["n"], region.dev] for i, off in rows],
                                   np.uint64)
                    posted.append(self._post(local, kind[0], far, region.mem, region.agent, "WRITE"))
                for i, off in zip(idx, offs, strict=True):
                    h = handles[i]
                    handles[i] = {"g": region.gid, "off": roff + off, "n": h["n"]}
                    if "dtype" in h:
                        handles[i].update(dtype=h["dtype"], shape=h["shape"])
            self._wait(posted, deadline - time.monotonic(), f"write of message {env.msg_id} to {peer}")
        except BaseException as e:
            if posted:  # a write may still land: keep the staging and the landing memory until it cannot
                staged.failed = True
                unsafe = time.time() + (deadline - time.monotonic()) + 2 * _SKEW_S
                for r in regions:
                    r.unsafe_until = max(r.unsafe_until, unsafe)
            self._written.get(peer, {}).pop(env.msg_id, None)
            if isinstance(e, TimeoutError):
                raise TransferTimeout(str(e)) from None
            if isinstance(e, OSError):
                raise PeerUnavailable(str(e)) from None
            raise

    def _landing_range(self, conn: Any, peer: str, kind: tuple[str, int], key: int, total: int,
                       deadline: float) -> tuple[Region, int]:
        region = self._regions.get((peer, kind))
        if region is None or region.stale or total > region.size:
            region = self._hello(conn, peer, kind, total, deadline, "new" if region is None or region.stale
                                 else "grow")
        grown = False
        while (off := region.alloc(key, total)) is None:
            self._take_replies(conn)  # the frees that came
            if (off := region.alloc(key, total)) is not None:
                break
            if not grown:
                grown = True
                region = self._hello(conn, peer, kind, total, deadline, "grow")
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransferTimeout(f"{peer}'s landing region ({region.size} bytes) had no room for "
                                      f"{total} bytes before the deadline (its views are still held)")
            conn.sock.poll(max(1, int(min(left, _POLL_S) * 1000)))
        return region, off

    def _hello(self, conn: Any, peer: str, kind: tuple[str, int], need: int, deadline: float, mode: str) -> Region:
        """Ask ``peer`` for a landing region for ``kind`` (one round trip on the message's connection)."""
        old = self._regions.get((peer, kind))
        hid = next(self._msg_ids)
        h = {"mem": kind[0], "dev": kind[1], "need": need, "mode": mode, "had": old.gid if old else 0,
             "retire_after": old.unsafe_until if old else 0.0}
        env = Envelope(msg_id=hid, sender=self.address, num_buffers=0, kind="nixl-hello", segment=self._name,
                       handles=[h])
        conn.outstanding[hid] = (deadline, None)
        self._send_frames(conn, [encode(env), encode({})], deadline)
        self._wait_acks(conn, 0, deadline)  # the grant comes just before the acknowledgement
        g = self._grants_in.pop((peer, hid), None)
        if g is None:
            raise TransportError(f"{peer} acknowledged the request for a landing region without granting one")
        if old is not None and not old.stale and int(g["gid"]) == old.gid:
            return old  # it cannot grow: wait for room in it
        agent = str(g["agent"])
        md = bytes(g["md"])
        known = self._remote_md.get(agent)
        if known is None or known[0] != md:  # newer metadata (a new block) updates the peer's
            name = self._call("add_remote_agent", md)
            self._remote_md[agent] = (md, name.decode() if isinstance(name, bytes) else str(name))
        region = self._regions[peer, kind] = Region(g, self._remote_md[agent][1])
        return region

    def _on_reply(self, peer: str, reply: dict[str, Any]) -> None:
        if isinstance(reply.get("grant"), dict):
            self._grants_in[peer, int(reply.get("for", -1))] = reply["grant"]

    def _on_free(self, peer: str, msg_ids: list[int]) -> None:
        held = self._written.get(peer)
        if held:
            for m in msg_ids:
                for region, key in held.pop(m, []):
                    region.free(key)

    def _forget_peer(self, peer: str) -> None:
        """The connection is gone, and the frees that would have come on it: ask for new grants next time."""
        self._written.pop(peer, None)
        for (p, _), region in self._regions.items():
            if p == peer:
                region.stale = True

    # ---- receiver -----------------------------------------------------------------------------
    def _grant(self, ident: bytes, env: Envelope) -> None:
        """Answer a ``nixl-hello`` (receiving thread): the grant, then the acknowledgement; or a refusal."""
        try:
            h = env.handles[0] if env.handles else None
            if not isinstance(h, dict):
                raise MessageDecodeError("a nixl-hello names the memory kind and the bytes needed")
            kind, need, owner = (str(h["mem"]), int(h["dev"])), int(h["need"]), env.segment
            if need > self.landing_max_bytes:
                raise MessageDecodeError(f"a message of {need} bytes exceeds this receiver's landing limit "
                                         f"({self.landing_max_bytes} bytes, HETSERVE_NIXL_LANDING_MAX_MB)")
            old = self._grants.get((owner, kind))
            size = max(self.pool_bytes, -(-need // MIB) * MIB)
            if old is not None and h.get("mode") == "grow":
                size = max(size, min(2 * old.blk.size, self.landing_max_bytes))
            if old is not None and old.gid == int(h.get("had", 0)) and h.get("mode") == "grow" \
                    and size <= old.blk.size:
                g = old  # no larger grant: the sender waits for room in this one
            else:
                lmem, ldev = self._landing_kind(*kind)
                if lmem == "VRAM":
                    from hetserve.runtime.transport.nixl import _cuda_current

                    _cuda_current(ldev)
                g = Grant(Block(self, lmem, ldev, size, False), owner, next(self._keys))  # type: ignore[arg-type]
                self._grants[owner, kind] = g
                self._grant_ids[g.gid] = g
                after = float(h.get("retire_after", 0.0))
                for prev in {old, self._grant_ids.get(int(h.get("had", 0)))}:
                    if prev is not None and prev is not g and prev.owner == owner:
                        prev.retire_after = max(prev.retire_after or 0.0, after)
            md = self._call("get_agent_metadata")
        except (MessageDecodeError, KeyError, TypeError, ValueError, OSError) as e:
            self._reply_to(ident, Ack(msg_id=env.msg_id, ok=False, error=str(e)))
            return
        except Exception as e:  # noqa: BLE001 - NIXL's errors (registration failed): refuse, keep the thread
            self._reply_to(ident, Ack(msg_id=env.msg_id, ok=False, error=f"{type(e).__name__}: {e}"))
            return
        self._reply_to(ident, {"for": env.msg_id, "grant": {
            "gid": g.gid, "agent": self._name, "md": md, "addr": g.blk.addr, "size": g.blk.size,
            "mem": g.blk.mem, "dev": g.blk.dev}})
        self._reply_to(ident, Ack(msg_id=env.msg_id))
        self._sweep_grants()

    def _land(self, env: Envelope) -> tuple[list[Buffer], list[tuple[Grant, _Lent]]]:
        """Views of a written message's landing ranges: host ones release their group once gone; the VRAM
        groups are returned for the caller to release."""
        hs = env.handles
        if len(hs) != env.num_buffers or not hs or any(not isinstance(h, dict) for h in hs):
            raise MessageDecodeError(f"{env.num_buffers} buffers announced, {len(hs)} descriptors")
        groups: dict[int, list[int]] = {}
        for i, h in enumerate(hs):
            groups.setdefault(int(h["g"]), []).append(i)
        lent = _Lent(self._unpacking_for, env.msg_id)
        views: list[Buffer] = [b""] * len(hs)
        dev_groups: list[tuple[Grant, _Lent]] = []
        for gid, idx in groups.items():
            g = self._grant_ids.get(gid)
            if g is None or g.owner != env.segment:
                raise MessageDecodeError(f"message {env.msg_id} names landing region {gid}, not granted to "
                                         f"{env.segment!r} (a new connection asks for a new one)")
            spans = [(int(hs[i]["off"]), int(hs[i]["n"])) for i in idx]
            if any(off < 0 or n < 0 or off + n > g.blk.size for off, n in spans):
                raise MessageDecodeError(f"message {env.msg_id} names bytes outside its landing region")
        for gid, idx in groups.items():
            g = self._grant_ids[gid]
            with self._wlock:
                g.views += 1
                lent.n += 1
            if g.blk.mem == "VRAM":
                import torch

                for i in idx:
                    t = g.blk.buf.narrow(0, int(hs[i]["off"]), int(hs[i]["n"]))
                    if "dtype" in hs[i]:
                        t = t.view(getattr(torch, hs[i]["dtype"])).view(hs[i]["shape"])
                    views[i] = t
                dev_groups.append((g, lent))
                continue
            lo = min(int(hs[i]["off"]) for i in idx)
            hi = max(int(hs[i]["off"]) + int(hs[i]["n"]) for i in idx)
            arr = np.frombuffer(g.blk.buf, dtype=np.uint8, count=hi - lo, offset=lo)
            arr.flags.writeable = False
            weakref.finalize(arr, self._wrelease, g, lent)
            whole = memoryview(arr)
            for i in idx:
                off = int(hs[i]["off"]) - lo
                views[i] = whole[off: off + int(hs[i]["n"])]
        return views, dev_groups

    def _wrelease(self, g: Grant, lent: _Lent) -> None:
        """A group's views are gone (any thread): once the message's last one is, tell its sender."""
        with self._wlock:
            g.views -= 1
            lent.n -= 1
            if lent.n:
                return
            self._wfreed.append((lent.ident, lent.msg_id))
            if self._wake_w >= 0:
                with contextlib.suppress(OSError):  # a full pipe already wakes the thread
                    os.write(self._wake_w, b"x")

    def _service_write(self) -> None:
        """Receiving thread: release what a sink borrowed, report the frees, retire grants no longer needed."""
        with contextlib.suppress(OSError):
            os.read(self._wake_r, 4096)
        lent, self._wlent = self._wlent, []
        for g, msg in lent:
            self._wrelease(g, msg)
        by_ident: dict[bytes, list[int]] = {}
        while self._wfreed:
            ident, m = self._wfreed.popleft()
            by_ident.setdefault(ident, []).append(m)
        for ident, ids in by_ident.items():
            self._reply_to(ident, {"free": ids})
        self._sweep_grants()

    def _sweep_grants(self) -> None:
        now = time.time()
        for g in [g for g in self._grant_ids.values() if g.retire_after is not None]:
            if g.views == 0 and now > g.retire_after:
                del self._grant_ids[g.gid]
                with contextlib.suppress(Exception):
                    self._call("deregister_memory", g.blk.reg)

    def _close_write(self) -> None:
        for g in self._grant_ids.values():
            with contextlib.suppress(Exception):
                self._call("deregister_memory", g.blk.reg)
        self._grant_ids.clear()
        self._grants.clear()
        with self._wlock:
            r, w, self._wake_r, self._wake_w = self._wake_r, self._wake_w, -1, -1
        os.close(r)
        os.close(w)
