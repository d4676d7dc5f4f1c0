"""The CUDA staging ring's bookkeeping on a CPU: ``SpanRing`` never hands out a held span, and a model of the
protocol (the receiver acknowledges once its copy is enqueued, releases the span once the copy completed) over
the real zmq transport keeps every message intact, where releasing on the acknowledgement would not."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest

from hetserve.runtime.messages import Envelope
from hetserve.runtime.transport.base import PeerUnavailable, TransferTimeout
from hetserve.runtime.transport.staging_ring import CopyReleaser, Released, SpanRing, ring_capacity
from hetserve.runtime.transport.tcp import ZmqTransport


# ---- SpanRing -------------------------------------------------------------------------------------
def test_ring_never_hands_out_a_held_byte_and_reuses_released_ones() -> None:
    rng = random.Random(0)
    ring = SpanRing(64 * 1024, align=256)
    live: dict[int, tuple[int, int]] = {}
    full = 0
    for m in range(5000):
        if live and rng.random() < 0.45:
            victim = rng.choice(list(live)) if rng.random() < 0.2 else min(live)  # mostly in order, as copies end
            ring.free([victim])
            del live[victim]
            continue
        n = rng.choice([1, 100, 256, 3000, 9000, 20000])
        off = ring.alloc(m, n)
        if off is None:
            full += 1
            assert sum(-(-max(k, 1) // 256) * 256 for _, k in live.values()) + 256 > 0
            continue
        assert off % 256 == 0 and off + n <= ring.capacity
        for o, k in live.values():
            assert off + n <= o or o + k <= off, "a held span was handed out again"
        live[m] = (off, n)
    assert full > 0  # the ring did fill up, and recovered
    ring.free(list(live))
    assert ring.bytes_held == 0 and ring.alloc(10**6, ring.capacity) == 0


def test_ring_edges() -> None:
    ring = SpanRing(1024, align=256)
    assert not ring.fits(1025) and ring.alloc(1, 1025) is None
    assert ring.alloc(1, 512) == 0 and ring.alloc(2, 512) == 512 and ring.alloc(3, 1) is None
    ring.free([1])
    assert ring.alloc(3, 256) == 0  # wrapped to the start
    ring.free([99])  # unknown (an older ring's message): ignored
    assert ring.alloc(3, 10) is None  # one message, one span
    assert ring_capacity(100, 0, 1 << 30) == 16 * 2**20
    assert ring_capacity(40 << 20, 16 << 20, 1 << 30) == 80 << 20
    assert ring_capacity(900 << 20, 16 << 20, 1 << 30) == 1 << 30
    assert ring_capacity(1 << 30, 16 << 20, 1 << 30) == 1 << 30


class _FakeCopy:
    def __init__(self) -> None:
        self.done = threading.Event()

    def synchronize(self) -> None:
        self.done.wait()


def test_releaser_reports_each_copy_only_once_it_completed_in_order() -> None:
    got: list[tuple[bytes, int]] = []
    rel = CopyReleaser(lambda ident, m: got.append((ident, m)))
    copies = [_FakeCopy() for _ in range(3)]
    for i, c in enumerate(copies):
        rel.add(c, b"a", i)
    time.sleep(0.05)
    assert got == []
    copies[0].done.set()
    copies[1].done.set()
    time.sleep(0.05)
    assert got == [(b"a", 0), (b"a", 1)]
    t0 = time.monotonic()
    rel.close()  # the third never completes: not reported, and close does not hang on it
    assert got == [(b"a", 0), (b"a", 1)] and time.monotonic() - t0 < 1.0
    r = Released()
    r.add(b"a", 1)
    r.add(b"b", 2)
    r.add(b"a", 3)
    assert r.drain() == {b"a": [1, 3], b"b": [2]} and r.drain() == {}


# ---- the protocol, modelled over the zmq transport ------------------------------------------------
# "device memory": one bytearray per sender that both endpoints see (one process); the receiver's copy out of a
# span runs later on a thread (its stream), as an enqueued CUDA copy would.
_MEM: dict[str, bytearray] = {}


class _ModelSender(ZmqTransport):
    """Stages each message's one buffer into a span of a small ring; sends only the span."""

    def __init__(self, capacity: int, release_on_ack: bool = False) -> None:
        super().__init__(window=4)
        self.ring = SpanRing(capacity, align=64)
        self.key = self.address
        _MEM[self.key] = bytearray(capacity)
        self.release_on_ack = release_on_ack  # the mutation: must corrupt messages
        self.waited = 0
        self.retired = 0

    def _pack(self, peer: str, msg_id: int, buffers: Sequence[Any]) -> Any:
        data = bytes(buffers[0])
        off = self.ring.alloc(msg_id, len(data))
        if off is None:
            self.waited += 1
            return None
        _MEM[self.key][off:off + len(data)] = data
        env = Envelope(msg_id=msg_id, sender=self.address, num_buffers=1,
                       handles=[{"mem": self.key, "span": [off, len(data)]}])
        return env, [], msg_id

    def _may_return_early(self, state: Any) -> bool:
        return True

    def _release(self, state: Any) -> None:
        if self.release_on_ack:
            self.ring.free([state])

    def _on_span_free(self, peer: str, msg_ids: list[int]) -> None:
        self.ring.free(msg_ids)

    def _peer_dropped(self, peer: str) -> None:
        self.retired += 1
        self.ring = SpanRing(self.ring.capacity, align=64)
        self.key = f"{self.address}/{self.retired}"  # a new buffer: the old one is never written again
        _MEM[self.key] = bytearray(self.ring.capacity)


class _ModelReceiver(ZmqTransport):
    """Acknowledges once the copy is enqueued; the copy runs late (random delay); the span is released after."""

    def __init__(self, seed: int, max_delay_s: float = 0.004) -> None:
        self._rng = random.Random(seed)
        self.max_delay_s = max_delay_s
        self._released = Released()
        self._wake_r, self._wake_w = __import__("os").pipe()
        self._releaser = CopyReleaser(self._copied)
        super().__init__(window=1)

    def _copied(self, ident: bytes, msg_id: int) -> None:
        self._released.add(ident, msg_id)
        __import__("os").write(self._wake_w, b"x")

    def _wake_fd(self) -> int | None:
        return self._wake_r

    def _service(self) -> None:
        import os

        os.set_blocking(self._wake_r, False)
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass
        for ident, ids in self._released.drain().items():
            self._reply_to(ident, {"span_free": ids})

    def _unpack(self, env: Envelope, frames: list[Any]) -> list[Any]:
        h = env.handles[0]
        off, n = h["span"]
        out = bytearray(n)
        copy = _LateCopy(lambda: out.__setitem__(slice(0, n), _MEM[h["mem"]][off:off + n]),
                         self._rng.uniform(0, self.max_delay_s))
        self._releaser.add(copy, self._unpacking_for, env.msg_id)
        return [(copy, out)]

    def recv(self, timeout_s: float) -> tuple[Any, list[Any]]:
        header, bufs = super().recv(timeout_s)
        copy, out = bufs[0]
        copy.synchronize()  # the caller's stream waits for the copy
        return header, [bytes(out)]

    def close(self) -> None:
        super().close()
        self._releaser.close()


class _LateCopy:
    """An enqueued copy: it runs on a timer (the copy stream), ``synchronize`` waits for it."""

    def __init__(self, fn: Any, delay_s: float) -> None:
        self._done = threading.Event()

        def run() -> None:
            time.sleep(delay_s)
            fn()
            self._done.set()

        threading.Thread(target=run, daemon=True).start()

    def synchronize(self) -> None:
        self._done.wait()


def _stream(release_on_ack: bool, n: int = 60) -> tuple[int, int]:
    """-> (corrupted messages, sends that waited for room)."""
    tx = _ModelSender(capacity=4 * 4096, release_on_ack=release_on_ack)
    rx = _ModelReceiver(seed=1)
    bad = 0
    try:
        msgs = [bytes([i % 251]) * random.Random(i).choice([1000, 4096, 6000]) for i in range(n)]

        def consume() -> None:
            nonlocal bad
            for i in range(n):
                _, bufs = rx.recv(10)
                bad += bufs[0] != msgs[i]

        th = threading.Thread(target=consume)
        th.start()
        for m in msgs:
            tx.send(rx.address, {}, [m], time.monotonic() + 10)
        tx.flush(rx.address, time.monotonic() + 10)
        th.join(20)
        return bad, tx.waited
    finally:
        tx.close()
        rx.close()


def test_spans_released_after_the_copy_keep_every_message_intact() -> None:
    bad, waited = _stream(release_on_ack=False)
    assert bad == 0
    assert waited > 0  # the ring was full at times: sends waited for releases, none overwrote a held span


def test_the_model_catches_a_ring_released_on_the_acknowledgement() -> None:
    bad, _ = _stream(release_on_ack=True)
    assert bad > 0  # the mutation: the sender rewrote spans the receiver had not copied out yet


def test_a_full_ring_fails_at_the_deadline_or_on_a_dead_receiver_and_is_retired() -> None:
    tx = _ModelSender(capacity=4096)
    rx = _ModelReceiver(seed=2, max_delay_s=60.0)  # copies that never finish in time: no span is released
    try:
        tx.send(rx.address, {}, [b"x" * 4096], time.monotonic() + 5)
        t0 = time.monotonic()
        with pytest.raises(TransferTimeout):
            tx.send(rx.address, {}, [b"y" * 100], time.monotonic() + 0.2)
        assert 0.19 <= time.monotonic() - t0 < 1.0
        assert tx.retired == 1 and tx.ring.bytes_held == 0  # dropped: the old ring is never written again
        tx.send(rx.address, {}, [b"z" * 4096], time.monotonic() + 5)  # a new ring
        rx.close()
        t0 = time.monotonic()
        with pytest.raises(PeerUnavailable):
            tx.send(rx.address, {}, [b"w" * 100], time.monotonic() + 5)
        assert time.monotonic() - t0 < 2.0 and tx.retired >= 2
    finally:
        tx.close()
        rx.close()
