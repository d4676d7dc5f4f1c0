"""Paced KVTransferEngine on one host: the commit goes out at once with ``not_before_s`` and the receiver holds the
KV until then (deadlines, cancellations and late polls keep their meaning)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from hetserve.core.devices import LinkSpec
from hetserve.runtime.kv_layout import KVDescriptor
from hetserve.runtime.kv_transfer import KVTransferEngine
from hetserve.runtime.messages import KVCommit
from hetserve.runtime.transport import make_transport

D = KVDescriptor(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype="float32")
NB = 8
TOKENS = NB * D.block_size


def _caches(zeros: bool) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return [torch.zeros(2, NB, 4, 2, 8) if zeros else torch.randn(2, NB, 4, 2, 8, generator=g) for _ in range(2)]


def _pair(kind: str, need_s: float) -> tuple[KVTransferEngine, KVTransferEngine]:
    nbytes = D.payload_bytes(TOKENS, D.num_kv_heads)
    link = LinkSpec("emulated", "ethernet", bandwidth_bytes_per_s=nbytes / need_s, latency_s=0.0)
    s = KVTransferEngine(make_transport(kind), D, _caches(False), link=link)
    r = KVTransferEngine(make_transport(kind), D, _caches(True))
    return s, r


def _close(*engines: KVTransferEngine) -> None:
    for e in engines:
        e.transport.close()


def _landed(r: KVTransferEngine) -> bool:
    return any(c.any() for c in r.kv_caches)  # type: ignore[union-attr]


def _send_in_thread(s: KVTransferEngine, r: KVTransferEngine, out: list) -> threading.Thread:
    th = threading.Thread(target=lambda: out.append(
        s.send(r.transport.address, D, "t", "req", list(range(NB)), TOKENS, time.monotonic() + 5)))
    th.start()
    return th


def _until_held(r: KVTransferEngine, timeout_s: float = 2.0) -> None:
    """Poll until the data and the commit are in (the transfer complete, held until its time)."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        assert r.poll(0.001) == []
        inc = r._incoming.get("t")
        if inc is not None and inc.complete:
            return
    raise AssertionError("the commit never came")


@pytest.mark.parametrize("kind", ["local", "shm"])
def test_commit_carries_not_before_and_the_receiver_holds_the_kv_until_then(kind: str) -> None:
    s, r = _pair(kind, need_s=0.15)
    try:
        r.expect("t", "req", list(range(NB)), TOKENS, D, time.monotonic() + 5)
        t0 = time.monotonic()
        sent: list = []
        th = _send_in_thread(s, r, sent)
        _until_held(r)  # both messages arrive long before the declared time, and nothing is written yet
        assert time.monotonic() - t0 < 0.1 and not _landed(r)
        got = r.poll(1.0)  # returns when the hold ends, not after the whole timeout
        took = time.monotonic() - t0
        assert len(got) == 1 and got[0].success and _landed(r)
        assert 0.15 <= took < 0.3
        th.join()
        assert sent[0].success and 0.15 <= sent[0].link_s < 0.15 + 0.05  # no commit round trip after the wait
    finally:
        _close(s, r)


def test_a_held_transfer_whose_link_ends_after_the_receivers_deadline_fails() -> None:
    s, r = _pair("local", need_s=0.3)
    try:
        r.expect("t", "req", list(range(NB)), TOKENS, D, time.monotonic() + 0.1)  # shorter than the link
        assert s.send(r.transport.address, D, "t", "req", list(range(NB)), TOKENS, time.monotonic() + 5).success
        deadline = time.monotonic() + 2
        got = []
        while not got and time.monotonic() < deadline:
            got = r.poll(0.05)
        assert len(got) == 1 and not got[0].success and "after the deadline" in (got[0].error or "")
        assert not _landed(r) and r.num_expected == 0
    finally:
        _close(s, r)


def test_cancel_while_held_writes_nothing() -> None:
    s, r = _pair("local", need_s=0.1)
    try:
        r.expect("t", "req", list(range(NB)), TOKENS, D, time.monotonic() + 5)
        sent: list = []
        th = _send_in_thread(s, r, sent)
        _until_held(r)
        assert r.cancel("t") is True
        th.join()
        time.sleep(0.02)
        assert r.poll(0.05) == [] and not _landed(r) and r.num_expected == 0
    finally:
        _close(s, r)


def test_a_late_poll_still_finishes_a_transfer_usable_before_its_deadline() -> None:
    s, r = _pair("local", need_s=0.05)
    try:
        r.expect("t", "req", list(range(NB)), TOKENS, D, time.monotonic() + 0.2)
        assert s.send(r.transport.address, D, "t", "req", list(range(NB)), TOKENS, time.monotonic() + 5).success
        time.sleep(0.3)  # the receiver was busy past its deadline; the KV was usable from 0.05 s
        (res,) = r.poll(0.0)
        assert res.success and _landed(r)
    finally:
        _close(s, r)


def test_the_commit_after_the_data_is_not_before_the_declared_time() -> None:
    """What goes on the wire: the data, then at once a commit naming when the link would have delivered it."""
    s, r = _pair("local", need_s=0.1)
    try:
        t0 = time.monotonic()
        assert s.send(r.transport.address, D, "t", "req", list(range(NB)), TOKENS, time.monotonic() + 5).success
        _data, _ = r.transport.recv(1.0)
        commit, _ = r.transport.recv(1.0)
        assert isinstance(commit, KVCommit) and commit.not_before_s >= t0 + 0.1
    finally:
        _close(s, r)


def test_tcp_keeps_the_commit_after_the_wait() -> None:
    """Another host's clock is not ours: over tcp the commit carries no time and leaves once the wait is over."""
    s, r = _pair("tcp", need_s=0.1)
    try:
        t0 = time.monotonic()
        assert s.send(r.transport.address, D, "t", "req", list(range(NB)), TOKENS, time.monotonic() + 5).success
        r.transport.recv(1.0)
        commit, _ = r.transport.recv(1.0)
        assert isinstance(commit, KVCommit) and commit.not_before_s == 0.0
        assert time.monotonic() - t0 >= 0.1
    finally:
        _close(s, r)
