"""The NIXL transport, for real: payloads read one-sidedly through NIXL (UCX) on the CPU, between two transports
of one process and between two processes, then a PD hand-off whose KV crosses over ``nixl`` and must give the
single-device engine's greedy tokens. Skipped where ``nixl`` is not importable (CI: no NIXL there)."""

from __future__ import annotations

import subprocess
import sys
import time

import numpy as np
import pytest

from hetserve.core.cluster import load_cluster
from hetserve.core.sampling_params import SamplingParams
from hetserve.llm import LLM
from hetserve.runtime.kv_handoff import KVLink
from hetserve.runtime.transport import PeerUnavailable, TransferTimeout, TransportError, make_transport
from hetserve.runtime.transport.nixl import nixl_unavailable_reason
from tests.runtime.helpers import assert_no_leaks

pytestmark = pytest.mark.skipif(nixl_unavailable_reason() is not None,
                                reason=f"NIXL is not importable here: {nixl_unavailable_reason()}")

KiB, MiB = 1024, 2**20
# (sizes of one message's buffers): empty, inline, just past inline, several, large, an empty one among others
MESSAGES = [[], [0], [10], [64 * KiB + 1], [3, 100_000, 0, 7], [1 * MiB], [5 * MiB + 3, 17], [24 * MiB]]


def _payload(sizes: list[int], seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]


def _deadline(s: float = 10.0) -> float:
    return time.monotonic() + s


@pytest.fixture(params=["WRITE", "READ"])
def op(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The sender WRITEs into the receiver's grant (default) or the receiver READs the sender's staging."""
    monkeypatch.setenv("HETSERVE_NIXL_OP", request.param)
    return request.param


def test_messages_between_two_endpoints(op: str) -> None:
    # ``b`` reads every non-empty message through NIXL, ``a`` only those past 64 KiB
    with make_transport("nixl") as a, make_transport("nixl", inline_max_bytes=0) as b:
        for seed, sizes in enumerate(MESSAGES):
            for src, dst in ((a, b), (b, a)):
                bufs = _payload(sizes, seed)
                src.send(dst.address, {"seed": seed, "sizes": sizes}, bufs, _deadline())
                header, got = dst.recv(10.0)
                assert header == {"seed": seed, "sizes": sizes}
                assert [bytes(g) for g in got] == bufs
        # the large ones really went through NIXL: staging registered on both sides, landing too
        if op == "READ":
            assert a._staging and b._landing and a._landing
        else:  # each granted the other a landing region; nothing was read
            assert a._staging and b._grant_ids and a._grant_ids and not b._landing and not a._landing


def test_order_and_lent_views_stay_valid(op: str) -> None:
    with make_transport("nixl", inline_max_bytes=0) as a, make_transport("nixl", pool_mb=1) as b:
        sent = [_payload([200 * KiB, 1 + i], 100 + i) for i in range(12)]
        held = []
        for i, bufs in enumerate(sent):
            a.send(b.address, {"i": i}, bufs, _deadline())
            header, got = b.recv(10.0)
            assert header == {"i": i}  # arrival order is send order
            held.append(got)  # kept: their landing ranges must not be reused (the 1 MiB pool grows instead)
            with pytest.raises(TypeError):
                got[0][0] = 0  # read-only
        assert [[bytes(g) for g in got] for got in held] == sent
        if op == "READ":
            grown = [blk.size for blk in b._landing["DRAM", 0].blocks]
        else:  # the sender asked for a larger grant; the older ones stay while their views are held
            grown = [g.blk.size for g in b._grant_ids.values()]
            assert len(grown) > 1
        assert max(grown) > MiB
        held.clear()
        a.send(b.address, {"i": "after"}, sent[0], _deadline())  # frees what the dropped views held
        assert [bytes(g) for g in b.recv(10.0)[1]] == sent[0]
        if op == "READ":
            assert len(b._landing["DRAM", 0].blocks) == 1, "older landing blocks are deregistered once free"
        else:
            assert len(b._grant_ids) == 1, "older grants are deregistered once nothing in them is lent"


def test_metadata_once_per_peer(op: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with make_transport("nixl", inline_max_bytes=0) as a, make_transport("nixl") as b:
        added = []
        loader = b if op == "READ" else a  # READ: the receiver loads the sender's; WRITE: the other way round
        orig = loader._agent.add_remote_agent
        monkeypatch.setattr(loader._agent, "add_remote_agent", lambda md: (added.append(len(md)), orig(md))[1])
        for i in range(5):
            a.send(b.address, {"i": i}, _payload([4 * KiB], i), _deadline())
            b.recv(10.0)
        assert len(added) == 1
        a.send(b.address, {"i": "big"}, _payload([64 * MiB], 9), _deadline())  # a new staging block: new metadata
        assert [bytes(g) for g in b.recv(10.0)[1]] == _payload([64 * MiB], 9)
        assert len(added) == 2


def test_deadline_and_unreachable_peer(op: str) -> None:
    with make_transport("nixl", inline_max_bytes=0) as a, make_transport("nixl", max_queued=1) as b:
        first, second, third = _payload([300 * KiB], 1), _payload([300 * KiB], 2), _payload([300 * KiB], 3)
        a.send(b.address, {"i": 1}, first, _deadline())  # queued at b: nobody calls recv yet
        t0 = time.monotonic()
        with pytest.raises(TransferTimeout):  # b read it, but its full inbox holds the acknowledgement back
            a.send(b.address, {"i": 2}, second, time.monotonic() + 0.3)
        assert time.monotonic() - t0 < 1.5
        # the failed message's staging is not reused while b may still read it
        if op == "READ":
            assert a._staging["DRAM", 0].quarantined
        else:  # written before the deadline: nothing in flight; its grant is given up with the connection
            assert not a._staging["DRAM", 0].quarantined and not a._written
        a_third = [bytes(x) for x in third]
        assert [bytes(g) for g in b.recv(5.0)[1]] == first
        header, got = b.recv(5.0)  # taken before the deadline: delivered, and intact
        assert header == {"i": 2} and [bytes(g) for g in got] == second
        a.send(b.address, {"i": 3}, third, _deadline())  # a new connection (metadata again)
        assert [bytes(g) for g in b.recv(5.0)[1]] == a_third
        with pytest.raises(TransferTimeout):
            b.recv(0.05)
    with make_transport("nixl") as c, pytest.raises(PeerUnavailable):
        c.send("tcp://127.0.0.1:1", {"i": 0}, _payload([MiB], 0), _deadline(5.0))


def test_write_landing_region_full_and_too_large() -> None:
    # b grants at most 1 MiB per sender: a held view leaves no room for the next message, and no larger grant
    with make_transport("nixl", inline_max_bytes=0, op="WRITE") as a, \
            make_transport("nixl", pool_mb=1, landing_max_mb=1) as b:
        first, second = _payload([600 * KiB], 1), _payload([600 * KiB], 2)
        a.send(b.address, {"i": 1}, first, _deadline())
        _, held = b.recv(5.0)
        t0 = time.monotonic()
        with pytest.raises(TransferTimeout, match="no room"):  # waits for a free, errors by the deadline
            a.send(b.address, {"i": 2}, second, time.monotonic() + 0.3)
        assert time.monotonic() - t0 < 1.5
        with pytest.raises(TransferTimeout):
            b.recv(0.05)  # nothing was written, nothing announced
        assert [bytes(g) for g in held] == first, "the held view was not written over"
        # the lost connection gives the grant up: a new one (the old stays while the view is held)
        a.send(b.address, {"i": 3}, second, _deadline())
        assert [bytes(g) for g in b.recv(5.0)[1]] == second
        assert [bytes(g) for g in held] == first and len(b._grant_ids) == 2
        del held
        for i in range(4):  # frees come back: the region is reused, the old grant retired
            a.send(b.address, {"i": 4 + i}, first, _deadline())
            assert [bytes(g) for g in b.recv(5.0)[1]] == first
        assert len(b._grant_ids) == 1
        t0 = time.monotonic()
        with pytest.raises(TransportError, match="landing limit"):  # can never fit: refused at once
            a.send(b.address, {"i": "big"}, _payload([2 * MiB], 5), _deadline())
        assert time.monotonic() - t0 < 1.0
        a.send(b.address, {"i": "after"}, second, _deadline())
        assert [bytes(g) for g in b.recv(5.0)[1]] == second


def test_write_message_larger_than_the_grant() -> None:
    with make_transport("nixl", inline_max_bytes=0, op="WRITE") as a, make_transport("nixl", pool_mb=1) as b:
        for sizes in ([100 * KiB], [5 * MiB + 3, 17], [100 * KiB], [24 * MiB]):
            bufs = _payload(sizes, len(sizes))
            a.send(b.address, {}, bufs, _deadline())
            assert [bytes(g) for g in b.recv(5.0)[1]] == bufs
        assert max(g.blk.size for g in b._grant_ids.values()) >= 24 * MiB


def test_sink_borrows_the_landing_views(op: str) -> None:
    with make_transport("nixl", inline_max_bytes=0) as a, make_transport("nixl") as b:
        seen: list[tuple[object, list[bytes]]] = []

        def sink(header: dict, bufs: list, arrived_s: float) -> bool:
            seen.append((header, [bytes(x) for x in bufs]))
            return header["take"]  # False: the message goes on to ``recv`` (read once, not twice)

        b.sink = sink
        for i, take in enumerate([True, False, True, False]):
            bufs = _payload([100 * KiB + i, 3], i)
            a.send(b.address, {"i": i, "take": take}, bufs, _deadline())
            assert seen[-1] == ({"i": i, "take": take}, bufs)
            header, got = b.recv(5.0)
            assert header == ({"sunk": True} if take else {"i": i, "take": take})
            assert take or [bytes(g) for g in got] == bufs


@pytest.mark.parametrize("one_block", [False, True], ids=["per-layer", "packed"])
def test_direct_kv_over_nixl_against_brute_force(one_block: bool) -> None:
    """``DirectKV`` between two nixl endpoints (every piece read through NIXL): the receiver's cache holds the
    sender's tokens, converted (block 16 NHD -> 32 HND and back), whole or streamed in two pieces."""
    import torch

    from hetserve.runtime.kv_direct import DirectKV

    from .test_kv_direct import _direct_pair, _expect_cmd, _poll_until, _send_cmd, _tokens_of

    snd, rcv, replies = _direct_pair(one_block=one_block)
    snd.close()
    rcv.close()
    snd = DirectKV(snd.runner, snd.desc, {"nixl": make_transport("nixl", inline_max_bytes=0)}, replies.append)
    rcv = DirectKV(rcv.runner, rcv.desc, {"nixl": make_transport("nixl", inline_max_bytes=0)}, replies.append)
    try:
        want = _tokens_of(snd.runner.kv_caches, [3, 5, 7, 9], 16, 50)
        wire, c = _send_cmd(snd, rcv, "n1", 50, kind="nixl")
        rcv.expect(_expect_cmd("n1", 50, wire))
        snd.send(c)
        (done,) = _poll_until(rcv, lambda g: g)
        assert done.ok, done.error
        assert torch.equal(_tokens_of(rcv.runner.kv_caches, [4, 6], 32, 50), want)
        # both endpoints on this host's loopback: the one-piece hand-off commits itself and is written on arrival
        assert rcv.sunk == 1
        for blk in (4, 6):
            for cache in rcv.runner.kv_caches:
                cache[:, blk] = 0
        snd.send(_send_cmd(snd, rcv, "n2", 32, kind="nixl")[1])  # before the ExpectKV: held as lent views
        _poll_until(rcv, lambda _: rcv.busy)
        rcv.expect(_expect_cmd("n2", 50, wire))
        snd.send(_send_cmd(snd, rcv, "n2", 50, start=32, kind="nixl")[1])
        (done,) = _poll_until(rcv, lambda g: g)
        assert done.ok, done.error
        assert torch.equal(_tokens_of(rcv.runner.kv_caches, [4, 6], 32, 50), want)
        t0 = time.monotonic()
        while len(sent := [r for r in replies if getattr(r, "transfer_id", "") in ("n1", "n2")]) < 3:
            assert time.monotonic() - t0 < 5, sent  # each SendKV answers KVSent once its pieces are acknowledged
            time.sleep(0.01)
        assert all(r.ok for r in sent), sent
    finally:
        snd.close()
        rcv.close()


_ECHO = """
import sys, time
from hetserve.runtime.transport import make_transport
t = make_transport("nixl", inline_max_bytes=0)
print(t.address, flush=True)
while True:
    header, bufs = t.recv(60.0)
    if header.get("quit"):
        break
    t.send(header["reply_to"], dict(header, echoed=True), bufs, time.monotonic() + 30)
    del bufs
t.close()
"""


def test_two_processes_echo(op: str) -> None:
    child = subprocess.Popen([sys.executable, "-c", _ECHO], stdout=subprocess.PIPE, text=True)
    try:
        peer = child.stdout.readline().strip()
        assert peer.startswith("tcp://"), peer
        with make_transport("nixl") as me:
            for rnd in range(2):
                for seed, sizes in enumerate(MESSAGES):
                    bufs = _payload(sizes, 1000 * rnd + seed)
                    me.send(peer, {"seed": seed, "reply_to": me.address}, bufs, _deadline(30.0))
                    header, got = me.recv(30.0)
                    assert header == {"seed": seed, "reply_to": me.address, "echoed": True}
                    assert [bytes(g) for g in got] == bufs
            me.send(peer, {"quit": True}, [], _deadline())
        assert child.wait(timeout=30) == 0
    finally:
        if child.poll() is None:
            child.kill()


# ---- a PD hand-off over nixl: the KV crosses between the worker processes through NIXL ------------------
MAX_LEN = 256
PROMPTS = [[1 + (i * 7 + j) % 500 for j in range(9 + i * 13)] for i in range(4)]
SP = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def _nixl_links(bw: float = 0.0, lat: float = 0.0) -> dict[tuple[str, str], KVLink]:
    names = ("prefill0", "decode0")
    return {(a, b): KVLink("nixl", bw, lat) for a in names for b in names}


@pytest.mark.slow
def test_pd_handoff_over_nixl(model: str, reference: list[list[int]], monkeypatch: pytest.MonkeyPatch) -> None:
    # decode0 declares block 32 / HND: the sender converts, the KV crosses as one packed buffer per hand-off, read
    # through NIXL however small (the workers inherit the environment)
    monkeypatch.setenv("HETSERVE_NIXL_INLINE_KB", "0")
    llm = LLM(model, cluster="cpu-pair", strategy="pd", max_model_len=MAX_LEN, num_kv_blocks=128,
              block_sizes={"decode0": 32}, kv_layouts={"decode0": "HND"}, kv_links=_nixl_links())
    try:
        outs = llm.generate(PROMPTS, SP)
        assert [o.outputs[0].token_ids for o in outs] == reference
        stats = llm.engine.kv_stats()
        assert len(stats) == len(PROMPTS) and all(s["ok"] is True and s["kind"] == "nixl" for s in stats), stats
        mc = llm.engine.model_config
        per_token = mc.num_hidden_layers * 2 * mc.num_key_value_heads * mc.head_dim * 4
        for s, p in zip(sorted(stats, key=lambda s: int(s["req_id"])), PROMPTS, strict=True):
            assert s["num_bytes"] == -(-len(p) // 32) * 32 * per_token
        assert_no_leaks(llm.engine)
    finally:
        llm.shutdown()


@pytest.mark.slow
def test_pd_paced_over_nixl(model: str, reference: list[list[int]]) -> None:
    # a paced link: the commit follows the bytes after the declared time (nixl may cross hosts: no shared clock)
    bw, lat = 2e6, 0.004
    d = load_cluster("examples/clusters/cpu-pair.yaml").to_dict()
    llm = LLM(model, cluster=d, strategy="pd", max_model_len=MAX_LEN, num_kv_blocks=128,
              kv_links=_nixl_links(bw, lat))
    try:
        outs = llm.generate(PROMPTS, SP)
        assert [o.outputs[0].token_ids for o in outs] == reference
        stats = llm.engine.kv_stats()
        assert len(stats) == len(PROMPTS) and all(s["ok"] and s["kind"] == "nixl" for s in stats), stats
        for s in stats:
            assert s["declared_s"] == pytest.approx(lat + s["num_bytes"] / bw)
            assert s["delivered_s"] >= s["declared_s"], "the receiver used the KV before the declared link delivered"
        assert_no_leaks(llm.engine)
    finally:
        llm.shutdown()
