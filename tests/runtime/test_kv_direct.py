"""Direct KV hand-offs: worker to worker over the transports, paced to the cluster file's declared link.

Reference: the single-process engine's greedy tokens. PD on cpu-pair moves KV from the prefill worker (block 16,
NHD) to the decode worker (declared block 32, HND); the coordinator only sees the records (``kv_stats``), never
the bytes. A slow declared link must hold each transfer for at least ``latency + bytes / bandwidth`` (never
early) and not much longer.
"""

from __future__ import annotations

import pytest

from hetserve.core.cluster import load_cluster
from hetserve.core.sampling_params import SamplingParams
from hetserve.llm import LLM

MAX_LEN = 256
PROMPTS = [[1 + (i * 7 + j) % 500 for j in range(9 + i * 13)] for i in range(4)]
SP = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
PD_CONVERT = {"block_sizes": {"decode0": 32}, "kv_layouts": {"decode0": "HND"}}
SLOW_BW = 2e6  # bytes/s: a tiny model's KV takes tens of milliseconds
SLOW_LAT = 0.004


def _slow_pair() -> dict:
    d = load_cluster("examples/clusters/cpu-pair.yaml").to_dict()
    d["nodes"][0]["intra_link"] = {"name": "slow", "kind": "ethernet", "bandwidth_bytes_per_s": SLOW_BW,
                                   "latency_s": SLOW_LAT}
    return d


def _books_clean(llm: LLM) -> None:
    for name, (free, usable) in llm.engine.free_blocks().items():
        assert free == usable, f"{name} leaks {usable - free} blocks"
    for inst in llm.engine.instances.values():
        assert not inst.scheduler.pinned and not inst.scheduler.receiving


def _no_kv_through_coordinator(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> list[object]:
    seen: list[object] = []
    orig = llm.engine.handoffs.on_kv_out
    monkeypatch.setattr(llm.engine.handoffs, "on_kv_out", lambda *a: (seen.append(a), orig(*a)))
    return seen


def test_pd_direct_same_tokens(model: str, reference: list[list[int]], monkeypatch: pytest.MonkeyPatch) -> None:
    llm = LLM(model, cluster="cpu-pair", strategy="pd", max_model_len=MAX_LEN, num_kv_blocks=128, **PD_CONVERT)
    try:
        through = _no_kv_through_coordinator(llm, monkeypatch)
        outs = llm.generate(PROMPTS, SP)
        assert [o.outputs[0].token_ids for o in outs] == reference
        stats = llm.engine.kv_stats()
        assert len(stats) == len(PROMPTS) == llm.engine.num_transfers_ok
        assert all(s["ok"] is True and s["kind"] == "shm" and s["src"] == "prefill0" for s in stats)
        # every prompt token's KV crossed: layers * 2 (K, V) * kv heads * head_dim * 4 bytes, padded to 32-token
        # blocks on the wire
        mc = llm.engine.model_config
        per_token = mc.num_hidden_layers * 2 * mc.num_key_value_heads * mc.head_dim * 4
        for s, p in zip(sorted(stats, key=lambda s: int(s["req_id"])), PROMPTS, strict=True):
            assert s["num_bytes"] == -(-len(p) // 32) * 32 * per_token
        assert not through, "KV went through the coordinator"
        _books_clean(llm)
    finally:
        llm.shutdown()


def test_paced_link_holds_the_declared_time(model: str, reference: list[list[int]]) -> None:
    llm = LLM(model, cluster=_slow_pair(), strategy="pd", max_model_len=MAX_LEN, num_kv_blocks=128)
    try:
        outs = llm.generate(PROMPTS, SP)
        assert [o.outputs[0].token_ids for o in outs] == reference
        stats = llm.engine.kv_stats()
        assert len(stats) == len(PROMPTS) and all(s["ok"] for s in stats), stats
        for s in stats:
            assert s["declared_s"] == pytest.approx(SLOW_LAT + s["num_bytes"] / SLOW_BW)
            assert s["wall_s"] >= s["declared_s"]
            # the receiver's own clock: it never used the KV before the declared link delivered it
            assert s["delivered_s"] >= s["declared_s"], "the receiver was let in before the declared link delivered"
            assert s["delivered_s"] < s["declared_s"] + 0.25
            assert s["send_convert_s"] > 0 and s["recv_convert_s"] > 0
        _books_clean(llm)
    finally:
        llm.shutdown()


def test_coordinator_path_still_works(model: str, reference: list[list[int]]) -> None:
    llm = LLM(model, cluster="cpu-pair", strategy="pd", max_model_len=MAX_LEN, num_kv_blocks=128, kv_direct=False,
              **PD_CONVERT)
    try:
        outs = llm.generate(PROMPTS, SP)
        assert [o.outputs[0].token_ids for o in outs] == reference
        assert llm.engine.kv_stats() == [] and llm.engine.num_transfers_ok == len(PROMPTS)
        _books_clean(llm)
    finally:
        llm.shutdown()


# ---- Cronus: the head's KV streams to the main while the head computes ----------------------------------
K = 160  # ten 16-token blocks: nine leave while the head computes, the hand-off sends the last
CRONUS_PROMPTS = [[1 + (i * 11 + j * 3) % 500 for j in range(K + 5 + i * 7)] for i in range(3)]
CRONUS_SP = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
BLOCK_S = 0.006  # declared seconds per 16-token block on the link
STREAM_LAT = 0.0005


def test_cronus_streams_head_kv_during_prefill(model: str) -> None:
    ref = LLM(model, max_model_len=MAX_LEN, dtype="float32", device="cpu", num_blocks=128)
    reference = [o.outputs[0].token_ids for o in ref.generate(CRONUS_PROMPTS, CRONUS_SP)]
    from hetserve.core.model_config import ModelConfig

    mc = ModelConfig.from_path(model)
    per_token = mc.num_hidden_layers * 2 * mc.num_key_value_heads * mc.head_dim * 4
    bw = 16 * per_token / BLOCK_S
    d = _slow_pair()
    d["nodes"][0]["intra_link"].update(bandwidth_bytes_per_s=bw, latency_s=STREAM_LAT)
    # a slow head (a fifth of the CPU's speed): its compute, not the link, sets the pace
    d["emulation"]["partitions"] = [{"name": "cpu-full", "speed": 1.0}, {"name": "cpu-half", "speed": 0.2}]
    instances = [{"name": "head0", "role": "head", "devices": ["host:1"], "max_num_batched_tokens": 8},
                 {"name": "main0", "role": "main", "devices": ["host:0"]}]
    llm = LLM(model, cluster=d, strategy="cronus", instances=instances, max_model_len=MAX_LEN, num_kv_blocks=128,
              deployment_params={"split_policy": {"kind": "fixed", "k": K}})
    try:
        outs = llm.generate(CRONUS_PROMPTS, CRONUS_SP)
        assert [o.outputs[0].token_ids for o in outs] == reference
        stats = llm.engine.kv_stats()
        assert len(stats) == len(CRONUS_PROMPTS) == llm.engine.num_transfers_ok
        whole_s = STREAM_LAT + K * per_token / bw  # the whole transfer on the declared link after the head's end
        for s in stats:
            assert s["ok"] and s["streamed_tokens"] == K - 16 and s["num_bytes"] == K * per_token
            # layer-wise: the streamed blocks left from inside the head's steps, each layer as it was written
            assert s["hooked_layers"] >= mc.num_hidden_layers
        # the hand-off (the main's blocks named -> the KV in them) only waited for the last block's share
        handoffs = sorted(float(s["handoff_s"]) for s in stats)
        assert handoffs[len(handoffs) // 2] < whole_s, (handoffs, whole_s)
        _books_clean(llm)
    finally:
        llm.shutdown()


def test_tp2_to_tp1_direct_reshard(tiny_model_factory) -> None:
    """Prefill TP 2 (each rank one kv head) -> decode TP 1 (block 32, HND declared): each prefill worker sends its
    head straight to the decode worker, which joins the two; the bytes are the whole KV, once."""
    model5 = str(tiny_model_factory("llama", num_layers=5))
    ref = LLM(model5, max_model_len=MAX_LEN, dtype="float32", device="cpu", num_blocks=128)
    reference = [o.outputs[0].token_ids for o in ref.generate(PROMPTS, SP)]
    instances = [{"name": "prefill0", "role": "prefill", "devices": ["host:0", "host:1"], "tp": 2},
                 {"name": "decode0", "role": "decode", "devices": ["host:2"]}]
    llm = LLM(model5, cluster="cpu-trio", strategy="pd", instances=instances, max_model_len=MAX_LEN,
              num_kv_blocks=128, **PD_CONVERT)
    try:
        assert llm.engine.instances["prefill0"].tp == 2
        outs = llm.generate(PROMPTS, SP)
        assert [o.outputs[0].token_ids for o in outs] == reference
        mc = llm.engine.model_config
        per_token = mc.num_hidden_layers * 2 * mc.num_key_value_heads * mc.head_dim * 4
        stats = sorted(llm.engine.kv_stats(), key=lambda s: int(s["req_id"]))
        assert len(stats) == len(PROMPTS) and all(s["ok"] for s in stats), stats
        for s, p in zip(stats, PROMPTS, strict=True):
            assert s["num_bytes"] == -(-len(p) // 32) * 32 * per_token
        _books_clean(llm)
    finally:
        llm.shutdown()


# ---- DirectKV in one process (local transport, fake runners): the receiver's safety rules ------------------
def _direct_pair(stall_s: float = 0.0, one_block: bool = False):
    import types

    import torch

    from hetserve.runtime.kv_direct import DirectKV, open_endpoints
    from hetserve.runtime.kv_layout import KVDescriptor

    def runner(bs: int, seed: int) -> tuple[object, KVDescriptor]:
        g = torch.Generator().manual_seed(seed)
        caches = [torch.randn(2, 12, bs, 2, 8, generator=g) for _ in range(3)]
        if one_block:  # the runner's cache: views of one allocation (the packed, all-layers-at-once path)
            caches = list(torch.stack(caches).unbind(0))
        r = types.SimpleNamespace(kv_caches=caches, parallel=types.SimpleNamespace(layer_start=0), model=None,
                                  device=torch.device("cpu"))
        return r, KVDescriptor(num_layers=3, num_kv_heads=2, head_dim=8, block_size=bs, dtype="float32")

    replies: list[object] = []
    (rs, ds), (rr, dr) = runner(16, 1), runner(32, 2)
    snd = DirectKV(rs, ds, open_endpoints(("local",)), replies.append, stall_s=stall_s)  # type: ignore[arg-type]
    rcv = DirectKV(rr, dr, open_endpoints(("local",)), replies.append)  # type: ignore[arg-type]
    return snd, rcv, replies


def _send_cmd(snd, rcv, tid: str, n: int, start: int = 0, bw: float = 0.0, kind: str = "local"):
    import dataclasses

    from hetserve.runtime.kv_layout import wire_descriptor
    from hetserve.runtime.kv_messages import KVTarget, SendKV

    wire = wire_descriptor(snd.desc, dataclasses.replace(rcv.desc, layout="HND"))
    tg = KVTarget(kind=kind, address=rcv.addresses[kind], layer_start=0, layer_end=3)
    return wire, SendKV(seq=1, transfer_id=tid, block_ids=[3, 5, 7, 9], num_tokens=n, wire=wire, src_rank=0,
                        targets=[tg], timeout_s=5.0, link_bandwidth=bw, token_start=start)


def _expect_cmd(tid: str, n: int, wire, timeout_s: float = 5.0):
    from hetserve.runtime.kv_messages import ExpectKV

    return ExpectKV(seq=2, transfer_id=tid, req_id=tid, block_ids=[4, 6], num_tokens=n, wire=wire, sources=[0],
                    timeout_s=timeout_s)


def _tokens_of(caches, block_ids: list[int], bs: int, n: int):
    import torch

    return torch.stack([torch.stack([c[:, block_ids[t // bs], t % bs] for t in range(n)]) for c in caches])


def _poll_until(rcv, pred, limit_s: float = 5.0) -> list[object]:
    import time

    got: list[object] = []
    t0 = time.monotonic()
    while not pred(got):
        assert time.monotonic() - t0 < limit_s, got
        got += rcv.poll(0.01)
    return got


@pytest.mark.parametrize("one_block", [False, True], ids=["per-layer", "packed"])
def test_direct_pieces_early_ranges_and_cancel(one_block: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    import torch

    from hetserve.runtime import kv_direct, shard

    bufs_per_piece: list[int] = []
    take = kv_direct.DirectKV._take
    monkeypatch.setattr(kv_direct.DirectKV, "_take",
                        lambda self, h, b, *rest: (bufs_per_piece.append(len(b)) if hasattr(h, "shapes") else None,
                                                   take(self, h, b, *rest))[1])
    whole_inserts: list[bool] = []
    insert_all = shard._insert_all_layers
    monkeypatch.setattr(shard, "_insert_all_layers", lambda *a: whole_inserts.append(insert_all(*a)) or
                        whole_inserts[-1])
    snd, rcv, replies = _direct_pair(one_block=one_block)
    try:
        # streamed: tokens [0, 32) before the receiver expects anything, then [32, 50) after
        wire, first = _send_cmd(snd, rcv, "t1", 32)
        snd.send(first)
        _poll_until(rcv, lambda _: rcv.busy)  # the pieces wait for their ExpectKV
        rcv.expect(_expect_cmd("t1", 50, wire))
        snd.send(_send_cmd(snd, rcv, "t1", 50, start=32)[1])
        (done,) = _poll_until(rcv, lambda g: g)
        assert done.ok, done.error
        want = _tokens_of(snd.runner.kv_caches, [3, 5, 7, 9], 16, 50)
        assert torch.equal(_tokens_of(rcv.runner.kv_caches, [4, 6], 32, 50), want)
        # cancelled while the paced link holds the commit: nothing is written, nothing is reported
        before = [c.clone() for c in rcv.runner.kv_caches]
        wire, cmd = _send_cmd(snd, rcv, "t2", 40, bw=2e5)  # ~0.2 s on the declared link
        rcv.expect(_expect_cmd("t2", 40, wire))
        snd.send(cmd)
        time.sleep(0.05)
        assert rcv.poll(0.0) == []
        rcv.cancel("t2")
        t0 = time.monotonic()
        while not any(getattr(r, "transfer_id", "") == "t2" for r in replies):
            assert time.monotonic() - t0 < 5
            assert rcv.poll(0.01) == []
        assert rcv.poll(0.05) == [] and not rcv.expects
        assert all(torch.equal(a, b) for a, b in zip(before, rcv.runner.kv_caches, strict=True))
        # nobody sends: the receiver gives up at its timeout
        rcv.expect(_expect_cmd("t3", 20, wire, timeout_s=0.05))
        (late,) = _poll_until(rcv, lambda g: g)
        assert not late.ok and "deadline" in late.error
        # a cache in one block goes out as one buffer per piece and is inserted all layers at once
        assert bufs_per_piece and all(n == (1 if one_block else 3) for n in bufs_per_piece), bufs_per_piece
        assert whole_inserts and all(w == one_block for w in whole_inserts), whole_inserts
    finally:
        snd.close()
        rcv.close()


def test_sink_writes_a_whole_hand_off_on_arrival() -> None:
    """Over the shm transport a one-piece hand-off is converted into the receiver's cache by the endpoint's
    thread as it arrives (``DirectKV._sink``), before the acknowledgement: the same tokens as brute force,
    and nothing queued for the worker's thread. A streamed hand-off (pieces before ``ExpectKV``) goes the
    ordinary way; after ``cancel`` a late hand-off is neither written nor reported."""
    import time

    import torch

    from hetserve.runtime.kv_direct import DirectKV, open_endpoints

    snd, rcv, replies = _direct_pair(one_block=True)
    snd.close()
    rcv.close()
    snd = DirectKV(snd.runner, snd.desc, open_endpoints(("shm",)), replies.append)
    rcv = DirectKV(rcv.runner, rcv.desc, open_endpoints(("shm",)), replies.append)
    try:
        def cmd(tid: str, n: int, start: int = 0):
            return _send_cmd(snd, rcv, tid, n, start, kind="shm")

        want = _tokens_of(snd.runner.kv_caches, [3, 5, 7, 9], 16, 50)
        wire, c = cmd("s1", 50)
        rcv.expect(_expect_cmd("s1", 50, wire))
        snd.send(c)
        (done,) = _poll_until(rcv, lambda g: g)
        assert done.ok, done.error
        assert rcv.sunk == 1 and "at_synced" in done.stages
        assert torch.equal(_tokens_of(rcv.runner.kv_caches, [4, 6], 32, 50), want)
        # streamed: the first piece comes before the ExpectKV, so the hand-off is not whole on arrival
        for blk in (4, 6):
            for cache in rcv.runner.kv_caches:
                cache[:, blk] = 0
        wire, c = cmd("s2", 32)
        snd.send(c)
        _poll_until(rcv, lambda _: rcv.busy)
        rcv.expect(_expect_cmd("s2", 50, wire))
        snd.send(cmd("s2", 50, start=32)[1])
        (done,) = _poll_until(rcv, lambda g: g)
        assert done.ok and rcv.sunk == 1
        assert torch.equal(_tokens_of(rcv.runner.kv_caches, [4, 6], 32, 50), want)
        # cancelled before the bytes come: not written, not reported
        before = [t.clone() for t in rcv.runner.kv_caches]
        rcv.expect(_expect_cmd("s3", 40, wire))
        rcv.cancel("s3")
        snd.send(cmd("s3", 40)[1])
        t0 = time.monotonic()
        while not any(getattr(r, "transfer_id", "") == "s3" for r in replies):
            assert time.monotonic() - t0 < 5
            assert rcv.poll(0.01) == []
        assert rcv.poll(0.05) == [] and rcv.sunk == 1
        assert all(torch.equal(a, b) for a, b in zip(before, rcv.runner.kv_caches, strict=True))
    finally:
        snd.close()
        rcv.close()
