"""Hand-offs queued back to back go in one message (``kv_batch.py``): one ``KVBatch`` per receiver, the same tokens
in every request's blocks as brute force, each part with its own ``KVSent`` / ``KVIn`` and its own share of the
declared link; a receiver that does not expect every part yet takes them one by one."""

from __future__ import annotations

import dataclasses
import time
import types

import pytest
import torch

from hetserve.runtime.kv_direct import DirectKV, open_endpoints
from hetserve.runtime.kv_layout import KVDescriptor, wire_descriptor
from hetserve.runtime.kv_messages import ExpectKV, KVIn, KVSent, KVTarget, SendKV
from hetserve.runtime.messages import KVBatch, KVPiece

N_LAYERS, HEADS, DIM, BLOCKS = 3, 2, 8, 16
LENGTHS = [20, 33, 7]  # tokens of the three requests: partial last blocks, one request under a block


def _runner(bs: int, dtype: torch.dtype, seed: int, layout: str = "NHD", device: str = "cpu"
            ) -> tuple[object, KVDescriptor]:
    g = torch.Generator().manual_seed(seed)
    whole = torch.randn(N_LAYERS, 2, BLOCKS, bs, HEADS, DIM, generator=g).to(dtype)
    if layout == "HND":
        whole = whole.transpose(3, 4).contiguous()
    whole = whole.to(device)
    r = types.SimpleNamespace(kv_caches=list(whole.unbind(0)), parallel=types.SimpleNamespace(layer_start=0),
                              model=None, device=torch.device(device))
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype]
    return r, KVDescriptor(num_layers=N_LAYERS, num_kv_heads=HEADS, head_dim=DIM, block_size=bs, dtype=name,
                           layout=layout)


def _tokens(caches, block_ids: list[int], bs: int, n: int, layout: str = "NHD") -> torch.Tensor:
    def tok(c: torch.Tensor, t: int) -> torch.Tensor:
        b = c[:, block_ids[t // bs]]
        return b[:, t % bs] if layout == "NHD" else b[:, :, t % bs]

    return torch.stack([torch.stack([tok(c, t) for t in range(n)]) for c in caches]).float().cpu()


def _pair(rcv_bs: int, snd_dtype: torch.dtype, rcv_dtype: torch.dtype, kind: str = "shm", layout: str = "NHD",
          device: str = "cpu"):
    replies: list[object] = []
    (rs, ds), (rr, dr) = _runner(16, snd_dtype, 1, device=device), _runner(rcv_bs, rcv_dtype, 2, layout, device)
    snd = DirectKV(rs, ds, open_endpoints((kind,)), replies.append)  # type: ignore[arg-type]
    rcv = DirectKV(rr, dr, open_endpoints((kind,)), replies.append)  # type: ignore[arg-type]
    return snd, rcv, replies


def _cmds(snd: DirectKV, rcv: DirectKV, kind: str, bw: float = 0.0, declared: str = "") -> tuple[
        list[SendKV], list[ExpectKV]]:
    """``declared``: the layout the receiver declares when it differs from its cache's (it converts on arrival)."""
    wire = wire_descriptor(snd.desc, dataclasses.replace(rcv.desc, layout=declared) if declared else rcv.desc)
    tg = KVTarget(kind=kind, address=rcv.addresses[kind], layer_start=0, layer_end=N_LAYERS)
    sends, expects = [], []
    s_next, r_next = 1, 0
    for i, n in enumerate(LENGTHS):
        ns, nr = -(-n // 16), -(-n // rcv.desc.block_size)
        sends.append(SendKV(seq=10 + i, transfer_id=f"r{i}", block_ids=list(range(s_next, s_next + ns)),
                            num_tokens=n, wire=wire, src_rank=0, targets=[tg], timeout_s=5.0, link_bandwidth=bw))
        expects.append(ExpectKV(seq=20 + i, transfer_id=f"r{i}", req_id=f"r{i}",
                                block_ids=list(range(r_next, r_next + nr)), num_tokens=n, wire=wire, sources=[0],
                                timeout_s=5.0))
        s_next, r_next = s_next + ns, r_next + nr
    return sends, expects


def _count_messages(monkeypatch: pytest.MonkeyPatch, ep) -> list[str]:
    sent: list[str] = []
    orig = ep.send
    monkeypatch.setattr(ep, "send", lambda peer, header, bufs, deadline: (
        sent.append(type(header).__name__), orig(peer, header, bufs, deadline))[1])
    return sent


def _run(snd: DirectKV, rcv: DirectKV, replies: list, sends: list[SendKV], k: int) -> dict[str, KVIn]:
    for c in sends:
        snd.send(c, defer=True)
    snd.flush_sends()
    got: list[KVIn] = []
    t0 = time.monotonic()
    while len(got) < k or sum(isinstance(r, KVSent) for r in replies) < k:
        assert time.monotonic() - t0 < 10, (got, replies)
        got += rcv.poll(0.01)
    return {r.transfer_id: r for r in got}


@pytest.mark.parametrize(("rcv_bs", "snd_dtype", "rcv_dtype", "layout", "declared"), [
    (16, torch.float32, torch.float32, "NHD", ""),  # the same format: one gather, one write of every part
    (32, torch.float32, torch.float32, "NHD", ""),  # block 16 -> 32: converted per part by the sender, one write
    (16, torch.float32, torch.float32, "HND", ""),  # layout: converted at once by the sender
    (16, torch.bfloat16, torch.float32, "NHD", ""),  # widened at once by the receiver
    (32, torch.float32, torch.float32, "NHD", "HND"),  # re-blocked by the sender, laid out again by the receiver
    (8, torch.float32, torch.float32, "NHD", ""),  # block 16 -> 8: split at once, each part's empty blocks dropped
    (24, torch.float32, torch.float32, "NHD", ""),  # 16 -> 24, not multiples: re-blocked part by part
], ids=["same", "reblock", "layout", "widen", "both-sides", "split", "reblock-24"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA")])])
def test_back_to_back_sends_travel_in_one_message(rcv_bs: int, snd_dtype: torch.dtype, rcv_dtype: torch.dtype,
                                                  layout: str, declared: str, device: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """(On a GPU both caches are CUDA tensors in one process: the gather, conversions and the one-pass write run
    on the device; the message itself goes through host memory, as CUDA IPC needs two processes.)"""
    from hetserve.runtime import kv_batch

    whole: list[bool] = []
    insert = kv_batch.insert_batch
    monkeypatch.setattr(kv_batch, "insert_batch", lambda *a: whole.append(insert(*a)) or whole[-1])
    snd, rcv, replies = _pair(rcv_bs, snd_dtype, rcv_dtype, layout=layout, device=device)
    try:
        sent = _count_messages(monkeypatch, snd.endpoints["shm"])
        sends, expects = _cmds(snd, rcv, "shm", declared=declared)
        for e in expects:
            rcv.expect(e)
        kin = _run(snd, rcv, replies, sends, len(LENGTHS))
        assert sent == ["KVBatch"]  # three hand-offs, one message
        assert rcv.sunk == len(LENGTHS)  # all written on arrival
        ks = {r.transfer_id: r for r in replies if isinstance(r, KVSent)}
        for c, e in zip(sends, expects, strict=True):
            assert kin[c.transfer_id].ok and ks[c.transfer_id].ok, (kin[c.transfer_id], ks[c.transfer_id])
            wire_bytes = c.wire.payload_bytes(c.num_tokens, HEADS)
            assert ks[c.transfer_id].num_bytes == wire_bytes == kin[c.transfer_id].num_bytes
            want = _tokens(snd.runner.kv_caches, c.block_ids, 16, c.num_tokens)
            assert torch.equal(_tokens(rcv.runner.kv_caches, e.block_ids, rcv_bs, c.num_tokens, layout), want)
        assert whole == [True]  # every part written in one pass
        # nothing written outside the requests' blocks
        used = {b for e in expects for b in e.block_ids}
        fresh = _runner(rcv_bs, rcv_dtype, 2, layout)[0].kv_caches
        for c, f in zip(rcv.runner.kv_caches, fresh, strict=True):
            for b in set(range(BLOCKS)) - used:
                assert torch.equal(c[:, b].cpu(), f[:, b])
    finally:
        snd.close()
        rcv.close()


def test_a_part_not_expected_yet_waits_for_its_expect_kv() -> None:
    """The receiver expects two of three parts: the batch is not written on arrival; the worker loop splits it,
    the two complete, the third completes once its ExpectKV comes (from the kept orphan)."""
    snd, rcv, _ = _pair(32, torch.float32, torch.float32)
    try:
        sends, expects = _cmds(snd, rcv, "shm")
        for e in expects[:2]:
            rcv.expect(e)
        for c in sends:
            snd.send(c, defer=True)
        snd.flush_sends()
        got: list[KVIn] = []
        t0 = time.monotonic()
        while len(got) < 2:
            assert time.monotonic() - t0 < 10
            got += rcv.poll(0.01)
        assert rcv.sunk == 0 and "r2" in rcv._orphans
        rcv.expect(expects[2])
        while len(got) < 3:
            assert time.monotonic() - t0 < 10
            got += rcv.poll(0.01)
        assert all(r.ok for r in got), got
        for c, e in zip(sends, expects, strict=True):
            want = _tokens(snd.runner.kv_caches, c.block_ids, 16, c.num_tokens)
            assert torch.equal(_tokens(rcv.runner.kv_caches, e.block_ids, 32, c.num_tokens), want)
    finally:
        snd.close()
        rcv.close()


def test_parts_take_the_declared_link_one_after_another(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each part is usable no earlier than the link would carry it after the parts before it; ``HETSERVE_KV_BATCH=0``
    sends one message per hand-off, with the same tokens."""
    for batch in ("1", "0"):
        monkeypatch.setenv("HETSERVE_KV_BATCH", batch)
        snd, rcv, replies = _pair(16, torch.float32, torch.float32, kind="local")
        try:
            sent = _count_messages(monkeypatch, snd.endpoints["local"])
            wire = wire_descriptor(snd.desc, rcv.desc)
            per = [wire.payload_bytes(n, HEADS) for n in LENGTHS]
            bw = sum(per) / 0.15  # all three in 150 ms
            sends, expects = _cmds(snd, rcv, "local", bw=bw)
            for e in expects:
                rcv.expect(e)
            kin = _run(snd, rcv, replies, sends, len(LENGTHS))
            ks = {r.transfer_id: r for r in replies if isinstance(r, KVSent)}
            first = min(r.stages["at_first"] for r in ks.values())
            done = 0
            for i, c in enumerate(sends):
                done += per[i]
                assert kin[c.transfer_id].ready_mono >= first + done / bw - 1e-6
                want = _tokens(snd.runner.kv_caches, c.block_ids, 16, c.num_tokens)
                assert torch.equal(_tokens(rcv.runner.kv_caches, expects[i].block_ids, 16, c.num_tokens), want)
            assert sent == (["KVBatch"] if batch == "1" else ["KVPiece"] * 3)
        finally:
            snd.close()
            rcv.close()


def test_a_batch_message_round_trips() -> None:
    from hetserve.runtime.messages import decode, encode

    d = KVDescriptor(num_layers=2, num_kv_heads=2, head_dim=8, block_size=4, dtype="float32")
    p = KVPiece(transfer_id="a", src_rank=0, layer_start=0, head_start=0, num_tokens=3, desc=d,
                shapes=[[2, 1, 4, 2, 8]] * 2)
    m = KVBatch(parts=[p, p], offsets=[0, 1], blocks=[1, 1])
    assert decode(encode(m)) == m


def test_a_batch_to_one_tensor_parallel_rank_of_two() -> None:
    """Prefill TP 1 -> decode TP 2: the batch carries every head and the receiving rank keeps its own."""
    replies: list[object] = []
    rs, ds = _runner(16, torch.float32, 1)
    g = torch.Generator().manual_seed(2)
    whole = torch.randn(N_LAYERS, 2, BLOCKS, 16, 1, DIM, generator=g)  # rank 1 of 2: one of the two kv heads
    rr = types.SimpleNamespace(kv_caches=list(whole.unbind(0)), parallel=types.SimpleNamespace(layer_start=0),
                               model=None, device=torch.device("cpu"))
    dr = KVDescriptor(num_layers=N_LAYERS, num_kv_heads=HEADS, head_dim=DIM, block_size=16, dtype="float32",
                      tp_size=2, tp_rank=1)
    snd = DirectKV(rs, ds, open_endpoints(("shm",)), replies.append)  # type: ignore[arg-type]
    rcv = DirectKV(rr, dr, open_endpoints(("shm",)), replies.append)  # type: ignore[arg-type]
    try:
        sends, expects = _cmds(snd, rcv, "shm")
        for e in expects:
            rcv.expect(e)
        kin = _run(snd, rcv, replies, sends, len(LENGTHS))
        assert all(r.ok for r in kin.values()), kin
        assert rcv.sunk == len(LENGTHS)  # one batch, written in one pass on arrival
        for c, e in zip(sends, expects, strict=True):
            want = _tokens(snd.runner.kv_caches, c.block_ids, 16, c.num_tokens)[:, :, :, 1:2]  # head 1
            assert torch.equal(_tokens(rcv.runner.kv_caches, e.block_ids, 16, c.num_tokens), want)
    finally:
        snd.close()
        rcv.close()
