"""NIXL (UCX backend) by itself between two processes of this host: one-sided WRITEs with a notification.

    python benchmarks/nixl_raw.py --device cpu  --out benchmarks/results/nixl_raw_cpu.json     # DRAM -> DRAM
    python benchmarks/nixl_raw.py --device cuda --out nixl_raw_h100.json    # VRAM -> VRAM, both on this GPU

The initiator (this process) spawns the target as a fresh interpreter; each makes one agent the way
``hetserve/runtime/transport/nixl.py`` does (UCX, ``ucx_error_handling_mode=none``, no progress thread), registers
one buffer (numpy for DRAM; a torch CUDA tensor for VRAM), and they swap agent metadata and the buffer's address
over a Unix socket (msgspec MessagePack frames; no pickle). Then, per transfer, the target clears its destination,
says ready and busy-polls ``get_new_notifs``; the initiator posts (``transfer``) and polls ``check_xfer_state``.
Per case, medians over ``--repeats`` (after ``--warmup``), microseconds after the post started (one host, one
``time.monotonic()``): ``post_us`` (``transfer`` returned), ``done_us`` (the initiator saw DONE), ``notif_us`` (the
target saw the notification: the bytes are there). Checksums (first and last repeat of each case) prove the bytes.

- ``contiguous``: one descriptor of 64 KiB .. 64 MiB (one prepared handle per size, posted again each repeat).
- ``scattered``: a KV hand-off's shape: ``--layers`` (32) x ``n`` blocks of ``--block-kib`` (64 KiB: one block of
  16 tokens of Llama-3.1-8B's K and V in bf16), taken from a pool of ``--pool-blocks`` blocks per layer on each side,
  non-adjacent (NIXL cannot merge them). ``prepped``: both pools prepared once (``prep_xfer_dlist``), each transfer
  ``make_prepped_xfer(indices)``; ``initialize_xfer``: descriptor arrays built and checked per transfer. ``make_us``:
  building the request; ``release_us``: releasing it after.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

KiB, MiB = 1024, 2**20
SIZES = [64 * KiB, 256 * KiB, MiB, 4 * MiB, 16 * MiB, 64 * MiB]
now = time.monotonic


def send(sock: socket.socket, obj: Any) -> None:
    b = msgspec.msgpack.encode(obj)
    sock.sendall(struct.pack("<I", len(b)) + b)


def recv(sock: socket.socket) -> Any:
    def exact(n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = sock.recv(n - len(out))
            if not chunk:
                raise EOFError("the peer closed the socket")
            out += chunk
        return bytes(out)

    return msgspec.msgpack.decode(exact(struct.unpack("<I", exact(4))[0]))


class Side:
    """One process's agent and registered buffer (``nbytes``), DRAM or VRAM."""

    def __init__(self, name: str, device: str, nbytes: int, params: dict[str, str]) -> None:
        from nixl._api import nixl_agent, nixl_agent_config

        logging.getLogger("nixl").setLevel(logging.WARNING)  # (after the import: it configures its logger)
        self.cuda = device.startswith("cuda")
        if self.cuda:
            import torch

            if device == "cuda":
                device = "cuda:0"
            torch.cuda.set_device(torch.device(device))
            # the CUDA context exists before the agent (UCX's CUDA transports look for it)
            self.buf: Any = torch.zeros(nbytes, dtype=torch.uint8, device=device)
            self.addr, self.dev, self.mem = self.buf.data_ptr(), self.buf.device.index, "VRAM"
        else:
            self.buf = np.zeros(nbytes, dtype=np.uint8)
            self.addr, self.dev, self.mem = self.buf.ctypes.data, 0, "DRAM"
        t = now()
        self.agent = nixl_agent(name, nixl_agent_config(enable_prog_thread=False, backends=[]))
        self.agent.create_backend("UCX", params)
        self.agent_s = now() - t
        t = now()
        self.reg = self.agent.register_memory(np.array([[self.addr, nbytes, self.dev]], np.uint64), self.mem)
        self.register_s = now() - t

    def descs(self, spans: list[tuple[int, int]]) -> np.ndarray:
        """(offset, bytes) in this buffer -> an Nx3 (address, bytes, device) array."""
        return np.array([[self.addr + o, n, self.dev] for o, n in spans], dtype=np.uint64).reshape(-1, 3)

    def crc(self, spans: list[tuple[int, int]]) -> int:
        c = 0
        for o, n in spans:
            part = self.buf[o:o + n]
            c = zlib.crc32(memoryview(part.cpu().numpy() if self.cuda else part), c)
        return c

    def clear(self, spans: list[tuple[int, int]]) -> None:
        for o, n in spans:
            self.buf[o:o + n] = 0
        self.sync()

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()


def target(path: str, device: str, nbytes: int, params: dict[str, str]) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(path)
    me = Side("target", device, nbytes, params)
    send(sock, {"md": me.agent.get_agent_metadata(), "addr": me.addr, "dev": me.dev, "agent_s": me.agent_s,
                "register_s": me.register_s})
    me.agent.add_remote_agent(recv(sock)["md"])
    while (m := recv(sock))["op"] != "quit":
        spans = [tuple(s) for s in m["spans"]]
        me.clear(spans)
        send(sock, {"ready": True})
        while True:  # busy-poll: this also progresses the UCX worker
            notifs = me.agent.get_new_notifs()
            if any(m["tag"] in msgs for msgs in notifs.values()):
                seen = now()
                break
        send(sock, {"seen": seen, "crc": me.crc(spans) if m["check"] else None})
    me.agent.deregister_memory(me.reg)


def med_us(xs: list[float]) -> float:
    return round(statistics.median(xs) * 1e6, 2)


class Initiator:
    def __init__(self, args: argparse.Namespace, nbytes: int, params: dict[str, str]) -> None:
        self.args = args
        self.op = args.op
        d = tempfile.mkdtemp(prefix="nixlraw")
        path = os.path.join(d, "s")
        srv = socket.socket(socket.AF_UNIX)
        srv.bind(path)
        srv.listen(1)
        cmd = [sys.executable, __file__, "--role", "target", "--sock", path, "--device", args.device,
               "--nbytes", str(nbytes), *[x for p in args.backend_param for x in ("--backend-param", p)]]
        self.proc = subprocess.Popen(cmd)
        self.sock, _ = srv.accept()
        self.me = Side("initiator", args.device, nbytes, params)
        hello = recv(self.sock)
        t = now()
        self.peer = self.me.agent.add_remote_agent(hello["md"])
        add_s = now() - t
        send(self.sock, {"md": self.me.agent.get_agent_metadata()})
        self.raddr, self.rdev = hello["addr"], hello["dev"]
        self.setup = {"agent_create_s": self.me.agent_s, "register_s": self.me.register_s,
                      "target_register_s": hello["register_s"], "add_remote_agent_s": add_s,
                      "metadata_bytes": len(hello["md"]), "registered_bytes": nbytes, "backend_params": params}
        self.it = 0

    def remote(self, spans: list[tuple[int, int]]) -> np.ndarray:
        return np.array([[self.raddr + o, n, self.rdev] for o, n in spans], dtype=np.uint64).reshape(-1, 3)

    def one(self, handle: Any, local: list[tuple[int, int]], remote: list[tuple[int, int]], check: bool
            ) -> tuple[float, float, float]:
        """Post ``handle`` (local spans -> remote spans) once: (post, done, notification seen) seconds."""
        self.it += 1
        tag = b"t%d" % self.it
        for o, _ in local[:8]:  # new bytes each time: a stale destination cannot pass the checksum
            self.me.buf[o] = self.it & 0xFF
        self.me.sync()
        send(self.sock, {"op": "prep", "spans": [list(s) for s in remote], "tag": tag, "check": check})
        recv(self.sock)
        t0 = now()
        st = self.me.agent.transfer(handle, tag)
        t1 = now()
        while st == "PROC":
            st = self.me.agent.check_xfer_state(handle)
        t2 = now()
        if st != "DONE":
            raise RuntimeError(f"transfer {tag!r} ended {st}")
        r = recv(self.sock)
        if check and r["crc"] != self.me.crc(local):
            raise AssertionError(f"transfer {tag!r}: the target's bytes differ from the source's")
        return t1 - t0, t2 - t0, r["seen"] - t0

    def runs(self, mk: Any, spans: Any, release: bool = True) -> dict[str, float]:
        a = self.args
        rows: list[tuple[float, ...]] = []
        for rep in range(a.warmup + a.repeats):
            local, remote = spans()
            t = now()
            h = mk(local, remote)
            made = now() - t
            post, done, seen = self.one(h, local, remote, check=rep in (0, a.warmup + a.repeats - 1))
            t = now()
            if release:
                h.release()
            released = now() - t
            if rep >= a.warmup:
                rows.append((made, post, done, seen, released))
        cols = list(zip(*rows, strict=True))
        return {"make_us": med_us(cols[0]), "post_us": med_us(cols[1]), "done_us": med_us(cols[2]),
                "notif_us": med_us(cols[3]), "release_us": med_us(cols[4]),
                "done_p90_us": round(sorted(cols[2])[int(0.9 * (len(cols[2]) - 1))] * 1e6, 2)}

    def contiguous(self) -> list[dict[str, Any]]:
        ag, out = self.me.agent, []
        for n in SIZES:
            t = now()
            h = ag.initialize_xfer(self.op, ag.get_xfer_descs(self.me.descs([(0, n)]), self.me.mem),
                                   ag.get_xfer_descs(self.remote([(0, n)]), self.me.mem), self.peer, b"x")
            init_us = (now() - t) * 1e6
            row = self.runs(lambda _l, _r, h=h: h, lambda n=n: ([(0, n)], [(0, n)]), release=False)  # reposted
            h.release()
            row = {"bytes": n, "init_xfer_us": round(init_us, 2), **row,
                   "GBps_done": round(n / row["done_us"] / 1e3, 3), "GBps_notif": round(n / row["notif_us"] / 1e3, 3)}
            out.append(row)
            print(f"{n // KiB:6d} KiB  post {row['post_us']:8.1f} us  done {row['done_us']:9.1f} us  notif "
                  f"{row['notif_us']:9.1f} us  {row['GBps_done']:.2f} GB/s", flush=True)
        return out

    def scattered(self, base: int) -> list[dict[str, Any]]:
        a, ag, mem = self.args, self.me.agent, self.me.mem
        blk, layers, pool = a.block_kib * KiB, a.layers, a.pool_blocks
        span = [(base + (layer * pool + b) * blk, blk) for layer in range(layers) for b in range(pool)]
        t = now()
        p_local = ag.prep_xfer_dlist("NIXL_INIT_AGENT", self.me.descs(span), mem)
        p_remote = ag.prep_xfer_dlist(self.peer, self.remote(span), mem)
        prep_us = (now() - t) * 1e6
        rng = np.random.default_rng(0)
        out = []
        for n in [int(x) for x in a.blocks.split(",")]:
            def pick(n: int = n) -> tuple[list[int], list[int]]:
                def side(odd: int) -> list[int]:  # n non-adjacent blocks of each layer's pool
                    return [layer * pool + 2 * int(b) + odd for layer in range(layers)
                            for b in np.sort(rng.choice(pool // 2, n, replace=False))]
                return side(0), side(1)

            def spans(pick: Any = pick) -> tuple[Any, Any]:
                li, ri = pick()
                return _Idx([span[i] for i in li], li), _Idx([span[i] for i in ri], ri)

            methods = {
                "prepped": lambda lo, re: ag.make_prepped_xfer(self.op, p_local, np.array(lo.idx, np.int32),
                                                               p_remote, np.array(re.idx, np.int32), b"x"),
                "initialize_xfer": lambda lo, re: ag.initialize_xfer(
                    self.op, ag.get_xfer_descs(self.me.descs(lo), mem), ag.get_xfer_descs(self.remote(re), mem),
                    self.peer, b"x"),
            }
            for name, mk in methods.items():
                row = {"method": name, "layers": layers, "blocks": n, "block_bytes": blk,
                       "descriptors": layers * n, "bytes": layers * n * blk, **self.runs(mk, spans)}
                row["GBps_notif"] = round(row["bytes"] / row["notif_us"] / 1e3, 3)
                out.append(row)
                print(f"{layers} x {n:3d} x {a.block_kib} KiB {name:16s} make {row['make_us']:8.1f} us  post "
                      f"{row['post_us']:8.1f} us  done {row['done_us']:9.1f} us  notif {row['notif_us']:9.1f} us  "
                      f"{row['GBps_notif']:.2f} GB/s", flush=True)
        p_local.release()
        p_remote.release()
        self.setup["scattered_pool_prep_us"] = round(prep_us, 2)
        return out

    def close(self) -> None:
        send(self.sock, {"op": "quit"})
        self.proc.wait(timeout=60)
        self.me.agent.deregister_memory(self.me.reg)


class _Idx(list):
    """Spans (offset, bytes) that remember their pool indices."""

    def __init__(self, spans: list[tuple[int, int]], idx: list[int]) -> None:
        super().__init__(spans)
        self.idx = idx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu (DRAM) or cuda[:N] (VRAM; both processes on that GPU)")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--block-kib", type=int, default=64)
    ap.add_argument("--pool-blocks", type=int, default=64, help="blocks per layer in each side's pool")
    ap.add_argument("--blocks", default="1,4,16", help="blocks per layer moved by one scattered transfer")
    ap.add_argument("--backend-param", action="append", default=[], metavar="K=V",
                    help="UCX backend init parameter (default ucx_error_handling_mode=none)")
    ap.add_argument("--op", default="WRITE", choices=["WRITE", "READ"],
                    help="the initiator writes into the target's buffer, or reads from it (as the nixl transport does)")
    ap.add_argument("--out", default="benchmarks/results/nixl_raw_cpu.json")
    ap.add_argument("--role", default="initiator", help=argparse.SUPPRESS)
    ap.add_argument("--sock", help=argparse.SUPPRESS)
    ap.add_argument("--nbytes", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    params = {"ucx_error_handling_mode": "none", **dict(p.split("=", 1) for p in args.backend_param)}
    if args.role == "target":
        target(args.sock, args.device, args.nbytes, params)
        return
    if any(int(b) * 2 > args.pool_blocks for b in args.blocks.split(",")):
        raise SystemExit("--blocks: at most half of --pool-blocks (the blocks taken are not adjacent)")
    pool_bytes = args.layers * args.pool_blocks * args.block_kib * KiB
    ini = Initiator(args, SIZES[-1] + pool_bytes, params)
    try:
        contiguous = ini.contiguous()
        scattered = ini.scattered(SIZES[-1])
    finally:
        ini.close()
    from hetserve.cli.profile import git_commit

    if ini.me.cuda:
        import torch

        dev = f"{torch.cuda.get_device_name()} (torch {torch.__version__}), both processes on it, VRAM -> VRAM"
    else:
        dev = f"CPU, {os.cpu_count()} cores ({platform.processor() or platform.machine()}), DRAM -> DRAM"
    from importlib import metadata

    versions = {}
    for pkg in ("nixl", "nixl-cu13", "nixl-cu12"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    commit = git_commit(Path(__file__).resolve().parents[1])
    out = {"command": " ".join([sys.executable, *sys.argv]), "git_commit": commit, "device": dev, "nixl": versions, "sizes": SIZES,
           "config": {k: v for k, v in vars(args).items() if k not in ("role", "sock", "nbytes")},
           "setup": ini.setup, "contiguous": contiguous, "scattered": scattered,
           "loadavg": list(os.getloadavg()), "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
