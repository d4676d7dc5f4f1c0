"""The Hetis mailbox data path: a shared buffer per (main, attention worker) pair instead of tensor bytes on
the socket. On the CPU it is a host shm file; on CUDA (tests marked ``gpu``) CUDA IPC.

Unit tests of the buffer against brute force, a real attention worker process through both paths against the
plain backend, and the engine end to end (greedy tokens equal the single device; the shm file never stays
behind, also after a killed worker)."""

from __future__ import annotations

import os
import signal
import time

import msgspec
import pytest
import torch

from hetserve.core.sampling_params import SamplingParams
from hetserve.engine.attention import AttentionMetadata, TorchRefBackend
from hetserve.llm import LLM
from hetserve.runtime import hetis_main
from hetserve.runtime.hetis_mailbox import ALIGN, Mailbox, backings, layout, live_files, region_bytes, sweep_stale
from hetserve.runtime.hetis_main import AttnWorkerClient
from hetserve.runtime.hetis_messages import AttnMessage, AttnSpec, AttnWorkerConf, MailboxOpen
from hetserve.runtime.hetis_wire import AttnLinkError
from tests.runtime.helpers import assert_no_leaks, process_alive

MAX_LEN = 256
PROMPTS = [[1 + (i * 5 + j) % 400 for j in range(6 + i * 11)] for i in range(3)]
SP = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
H, K, D, BS, NB, L = 8, 4, 8, 4, 32, 2


@pytest.fixture(scope="module")
def model(tiny_model_factory) -> str:
    return str(tiny_model_factory("llama", num_heads=8, num_kv_heads=4))


# ---- the buffer alone ------------------------------------------------------------------------------------


@pytest.mark.parametrize("tokens,heads,group,dim,dtype", [(1, 1, 1, 8, torch.float32), (7, 3, 4, 16, torch.bfloat16),
                                                          (33, 2, 2, 128, torch.float16), (0, 4, 2, 8, torch.float32)])
def test_layout_against_brute_force(tokens: int, heads: int, group: int, dim: int, dtype: torch.dtype) -> None:
    es = dtype.itemsize
    regions = layout(tokens, heads, group, dim, es)
    total = region_bytes(tokens, heads, group, dim, es)
    want = [(tokens, heads * group, dim), (tokens, heads, dim), (tokens, heads, dim), (tokens, heads * group, dim)]
    assert [s for _, s in regions] == want
    owner = [-1] * total  # every byte belongs to at most one region, all inside the total
    for i, (off, s) in enumerate(regions):
        assert off % ALIGN == 0
        n = s[0] * s[1] * s[2] * es
        for b in range(off, off + n):
            assert owner[b] == -1
            owner[b] = i
    assert total % ALIGN == 0 and total >= sum(s[0] * s[1] * s[2] * es for _, s in regions)


def test_shm_mailbox_two_mappings_see_each_other() -> None:
    """Main side creates, the other side opens from the announced message (msgpack round trip): writes through
    one mapping's views are read back exactly through the other's, byte offsets as ``layout`` says."""
    torch.manual_seed(0)
    mb = Mailbox.create("shm", region_bytes(16, 4, 2, 8, 4), torch.float32, 2, 8, "cpu", gen=1)
    try:
        assert mb.path in live_files() and oct(os.stat(mb.path).st_mode & 0o777) == "0o600"
        msg = msgspec.msgpack.decode(msgspec.msgpack.encode(mb.announce()), type=AttnMessage)
        assert isinstance(msg, MailboxOpen) and msg.kind == "shm" and msg.gen == 1
        peer = Mailbox.open(msg)
        mb.unlink()  # the peer has it open: the file may go, the mappings stay
        assert not os.path.exists(mb.path) and live_files() == []
        for tokens, heads in [(16, 4), (3, 1), (9, 2), (16, 2)]:
            q, k, v = torch.randn(tokens, heads * 2, 8), torch.randn(tokens, heads, 8), torch.randn(tokens, heads, 8)
            for dst, src in zip(mb.views(tokens, heads)[:3], (q, k, v)):
                dst.copy_(src)
            pq, pk, pv, po = peer.views(tokens, heads)
            assert torch.equal(pq, q) and torch.equal(pk, k) and torch.equal(pv, v)
            po.copy_(q * 2)
            assert torch.equal(mb.views(tokens, heads)[3], q * 2)
            flat = mb.buf.view(torch.uint8)  # brute force: the bytes sit where the layout puts them
            for t, (off, _) in zip((q, k, v, q * 2), layout(tokens, heads, 2, 8, 4)):
                raw = t.contiguous().view(-1).view(torch.uint8)
                assert torch.equal(flat[off : off + raw.numel()], raw)
        assert not mb.fits(17, 4) and mb.fits(17, 2)
        with pytest.raises(ValueError, match="need"):
            mb.views(17, 4)
        peer.close()
    finally:
        mb.close()
    assert live_files() == []


def test_mailbox_refuses_bad_announcements() -> None:
    with pytest.raises(ValueError, match="not a mailbox file"):
        Mailbox.open(MailboxOpen(kind="shm", gen=1, nbytes=256, dtype="float32", group=1, head_dim=8,
                                 path="/etc/passwd"))
    with pytest.raises(ValueError, match="unknown"):
        Mailbox.open(MailboxOpen(kind="carrier-pigeon", gen=1, nbytes=256, dtype="float32", group=1, head_dim=8))
    with pytest.raises(ValueError, match="CUDA main"):
        Mailbox.create("cuda_ipc", 256, torch.float32, 1, 8, "cpu", gen=1)
    assert backings("cpu", "cpu") == ["shm"] and backings("cuda:0", "cpu") == ["shm"]
    assert backings("cuda:0", "cuda:0") == ["cuda_ipc", "shm"]


def test_sweep_removes_files_of_dead_creators() -> None:
    path = f"/dev/shm/hetis-mb-{2**22 + 12345}-{'ab' * 16}"  # a pid above the default pid_max
    with open(path, "wb") as f:
        f.write(b"x")
    if process_alive(2**22 + 12345):
        pytest.skip("that pid exists here")
    assert sweep_stale() >= 1 and not os.path.exists(path)


# ---- one attention worker process ------------------------------------------------------------------------


def _meta(before: list[int], new: list[int], bs: int = BS, device: str = "cpu") -> AttentionMetadata:
    tables = [[1 + s * 8 + j for j in range(8)] for s in range(len(new))]
    pos, slots, qsl = [], [], [0]
    for s, (b, n) in enumerate(zip(before, new)):
        for p in range(b, b + n):
            pos.append(p)
            slots.append(tables[s][p // bs] * bs + p % bs)
        qsl.append(qsl[-1] + n)
    seq = [b + n for b, n in zip(before, new)]
    i32 = {"dtype": torch.int32, "device": device}
    return AttentionMetadata(
        num_tokens=len(pos), num_seqs=len(seq), positions=torch.tensor(pos, device=device),
        slot_mapping=torch.tensor(slots, device=device), query_start_loc=torch.tensor(qsl, **i32),
        seq_lens=torch.tensor(seq, **i32), block_tables=torch.tensor(tables, **i32), max_query_len=max(new),
        max_seq_len=max(seq), query_start_loc_cpu=qsl, seq_lens_cpu=seq)


def _client(mode: str, worker_device: str = "cpu", main_device: str = "cpu", timeout_s: float = 30.0,
            held: int = 2) -> AttnWorkerClient:
    spec = AttnSpec(name="t", num_layers=L, num_heads=H, num_kv_heads=K, head_dim=D, num_blocks=NB, block_size=BS,
                    dtype="float32", head_start=K - held, num_heads_held=held, device=worker_device,
                    backend="auto" if worker_device != "cpu" else "torch_ref")
    c = AttnWorkerClient(AttnWorkerConf("host:1", device=worker_device), spec, recv_timeout_s=timeout_s)
    try:
        c.wait_ready(60.0)
        c.setup_data_path(main_device, mode, tokens=8)
    except BaseException:
        c.stop()
        raise
    return c


def _drive(c: AttnWorkerClient, device: str = "cpu", steps=([5, 9], [1, 1], [20, 1], [1, 1])) -> None:
    """Steps through the worker against the plain backend over a full local cache (brute force)."""
    torch.manual_seed(2)
    g = H // K
    a = c.head_start
    full = [torch.zeros(2, NB, BS, K, D, device=device) for _ in range(L)]
    plain = TorchRefBackend(device)
    lens = [0] * len(steps[0])
    for new in steps:
        meta = _meta(lens, new, device=device)
        c.start_step(meta)
        for layer in range(L):
            q, k, v = (torch.randn(meta.num_tokens, n, D, device=device) for n in (H, K, K))
            want = plain.forward(q, k, v, full[layer], meta, 0.35, None)
            b = a + c.num_heads
            c.send_layer(layer, q[:, a * g : b * g], k[:, a:b], v[:, a:b], 0.35, None)
            got = c.recv_layer().to(device)
            tol = 1e-5 if device == "cpu" and c.backend == "torch_ref" else 1e-2  # Triton on a GPU may use tf32
            assert (got - want[:, a * g : b * g]).abs().max().item() < tol
        lens = [x + y for x, y in zip(lens, new)]


@pytest.mark.parametrize("mode", ["auto", "frames"])
def test_worker_process_both_paths_equal_brute_force(mode: str) -> None:
    c = _client(mode)
    try:
        assert c.data_path == ("shm" if mode == "auto" else "frames")
        assert live_files() == []  # unlinked as soon as the worker had it open
        _drive(c)
        s = c.stats
        if mode == "auto":
            # a 21-token step outgrew the 8-token first mailbox: a second one, announced and opened
            assert s["mailbox_layers"] == 4 * L and s["frame_layers"] == 0 and s["mailbox_opens"] == 2
        else:
            assert s["mailbox_layers"] == 0 and s["frame_layers"] == 4 * L and c.mailbox is None
    finally:
        c.stop()
    assert live_files() == []


def test_oversized_step_goes_through_the_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    c = _client("auto")
    monkeypatch.setattr(hetis_main, "MAILBOX_MAX_BYTES", c.mailbox.nbytes)  # no growth allowed
    try:
        # sized for 8 tokens of all 4 heads: 19 tokens of the 2 held do not fit (frames), 2 tokens do
        _drive(c, steps=([10, 9], [1, 1]))
        assert c.stats["frame_layers"] == L and c.stats["mailbox_layers"] == L and c.stats["mailbox_opens"] == 1
    finally:
        c.stop()


def test_no_backing_falls_back_to_frames_or_fails_when_required(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hetis_main, "backings", lambda m, w: ["carrier-pigeon"])
    c = _client("auto")
    try:
        assert c.data_path == "frames" and c.mailbox is None
        _drive(c, steps=([3, 2], [1, 1]))
    finally:
        c.stop()
    with pytest.raises(AttnLinkError, match="no mailbox"):
        _client("mailbox")


def test_killed_worker_raises_and_leaves_no_file() -> None:
    c = _client("auto", timeout_s=5.0)
    try:
        assert c.data_path == "shm"
        c.start_step(_meta([0], [3]))
        os.kill(c.pid, signal.SIGKILL)
        c.popen.wait(10.0)
        t0 = time.monotonic()
        with pytest.raises(AttnLinkError):
            c.send_layer(0, torch.zeros(3, 4, D), torch.zeros(3, 2, D), torch.zeros(3, 2, D), 1.0, None)
            c.recv_layer()
        assert time.monotonic() - t0 < 5.0
    finally:
        c.stop()
    assert live_files() == [] and c.mailbox is None


# ---- the engine end to end ---------------------------------------------------------------------------------


def _hetis(model: str, **kw) -> LLM:
    insts = [{"name": "main0", "role": "main", "devices": ["host:0"], "workers": [{"device": "host:1",
                                                                                 "kv_heads": 2}]}]
    return LLM(model, cluster="cpu-pair", strategy="hetis", instances=insts, max_model_len=MAX_LEN,
               num_kv_blocks=64, deployment_params={"redispatch_every_steps": 0}, **kw)


def _tokens(llm: LLM) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in llm.generate(PROMPTS, SP)]


def test_engine_uses_the_mailbox_and_matches_frames(model: str, reference: list[list[int]],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    llm = _hetis(model)
    try:
        h = llm.engine.hetis
        assert h.info["main0"].data_paths == ["shm"]
        assert _tokens(llm) == reference
        h.force("main0", h.steps["main0"] + 3, (4,))  # all heads to the worker mid-generation, then back
        h.force("main0", h.steps["main0"] + 5, (1,))
        assert _tokens(llm) == reference
        info = h.info["main0"]
        assert info.assignment == [1] and info.data_paths == ["shm"]
        assert info.mailbox_layers[0] > 0 and info.frame_layers == [0]
        main_pid = llm.engine.worker_pids()["main0"]
        assert live_files(main_pid) == []
        assert_no_leaks(llm.engine)
    finally:
        llm.shutdown()
    monkeypatch.setenv("HETSERVE_HETIS_DATA_PATH", "frames")  # the main worker inherits it
    llm = _hetis(model)
    try:
        assert _tokens(llm) == reference
        info = llm.engine.hetis.info["main0"]
        assert info.data_paths == ["frames"]
    finally:
        llm.shutdown()


def test_engine_killed_attention_worker_fails_requests_and_leaves_no_file(model: str) -> None:
    llm = _hetis(model)
    try:
        eng = llm.engine
        main_pid = eng.worker_pids()["main0"]
        ids = [eng.add_request(None, p, SP) for p in PROMPTS]
        done: dict[str, object] = {}
        t0 = time.monotonic()
        killed = False
        while len(done) < len(ids):
            assert time.monotonic() - t0 < 30, "requests hang after an attention worker died"
            for o in eng.step():
                if o.finished:
                    done[o.request_id] = o
            if not killed and any(eng._reqs[r].token_ids for r in ids if r in eng._reqs):
                os.kill(eng.hetis.info["main0"].worker_pids[0], signal.SIGKILL)
                killed = True
        assert killed and all(done[i].outputs[0].finish_reason == "error" for i in ids)
        assert all("attention worker" in str(done[i].outputs[0].stop_reason) for i in ids)
        assert live_files(main_pid) == []
    finally:
        llm.shutdown()


# ---- CUDA (run where a GPU exists) -------------------------------------------------------------------------

gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("worker_device,path", [("cuda", "cuda_ipc"), ("cpu", "shm")])
@gpu[0]
@gpu[1]
def test_cuda_main_mailbox(worker_device: str, path: str) -> None:
    c = _client("auto", worker_device=worker_device, main_device="cuda")
    try:
        assert c.data_path == path
        _drive(c, device="cuda")
        assert c.stats["mailbox_layers"] == 4 * L and c.stats["frame_layers"] == 0
    finally:
        c.stop()
    assert live_files() == []


def test_benchmark_script_smoke(tmp_path) -> None:
    """``benchmarks/hetis_path.py`` end to end at toy shapes: both paths, a JSON with command, commit, device."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "hp.json"
    r = subprocess.run([sys.executable, str(root / "benchmarks" / "hetis_path.py"), "--device", "cpu", "--heads", "8",
                        "--kv-heads", "4", "--head-dim", "16", "--offload", "2", "--layers", "1", "--context", "8",
                        "--batches", "1,3", "--repeats", "2", "--warmup", "1", "--out", str(out)],
                       check=False, capture_output=True, text=True, timeout=120, cwd=root)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(out.read_text())
    assert d["command"] and d["git_commit"] and d["device"] and d["config"]["offloaded_kv_heads"] == 2
    assert [(s["batch"], s["rt_speedup"] > 0) for s in d["summary"]] == [(1, True), (3, True)]
    paths = {r["path"]: r["data_path"] for r in d["results"]}
    assert paths == {"frames": "frames", "mailbox": "shm"}
