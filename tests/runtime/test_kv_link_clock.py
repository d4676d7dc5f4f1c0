"""A sender's declared link is shared first come, first served, as the simulator's links are: back-to-back hand-offs
are never usable earlier than one serial link allows, yet the sender does not wait out one hand-off's link time
before it sends the next one's bytes (their fixed costs overlap)."""

from __future__ import annotations

import time

import pytest
import torch

from tests.runtime.test_kv_direct import _direct_pair, _expect_cmd, _send_cmd, _tokens_of


@pytest.mark.parametrize("kind", ["local", "tcp"], ids=["one-host", "cross-host-commit"])
def test_back_to_back_hand_offs_share_one_serial_link(kind: str) -> None:
    from hetserve.core.devices import LinkSpec
    from hetserve.runtime.kv_direct import DirectKV, open_endpoints
    from hetserve.runtime.kv_messages import KVSent

    snd, rcv, replies = _direct_pair(one_block=True)
    if kind != "local":  # tcp: another host as far as the sender knows, so a timer sends each commit
        snd.close()
        rcv.close()
        snd = DirectKV(snd.runner, snd.desc, open_endpoints((kind,)), replies.append)
        rcv = DirectKV(rcv.runner, rcv.desc, open_endpoints((kind,)), replies.append)
    try:
        n, k = 50, 4
        wire, probe = _send_cmd(snd, rcv, "p", n, kind=kind)
        nbytes = probe.wire.payload_bytes(n, snd.desc.num_kv_heads)
        bw = nbytes / 0.08  # 80 ms a hand-off on the declared link: far above the fixed costs here
        link = LinkSpec("declared", "ethernet", bw, 0.0)
        for i in range(k):
            rcv.expect(_expect_cmd(f"s{i}", n, wire))
        for i in range(k):
            snd.send(_send_cmd(snd, rcv, f"s{i}", n, bw=bw, kind=kind)[1])
        got = []
        t0 = time.monotonic()
        while len(got) < k:
            assert time.monotonic() - t0 < 10, got
            got += rcv.poll(0.01)
        while sum(isinstance(r, KVSent) for r in replies) < k:
            assert time.monotonic() - t0 < 10, replies
            time.sleep(0.01)
        kin = {r.transfer_id: r for r in got}
        sent = {r.transfer_id: r for r in replies if isinstance(r, KVSent)}
        assert all(r.ok for r in kin.values()) and all(r.ok for r in sent.values()), (kin, sent)
        assert all(r.num_bytes == nbytes for r in sent.values())
        first = sent["s0"].stages.get("at_first", sent["s0"].t0_mono)
        for i in range(k):
            s, r = sent[f"s{i}"], kin[f"s{i}"]
            # never early: hand-off i is usable no sooner than i + 1 serial link times after the first byte
            assert r.ready_mono >= first + (i + 1) * link.transfer_time_s(nbytes) - 1e-6, (i, r.ready_mono - first)
            if i:
                prev = sent[f"s{i - 1}"]
                assert s.t0_mono >= prev.t0_mono + link.transfer_time_s(nbytes) - 1e-6  # the link is FIFO
                # ... but its bytes left before the previous hand-off's link time was through
                assert s.stages.get("at_first", s.t0_mono) < prev.t0_mono + link.transfer_time_s(nbytes), i
            assert s.wall_s >= s.declared_s - 1e-6  # KVSent only once its declared link time is through
        # not much later than the serial link either (the sender thread never waited a hand-off out)
        assert kin[f"s{k - 1}"].ready_mono - first < k * 0.08 + 0.5
        want = _tokens_of(snd.runner.kv_caches, [3, 5, 7, 9], 16, n)
        assert torch.equal(_tokens_of(rcv.runner.kv_caches, [4, 6], 32, n), want)
    finally:
        snd.close()
        rcv.close()
