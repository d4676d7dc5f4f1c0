"""The shm transport's reused pool and send window: intact and in order with the window full, a range never
rewritten while the receiver still reads it, and a dead receiver with sends outstanding frees everything."""

from __future__ import annotations

import gc
import hashlib
import time
from collections.abc import Iterator

import pytest
import zmq

from hetserve.runtime.transport import PeerUnavailable, TransferTimeout, TransportError
from hetserve.runtime.transport.shm import ShmTransport, live_pools, live_segments


def payload(num_bytes: int, seed: int) -> bytes:
    return hashlib.shake_256(seed.to_bytes(4, "little")).digest(num_bytes)


@pytest.fixture
def small_pool(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("HETSERVE_SHM_POOL_MB", "4")  # 1 MiB messages: at most 4 ranges at once
    yield


def test_window_full_back_to_back_sends_arrive_intact_and_in_order(small_pool: None) -> None:
    sizes = [2**20, 1000, 3 * 2**19, 70_000, 2**20 + 7, 0]
    with ShmTransport(window=4) as a, ShmTransport() as b:
        sent = [(i, payload(sizes[i % len(sizes)], i)) for i in range(40)]
        for i, data in sent:  # the receiver takes nothing yet: the window fills, then sends wait for acks
            a.send(b.address, {"i": i}, [data, b"tail"], time.monotonic() + 10)
            if i == 5:
                for j in range(6):
                    header, bufs = b.recv(5)
                    assert header == {"i": j} and bytes(bufs[0]) == sent[j][1]
        for j in range(6, 40):
            header, bufs = b.recv(5)
            assert header == {"i": j} and bytes(bufs[0]) == sent[j][1] and bytes(bufs[1]) == b"tail"
            del bufs
        a.flush(b.address, time.monotonic() + 5)
        assert live_segments() == [] and len(live_pools()) == 1
    assert live_pools() == [] and live_segments() == []


def test_a_range_is_not_reused_while_the_receiver_holds_its_view(small_pool: None) -> None:
    with ShmTransport(window=2) as a, ShmTransport() as b:
        first = payload(2**20, 100)
        a.send(b.address, {"i": 0}, [first], time.monotonic() + 10)
        _, held = b.recv(5)  # kept: its range must stay as it is
        offsets = set()
        for i in range(1, 12):
            a.send(b.address, {"i": i}, [payload(2**20, 100 + i)], time.monotonic() + 10)
            _, bufs = b.recv(5)
            assert bytes(bufs[0]) == payload(2**20, 100 + i)
            del bufs
            gc.collect()
            time.sleep(0.02)  # the receiver's thread reports the release
            pool = a._pools[b.address]
            offsets |= {off for off, _ in pool.held.values()}
            assert bytes(held[0]) == first, f"the held range was rewritten by message {i}"
        # the released ranges were reused (a 4 MiB pool took 11 more 1 MiB messages), the held one never
        assert len(offsets) <= 3 and not live_segments()
        del held
        gc.collect()
        time.sleep(0.05)
        a.send(b.address, {"i": 99}, [b"x" * 100_000], time.monotonic() + 10)
        b.recv(5)
        a.flush(b.address, time.monotonic() + 5)
        assert len(a._pools[b.address].held) <= 1


def test_a_full_pool_falls_back_to_a_segment_of_its_own(small_pool: None) -> None:
    with ShmTransport(window=8) as a, ShmTransport() as b:
        kept = []
        for i in range(6):  # 4 fit the pool; the rest go through one-off segments
            a.send(b.address, {"i": i}, [payload(2**20, 200 + i)], time.monotonic() + 10)
            kept.append(b.recv(5)[1])
        a.flush(b.address, time.monotonic() + 5)
        assert [bytes(k[0]) for k in kept] == [payload(2**20, 200 + i) for i in range(6)]
        assert live_segments() == []  # a one-off segment is unlinked once acknowledged


@pytest.mark.parametrize("close_peer", [True, False], ids=["peer-gone", "peer-silent"])
def test_outstanding_sends_to_a_dead_receiver_fail_explicitly_and_free_everything(close_peer: bool) -> None:
    ctx = zmq.Context()
    silent = ctx.socket(zmq.ROUTER)  # takes the frames, never acknowledges
    silent.setsockopt(zmq.LINGER, 0)
    silent.bind("tcp://127.0.0.1:*")
    peer = silent.getsockopt(zmq.LAST_ENDPOINT).decode()
    try:
        with ShmTransport(window=4) as a:
            for i in range(3):
                a.send(peer, {"i": i}, [payload(2**20, i)], time.monotonic() + 10)  # outstanding
            assert len(live_pools()) == 1
            t0 = time.monotonic()
            if close_peer:
                silent.close()
                with pytest.raises(PeerUnavailable):
                    a.flush(peer, time.monotonic() + 10)
            else:
                # the 4th send fills the window: it waits for an acknowledgement and fails at its deadline
                with pytest.raises(TransferTimeout):
                    a.send(peer, {"i": 3}, [payload(2**20, 3)], time.monotonic() + 0.3)
                assert time.monotonic() - t0 >= 0.29
            assert time.monotonic() - t0 < 2.0
            assert a.num_peer_connections == 0
            assert live_pools() == [] and live_segments() == []
    finally:
        silent.close()
        ctx.term()


def test_a_refusal_found_late_is_raised_by_flush() -> None:
    with ShmTransport(window=4) as a, ShmTransport() as b:
        a.send(b.address, {"i": 0}, [b"x" * 100_000], time.monotonic() + 10)
        b.close()  # taken or not, the next send or flush must not pretend it was delivered
        with pytest.raises(TransportError):
            a.send(b.address, {"i": 1}, [b"y" * 100_000], time.monotonic() + 2)
            a.flush(b.address, time.monotonic() + 2)
        assert live_pools() == [] and live_segments() == []
