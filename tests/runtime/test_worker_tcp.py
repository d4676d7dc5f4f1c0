"""Workers that dial the coordinator over TCP (``connect.py``): the Ray backend's protocol, without Ray.

Reference: the single-process engine's greedy tokens. A client without the worker's token never sees a spec,
and a worker killed mid-run is detected like a socket-pair worker.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hetserve.core.cluster import load_cluster
from hetserve.core.errors import ValidationError
from hetserve.core.sampling_params import SamplingParams
from hetserve.llm import LLM
from hetserve.runtime.connect import (
    Hello,
    Listener,
    Refused,
    TcpPlacement,
    Welcome,
    _recv_frame,
    _send_frame,
    connect_to_coordinator,
    make_placement,
)
from hetserve.runtime.worker import WorkerDied, WorkerHandle, WorkerSpec, decode_cmd

MAX_LEN = 256
PROMPTS = [[1 + (i * 5 + j) % 500 for j in range(4 + i * 11)] for i in range(5)]
SP = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
CLUSTERS = Path(__file__).resolve().parents[2] / "examples" / "clusters"


@pytest.fixture(scope="module")
def tcp_dp(model: str):
    llm = LLM(model, cluster="cpu-pair", strategy="dp", max_model_len=MAX_LEN, num_kv_blocks=128, backend="tcp")
    yield llm
    llm.shutdown()


def test_dp_over_tcp_workers_matches_one_device(tcp_dp: LLM, reference: list[list[int]]) -> None:
    eng = tcp_dp.engine
    assert isinstance(eng.placement, TcpPlacement)
    for inst in eng.instances.values():
        sock = inst.worker.conn.sock
        assert sock.family == socket.AF_INET and sock.getpeername()[0] == "127.0.0.1"
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    outs = tcp_dp.generate(PROMPTS, SP)
    assert [o.outputs[0].token_ids for o in outs] == reference
    # both workers served (DP routed over the two), and nothing leaked
    assert all(inst.scheduler.kv.pool.num_free_blocks == inst.worker.num_kv_blocks - 1
               for inst in eng.instances.values())
    assert eng.num_retries == 0


def test_killed_tcp_worker_is_detected(tcp_dp: LLM, reference: list[list[int]]) -> None:
    eng = tcp_dp.engine
    for i, p in enumerate(PROMPTS):
        eng.add_request(f"k{i}", p, SP)
    # the worker holding the most requests dies once one of them has produced a token
    victim = max(eng.instances, key=lambda n: len(eng.instances[n].scheduler.requests))
    mine = set(eng.instances[victim].scheduler.requests)
    pid = eng.worker_pids()[victim]
    done: dict[str, list[int]] = {}
    killed = False
    t0 = time.monotonic()
    while eng.has_unfinished_requests():
        assert time.monotonic() - t0 < 60, "the cluster hung after a TCP worker died"
        for o in eng.step():
            if not killed and o.request_id in mine and o.outputs[0].token_ids:
                os.kill(pid, signal.SIGKILL)
                killed = True
            if o.finished:
                assert o.outputs[0].finish_reason != "error", o.outputs[0].stop_reason
                done[o.request_id] = o.outputs[0].token_ids
    assert killed and not eng.instances[victim].alive and eng.num_retries >= 1
    assert victim in (eng.instances[victim].worker.dead_reason or "")
    # requests on the dead worker were retried on the survivor and still give one device's tokens
    assert [done[f"k{i}"] for i in range(len(PROMPTS))] == reference


def _spec(model: str, name: str = "w") -> WorkerSpec:
    return WorkerSpec(name=name, model=model, num_blocks=32, max_model_len=MAX_LEN)


def test_wrong_tokens_and_bad_clients_are_refused(model: str) -> None:
    listener = Listener(handshake_timeout_s=0.5)
    spec_bytes = b"the spec"
    token = listener.expect("w", spec_bytes)
    try:
        host, port = listener.sock.getsockname()[:2]
        wrong = socket.create_connection((host, port))
        _send_frame(wrong, Hello(token=token[:-1] + ("x" if token[-1] != "x" else "y"), pid=1))
        silent = socket.create_connection((host, port))  # says nothing: dropped after the handshake timeout
        huge = socket.create_connection((host, port))
        huge.sendall((1 << 40).to_bytes(8, "big"))  # claims a terabyte frame
        garbage = socket.create_connection((host, port))
        garbage.sendall(b"\x00\x00\x00\x00\x00\x00\x00\x05hello")
        t0 = time.monotonic()
        assert listener.wait_refused(4, 5.0), listener.refused
        assert time.monotonic() - t0 < 3.0  # the silent one was dropped after 0.5 s
        assert len(listener.refused) == 4 and sum("wrong token" in r for r in listener.refused) == 1
        refusal = _recv_frame(wrong, 4096)
        assert isinstance(refusal, Refused) and refusal.reason == "wrong token"
        assert wrong.recv(1) == b""  # closed, and no spec was sent
        for s in (silent, huge, garbage):
            assert isinstance(_recv_frame(s, 4096), Refused)
            assert s.recv(1) == b""
            s.close()
        wrong.close()
        # the right token still works once, and only once
        good = socket.create_connection((host, port))
        _send_frame(good, Hello(token=token, pid=os.getpid()))
        chan, hello = listener.accept("w", 5.0)
        assert hello.pid == os.getpid()
        assert isinstance(_recv_frame(good, 4096), Welcome)
        again = socket.create_connection((host, port))
        _send_frame(again, Hello(token=token, pid=2))
        assert listener.wait_refused(5, 5.0) and isinstance(_recv_frame(again, 4096), Refused)
        again.close()
        good.close()
        chan.close()
    finally:
        listener.close()


def test_specs_are_sent_on_connect_whoever_the_coordinator_waits_for() -> None:
    """Pipeline stages wait for each other before saying Ready: each must get its spec on connecting, not when
    the coordinator gets round to ``accept``ing it."""
    listener = Listener()
    try:
        tokens = {n: listener.expect(n, f"spec of {n}".encode()) for n in ("s0", "s1")}
        chans = {}
        for n in ("s1", "s0"):
            chans[n] = connect_to_coordinator(listener.address, tokens[n], 5.0)
        for n, chan in chans.items():  # nobody has called accept yet
            assert chan.poll(5.0) and chan.recv_bytes() == f"spec of {n}".encode()
        assert listener.accept("s0", 5.0)[1].pid == os.getpid()
        with pytest.raises(WorkerDied, match="did not connect"):
            listener.accept("s2", 0.3)
        for chan in chans.values():
            chan.close()
    finally:
        listener.close()


def test_a_worker_with_the_wrong_token_exits_and_is_reported(model: str) -> None:
    placement = TcpPlacement()
    try:
        placement.listener.expect("w", b"spec")
        env = {k: v for k, v in os.environ.items() if k != "HETSERVE_WORKER_TOKEN"}
        proc = subprocess.Popen([sys.executable, "-m", "hetserve.runtime.worker", "--connect",
                                 placement.listener.address, "--token", "not-the-token"],
                                stderr=subprocess.PIPE, env=env)
        with pytest.raises(WorkerDied, match="exited before connecting"):
            placement.listener.accept("w", 60.0, lambda: proc.poll() is None)
        assert proc.wait(10) == 2
        assert b"refused" in proc.stderr.read()
    finally:
        placement.close()


def test_tcp_worker_handle_round_trip(model: str) -> None:
    """A WorkerHandle on the TCP placement starts, answers a ping, stops, and leaves no process behind."""
    from hetserve.runtime.worker import Ping, Pong

    placement = TcpPlacement()
    h = WorkerHandle(_spec(model), placement)
    try:
        h.start(60.0)
        assert h.num_kv_blocks > 0 and h.desc is not None
        h.send(Ping(seq=h.next_seq()))
        assert isinstance(h.recv(10.0), Pong)
    finally:
        h.stop(5.0)
        placement.close()
    assert not h.process.is_alive()


def test_placement_key_and_backend_errors_name_the_field(model: str) -> None:
    ray_pair = load_cluster(CLUSTERS / "ray-pair.yaml")
    assert ray_pair.placement == "ray" and load_cluster(ray_pair.to_dict()) == ray_pair
    assert load_cluster(CLUSTERS / "cpu-pair.yaml").placement == "local"
    bad = {"placement": "mpi", "nodes": [{"name": "n", "devices": [{"type": "cpu", "cores": 1, "memory_gb": 1}]}]}
    with pytest.raises(ValidationError) as e:
        load_cluster(bad)
    assert e.value.field == "placement" and "ray" in e.value.message
    with pytest.raises(ValidationError) as e:
        make_placement("slurm", {})
    assert e.value.field == "backend"
    with pytest.raises(ValidationError) as e:
        connect_to_coordinator("no-port", "t")
    assert e.value.field == "connect"
    try:
        import ray  # noqa: F401
    except ImportError:
        with pytest.raises(ValidationError, match="pip install") as e:
            make_placement("ray", {"i0": "a"})
        assert e.value.field == "backend"


def test_decode_cmd_never_sees_the_handshake() -> None:
    """Handshake frames are their own message family: a worker command decoder rejects them."""
    from hetserve.runtime.worker import encode_msg

    with pytest.raises(Exception):  # noqa: B017 - any decode error
        decode_cmd(encode_msg(Hello(token="t", pid=1)))
