"""The two processes of ``gpu_link.py``: a sender on GPU0 and a receiver on GPU1, each a ``--role`` of that script.

They share one TCP control connection on 127.0.0.1 (the receiver listens, the sender dials). For each method one
side drives (it times the transfers and decides when to stop, at the deadline) and the other follows:

* ``ipc``, ``ipc_isolated`` (receiver drives): the sender allocates one buffer and exports its CUDA IPC handle
  (``_share_cuda_``); the receiver opens it once (``_new_shared_cuda``) and times ``dst.copy_(src)`` into its own
  memory on its own stream (CUDA events): a pull over the link, as the project's shm transport does.
* ``shm`` (sender drives): ``hetserve.runtime.transport.shm.ShmTransport``, the KV hand-offs' transport (needs
  pyzmq and msgspec): staging copy on the sender, IPC pull by the receiver, a zmq round trip per message; timed by
  the sender, whose ``send`` returns once the receiver has the bytes in its own memory.
* ``nccl`` (receiver drives): ``torch.distributed`` send / recv, a TCP store on 127.0.0.1; timed by the receiver
  between a tiny all-reduce (which also carries its stop flag) and ``torch.cuda.synchronize``.
* ``tcp`` (receiver drives): the cross-vendor path: GPU -> pinned host -> localhost TCP -> pinned -> GPU, one
  transfer at a time (the receiver asks, the sender copies down and sends, the receiver copies up and syncs).

Each timed round moves ``K`` transfers of the size (``K`` = the batch bytes over the size, at least 1) so small
sizes are not all launch overhead; a round's bandwidth is ``K * size / seconds``.
"""

from __future__ import annotations

import base64
import datetime
import json
import math
import socket
import statistics
import struct
import time
from typing import Any

import torch

MiB = 2**20


def send_msg(sock: socket.socket, obj: Any) -> None:
    data = json.dumps(obj).encode()
    sock.sendall(struct.pack("!I", len(data)) + data)


def recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if n == 0:
            raise ConnectionError("peer closed the control connection")
        got += n


def recv_msg(sock: socket.socket) -> Any:
    head = bytearray(4)
    recv_exact(sock, memoryview(head))
    body = bytearray(struct.unpack("!I", head)[0])
    recv_exact(sock, memoryview(body))
    return json.loads(body)


def batch_count(size: int, batch_bytes: int) -> int:
    return max(1, math.ceil(batch_bytes / size))


def _row(size: int, k: int, seconds: list[float]) -> dict[str, Any]:
    """One size's rounds: bandwidth per round (GB/s, 1e9) and the median (of the per-round bandwidths)."""
    gbps = [k * size / s / 1e9 for s in seconds]
    return {
        "size_bytes": size,
        "transfers_per_round": k,
        "rounds_gb_per_s": gbps,
        "median_gb_per_s": statistics.median(gbps),
        "median_s_per_transfer": statistics.median(seconds) / k,
    }


class Plan:
    """What each side runs: sizes, rounds (+1 warm-up), batch bytes, the wall-clock deadline."""

    def __init__(self, sizes: list[int], repeats: int, batch_bytes: int, tcp_batch_bytes: int, deadline: float) -> None:
        self.sizes, self.repeats, self.batch_bytes = sizes, repeats, batch_bytes
        self.tcp_batch_bytes, self.deadline = tcp_batch_bytes, deadline

    def late(self) -> bool:
        return time.time() > self.deadline


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _events_s(dev: torch.device, fn: Any) -> float:
    """Seconds ``fn`` takes on ``dev``'s current stream (CUDA events), or on the host clock for the CPU."""
    if dev.type != "cuda":
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    s = torch.cuda.current_stream(dev)
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    e0.record(s)
    fn()
    e1.record(s)
    e1.synchronize()
    return e0.elapsed_time(e1) / 1000.0


# ---- in-process (the coordinator): tensor.copy_ between cuda:0 and cuda:1 ---------------------------------


def _timed_copies(src: torch.Tensor, dst: torch.Tensor, dev: torch.device, plan: Plan,
                  sync_dev: torch.device | None = None) -> list[dict[str, Any]]:
    """``dst[:n].copy_(src[:n])`` for each of the plan's sizes (``k`` copies a timing, first repeat dropped),
    timed by events on ``dev``'s stream; a row per size until the plan's deadline."""
    rows = []
    for n in plan.sizes:
        if plan.late():
            break
        k = batch_count(n, plan.batch_bytes)

        def run(n: int = n, k: int = k) -> None:
            for _ in range(k):
                dst[:n].copy_(src[:n])

        secs = [_events_s(dev, run) for _ in range(plan.repeats + 1)][1:]
        if sync_dev is not None:
            _sync(sync_dev)
        rows.append(_row(n, k, secs))
    return rows


def peer_copy(src_dev: torch.device, dst_dev: torch.device, plan: Plan) -> list[dict[str, Any]]:
    """``dst.copy_(src)`` across devices in one process (PyTorch's peer copy), timed on the source's stream."""
    top = max(plan.sizes)
    src = torch.empty(top, dtype=torch.uint8, device=src_dev).fill_(7)
    dst = torch.empty(top, dtype=torch.uint8, device=dst_dev)
    rows = _timed_copies(src, dst, src_dev, plan, sync_dev=dst_dev)
    del src, dst
    return rows


# ---- CUDA IPC: the receiver pulls from the sender's exported buffer ----------------------------------------


def ipc_send(ctl: socket.socket, dev: torch.device, plan: Plan) -> dict[str, Any]:
    buf = torch.empty(max(plan.sizes), dtype=torch.uint8, device=dev).fill_(7)
    torch.cuda.synchronize(dev)
    d, handle, size, off, ref, ref_off, ev, ev_sync = buf.untyped_storage()._share_cuda_()
    b64 = lambda b: None if b is None else base64.b64encode(bytes(b)).decode()
    send_msg(
        ctl,
        {
            "device": int(d),
            "handle": b64(handle),
            "size": int(size),
            "offset": int(off),
            "ref": b64(ref),
            "ref_offset": int(ref_off),
            "event": b64(ev),
            "event_sync": bool(ev_sync),
        },
    )
    recv_msg(ctl)  # the receiver is done with the buffer
    del buf
    return {"driven_by": "receiver"}


def ipc_recv(ctl: socket.socket, dev: torch.device, plan: Plan) -> dict[str, Any]:
    m = recv_msg(ctl)
    unb64 = lambda s: None if s is None else base64.b64decode(s)
    torch.cuda.init()  # the handle opens in this process's context: there must be one
    torch.cuda.set_device(m["device"])
    storage = torch.UntypedStorage._new_shared_cuda(  # type: ignore[attr-defined]
        m["device"],
        unb64(m["handle"]),
        m["size"],
        m["offset"],
        unb64(m["ref"]),
        m["ref_offset"],
        unb64(m["event"]),
        m["event_sync"],
    )
    src = torch.empty(0, dtype=torch.uint8, device=f"cuda:{m['device']}")
    src.set_(storage, 0, (m["size"],), (1,))
    dst = torch.empty(max(plan.sizes), dtype=torch.uint8, device=dev)
    rows = []
    try:
        rows = _timed_copies(src, dst, dev, plan)
        ok = bool(torch.equal(dst[:16].cpu(), torch.full((16,), 7, dtype=torch.uint8)))
    finally:
        del src, storage
        send_msg(ctl, {"done": True})
    return {"driven_by": "receiver", "rows": rows, "bytes_checked": ok, "opened_on_sender_device": m["device"]}


# ---- the project's shm transport (what KV hand-offs use) ---------------------------------------------------


def _shm_available() -> str | None:
    try:
        import msgspec  # noqa: F401
        import zmq  # noqa: F401
    except ImportError as e:
        return f"hetserve's shm transport needs pyzmq and msgspec: {e}"
    return None


def shm_send(ctl: socket.socket, dev: torch.device, plan: Plan) -> dict[str, Any]:
    why = _shm_available()
    send_msg(ctl, {"skip": why})
    peer = recv_msg(ctl)
    if why or peer.get("skip"):
        return {"skipped": why or peer["skip"]}
    from hetserve.runtime.transport.shm import ShmTransport, buffers_ready

    src = torch.empty(max(plan.sizes), dtype=torch.uint8, device=dev).fill_(7)
    _sync(dev)
    rows = []
    with ShmTransport() as st, buffers_ready():
        for n in plan.sizes:
            if plan.late():
                break
            k = batch_count(n, plan.batch_bytes)
            secs = []
            for r in range(plan.repeats + 1):
                t0 = time.perf_counter()
                for i in range(k):
                    st.send(peer["address"], {"n": n, "i": i}, [src[:n]], time.monotonic() + 120)
                if r:
                    secs.append(time.perf_counter() - t0)
            rows.append(_row(n, k, secs))
        st.send(peer["address"], {"end": True}, [], time.monotonic() + 60)
    return {"driven_by": "sender", "rows": rows}


def shm_recv(ctl: socket.socket, dev: torch.device, plan: Plan) -> dict[str, Any]:
    why = _shm_available()
    peer = recv_msg(ctl)
    if why or peer.get("skip"):
        send_msg(ctl, {"skip": why})
        return {"skipped": why or peer["skip"]}
    from hetserve.runtime.transport.shm import ShmTransport

    torch.cuda.init()
    with ShmTransport() as t:
        send_msg(ctl, {"address": t.address, "skip": None})
        count = 0
        while True:
            header, bufs = t.recv(180.0)
            if isinstance(header, dict) and header.get("end"):
                break
            count += 1
            if count == 1:
                on = str(bufs[0].device) if hasattr(bufs[0], "device") else "host"
            del bufs
    return {"driven_by": "sender", "messages": count, "received_on": on if count else None}


# ---- NCCL send / recv --------------------------------------------------------------------------------------


def _nccl(role: str, dev: torch.device, plan: Plan, store_port: int) -> dict[str, Any]:
    import torch.distributed as dist

    rank = 0 if role == "send" else 1
    timeout = datetime.timedelta(seconds=120)
    torch.cuda.set_device(dev)
    store = dist.TCPStore("127.0.0.1", store_port, 2, rank == 0, timeout=timeout)
    dist.init_process_group("nccl", store=store, rank=rank, world_size=2, timeout=timeout)
    buf = torch.empty(max(plan.sizes), dtype=torch.uint8, device=dev).fill_(7 if rank == 0 else 0)
    flag = torch.zeros(1, device=dev)
    rows = []
    try:
        for n in plan.sizes:
            flag.fill_(0.0 if (rank == 1 and plan.late()) else 1.0)  # the receiver decides when to stop
            dist.all_reduce(flag)
            if flag.item() < 2:
                break
            k = batch_count(n, plan.batch_bytes)
            secs = []
            for r in range(plan.repeats + 1):
                dist.all_reduce(flag)  # both ready: the round starts together
                torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
                for _ in range(k):
                    if rank == 0:
                        dist.send(buf[:n], 1)
                    else:
                        dist.recv(buf[:n], 0)
                torch.cuda.synchronize(dev)
                if r:
                    secs.append(time.perf_counter() - t0)
            rows.append(_row(n, k, secs))
        ok = rank == 0 or bool(torch.equal(buf[:16].cpu(), torch.full((16,), 7, dtype=torch.uint8)))
    finally:
        dist.destroy_process_group()
    return {"driven_by": "receiver", "rows": rows if rank == 1 else [], "bytes_checked": ok}


# ---- host-staged TCP ---------------------------------------------------------------------------------------


def _host_buffer(n: int, dev: torch.device) -> torch.Tensor:
    return torch.empty(n, dtype=torch.uint8, pin_memory=dev.type == "cuda")


def tcp_send(ctl: socket.socket, dev: torch.device, plan: Plan) -> dict[str, Any]:
    src = torch.empty(max(plan.sizes), dtype=torch.uint8, device=dev).fill_(7)
    host = _host_buffer(max(plan.sizes), dev)
    view = memoryview(host.numpy())
    ask = bytearray(9)
    while True:
        recv_exact(ctl, memoryview(ask))
        if ask[0] == ord("s"):
            return {"driven_by": "receiver"}
        n = struct.unpack("!Q", ask[1:])[0]
        host[:n].copy_(src[:n])  # device -> pinned host (synchronous)
        ctl.sendall(view[:n])


def tcp_recv(ctl: socket.socket, dev: torch.device, plan: Plan) -> dict[str, Any]:
    dst = torch.empty(max(plan.sizes), dtype=torch.uint8, device=dev)
    host = _host_buffer(max(plan.sizes), dev)
    view = memoryview(host.numpy())
    rows = []
    for n in plan.sizes:
        if plan.late():
            break
        k = batch_count(n, plan.tcp_batch_bytes)
        secs = []
        for r in range(plan.repeats + 1):
            t0 = time.perf_counter()
            for _ in range(k):
                ctl.sendall(b"g" + struct.pack("!Q", n))
                recv_exact(ctl, view[:n])
                dst[:n].copy_(host[:n], non_blocking=True)
                _sync(dev)
            if r:
                secs.append(time.perf_counter() - t0)
        rows.append(_row(n, k, secs))
    ctl.sendall(b"s" + bytes(8))
    ok = bool(torch.equal(dst[:16].cpu(), torch.full((16,), 7, dtype=torch.uint8)))
    return {"driven_by": "receiver", "rows": rows, "bytes_checked": ok}


SIDES = {
    "ipc": (ipc_send, ipc_recv),
    "ipc_isolated": (ipc_send, ipc_recv),
    "ipc_mps": (ipc_send, ipc_recv),
    "shm": (shm_send, shm_recv),
    "shm_mps": (shm_send, shm_recv),
    "tcp": (tcp_send, tcp_recv),
}


def run_role(role: str, methods: list[str], device: str, port: int, store_port: int, plan: Plan) -> dict[str, Any]:
    """One side of the pair: connect, run ``methods`` in order; an error ends this pair's later methods (the two
    sides may no longer agree where they are)."""
    dev = torch.device("cuda:0" if device == "cuda" else "cpu")
    torch.set_num_threads(1)  # host copies only: two processes' thread pools spinning on few cores cost ms
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if role == "recv":
        srv = socket.create_server(("127.0.0.1", port))
        srv.settimeout(120)
        ctl, _ = srv.accept()
        srv.close()
    else:  # the receiver may still be importing torch: dial until it listens
        t_end = time.monotonic() + 120
        while True:
            try:
                ctl = socket.create_connection(("127.0.0.1", port), timeout=120)
                break
            except ConnectionRefusedError:
                if time.monotonic() > t_end:
                    raise
                time.sleep(0.1)
    ctl.settimeout(180)
    ctl.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    out: dict[str, Any] = {}
    failed = None
    with ctl:
        for m in methods:
            if failed is not None:
                out[m] = {"error": f"not run: {failed} failed earlier on this pair"}
                continue
            t0 = time.perf_counter()
            try:
                if m == "nccl":
                    out[m] = _nccl(role, dev, plan, store_port)
                else:
                    out[m] = SIDES[m][0 if role == "send" else 1](ctl, dev, plan)
            except Exception as e:  # noqa: BLE001 - recorded; the coordinator reports it
                out[m] = {"error": f"{type(e).__name__}: {e}"}
                failed = m
            out[m]["wall_s"] = time.perf_counter() - t0
    if dev.type == "cuda":
        out["_device"] = torch.cuda.get_device_name(dev)
    return out
