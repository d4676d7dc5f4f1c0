"""Issue 9: copy bandwidth from GPU0 to GPU1, 1 MiB to 1 GiB (powers of 4), the median of >= 5 timed rounds.

    python benchmarks/gpu_link.py                                  # every method (< 2 minutes on two GPUs)
    python benchmarks/gpu_link.py --methods ipc,nccl --repeats 7
    python benchmarks/gpu_link.py --device cpu --sizes-mib 1,4     # the TCP path on CPU tensors (smoke, no GPU)

Methods (the two-process ones in ``gpu_link_methods.py``, which says how each is timed):

* ``peer``: in this process, ``dst.copy_(src)`` from cuda:0 to cuda:1 (PyTorch's peer copy).
* ``ipc``: two processes, the receiver opens the sender's buffer by CUDA IPC and pulls it.
* ``shm``: two processes, hetserve's shm transport (staging copy + CUDA IPC pull + zmq round trip): what a KV
  hand-off between workers on the same host uses. Needs pyzmq and msgspec (carried as wheels on the GPU image).
* ``nccl``: two processes, ``torch.distributed`` send / recv (TCP store on 127.0.0.1).
* ``tcp``: two processes, GPU -> pinned host -> localhost TCP -> pinned -> GPU: the cross-vendor path.
* ``ipc_mps``, ``shm_mps``: ``ipc`` and ``shm`` with the receiver an MPS client of GPU1 (25% of the SMs, the MPS
  daemon seeing GPU1 only) and the sender a whole GPU0, each seeing only its own GPU: exactly how the low-end pair
  (``h200-pair-lowend.yaml``) runs its workers, so these say whether its KV hand-offs and Hetis mailboxes can use
  CUDA IPC (``gpu_cluster_run.sh`` falls back to host staging when they fail).
* ``ipc_isolated``: ``ipc`` with each process seeing only its own GPU (``CUDA_VISIBLE_DEVICES`` = its UUID), as the
  low-end pair's workers run (an MPS client sees only its GPU): the IPC handle is opened on a GPU the receiver
  cannot see.

The sender runs on GPU0 and the receiver on GPU1, each with ``CUDA_VISIBLE_DEVICES`` listing its own GPU first
(as ``gpu_cluster.py`` starts workers on a pair), so each computes on its ``cuda:0``. With one GPU both processes
run on GPU0 (GPU0 -> GPU0 across two processes, said in the output; ``nccl`` is skipped: NCCL refuses two ranks on
one GPU). ``--device cpu`` runs only ``tcp`` on CPU tensors: a smoke test of the script.

Output: ``$OUT/gpu-link-<device>.json`` when ``OUT`` is set, else ``benchmarks/results/gpu-link-<device>.json``
(``--out`` to choose): the command, git commit, device names, peer access, each process's visible devices, and per
method and size every round's GB/s (1e9 bytes/s), the median and the seconds per transfer. A table comes last.
NVLink multicast stays off (``NCCL_NVLS_ENABLE=0``, ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``,
``NVSHMEM_DISABLE_NVLS=1``, set here for every process).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

for _k, _v in {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}.items():
    os.environ[_k] = _v

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

METHODS = ("peer", "ipc", "shm", "nccl", "tcp", "ipc_isolated", "ipc_mps", "shm_mps")
DESCRIPTIONS = {
    "peer": "one process: dst.copy_(src), cuda:0 -> cuda:1 (PyTorch peer copy), CUDA events on the source stream",
    "ipc": "two processes: the receiver opens the sender's buffer by CUDA IPC once and pulls it (dst.copy_), "
    "CUDA events on the receiver's stream",
    "shm": "two processes: hetserve ShmTransport.send of a CUDA tensor (sender staging copy, receiver CUDA IPC pull, "
    "zmq round trip), timed by the sender: send returns once the receiver holds the bytes",
    "nccl": "two processes: torch.distributed NCCL send / recv, timed by the receiver (round start = an all-reduce)",
    "tcp": "two processes: device -> pinned host -> localhost TCP -> pinned host -> device, one transfer at a time, "
    "timed by the receiver (its request to the device copy's sync)",
    "ipc_isolated": "as ipc, but each process sees only its own GPU (CUDA_VISIBLE_DEVICES = its UUID)",
    "ipc_mps": "as ipc_isolated, the receiver an MPS client of GPU1 (the low-end pair's workers)",
    "shm_mps": "as shm, each process seeing only its own GPU, the receiver an MPS client of GPU1",
}
MPS_SHARE = 25  # the low-end pair's GPU1: h200-pair-lowend.yaml
RESULT_TAG = "GPU_LINK_RESULT "
MiB = 2**20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _git_commit() -> str:
    from hetserve.cli.profile import git_commit

    return git_commit(ROOT)


def uuid_text(raw: Any) -> str | None:
    """``GPU-xxxxxxxx-...`` from ``torch.cuda.get_device_properties(i).uuid`` (a ``_CUuuid`` whose ``bytes`` are the
    16 UUID bytes on torch 2.11; ``str()`` of it is no UUID), or None."""
    b = getattr(raw, "bytes", None)
    if isinstance(b, (bytes, bytearray)) and len(b) == 16:
        return f"GPU-{uuid.UUID(bytes=bytes(b))}"
    text = str(raw or "")
    m = re.fullmatch(r"(GPU-)?([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})", text)
    return f"GPU-{m.group(2).lower()}" if m else None


def gpu_ids(n: int) -> list[str]:
    """How a child process names each GPU this one sees as cuda:i: its UUID, else this process's own
    ``CUDA_VISIBLE_DEVICES`` entry, else the index."""
    import torch

    ids = []
    parent = [x for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
    for i in range(n):
        text = uuid_text(getattr(torch.cuda.get_device_properties(i), "uuid", None))
        ids.append(text or (parent[i] if i < len(parent) else str(i)))
    return ids


def visible_devices(ids: list[str], own: int, layout: str) -> str:
    """``CUDA_VISIBLE_DEVICES`` of a process on GPU ``own``: its GPU first (it computes on cuda:0), then the others
    (``own-first``), or its GPU alone (``isolated``, ``mps``)."""
    if layout in ("isolated", "mps"):
        return ids[own]
    return ",".join([ids[own]] + [x for i, x in enumerate(ids) if i != own])


def slug(name: str) -> str:
    words = [w for w in re.split(r"[^a-z0-9]+", name.lower()) if w and w != "nvidia"]
    return "-".join(words[:1]) or "gpu"


def run_pair(
    methods: list[str],
    layout: str,
    args: argparse.Namespace,
    ids: list[str],
    deadline: float,
    recv_env: dict[str, str] | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Start the receiver (GPU1; ``recv_env`` added to its environment) and the sender (GPU0), run ``methods``; per
    method the driving side's result."""
    port, store_port = _free_port(), _free_port()
    common = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--device",
        args.device,
        "--sizes-mib",
        args.sizes_mib,
        "--repeats",
        str(args.repeats),
        "--batch-mib",
        str(args.batch_mib),
        "--tcp-batch-mib",
        str(args.tcp_batch_mib),
        "--methods",
        ",".join(methods),
        "--port",
        str(port),
        "--store-port",
        str(store_port),
        "--deadline",
        str(deadline),
    ]
    vis = {}
    procs = {}
    for role, own in (("recv", 1 if len(ids) > 1 else 0), ("send", 0)):
        env = dict(os.environ)
        if role == "recv" and recv_env:
            env.update(recv_env)
        if ids:
            env["CUDA_VISIBLE_DEVICES"] = vis[role] = visible_devices(ids, own, layout)
        procs[role] = subprocess.Popen(
            [*common, "--role", role], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
        )
    outs: dict[str, Any] = {}
    for role, p in procs.items():
        try:
            out, err = p.communicate(timeout=max(10.0, deadline - time.time() + 60.0))
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            err = f"timed out, killed\n{err}"
        line = next((x for x in reversed(out.splitlines()) if x.startswith(RESULT_TAG)), None)
        outs[role] = (
            json.loads(line[len(RESULT_TAG) :])
            if line
            else {"_error": f"{role} exited {p.returncode}: {err.strip()[-1500:]}"}
        )
    merged: dict[str, Any] = {}
    for m in methods:
        sides = {r: outs[r].get(m) or {"error": outs[r].get("_error", "no result")} for r in outs}
        driver = "send" if m.startswith("shm") else "recv"
        res = dict(sides[driver])
        for r, s in sides.items():
            if "error" in s and "error" not in res:
                res["error"] = f"{r}: {s['error']}"
            if r != driver and "skipped" in s:
                res.setdefault("skipped", s["skipped"])
        res["other_side"] = {k: v for k, v in sides["send" if driver == "recv" else "recv"].items() if k != "rows"}
        res["layout"] = layout
        merged[m] = res
    merged["_devices"] = {r: outs[r].get("_device") for r in outs}
    return merged, vis


def table(methods: list[str], res: dict[str, Any], sizes: list[int]) -> str:
    cols = [m for m in methods if res.get(m, {}).get("rows")]
    head = f"{'size':>9s}" + "".join(f"{m:>14s}" for m in cols)
    lines = [head]
    for n in sizes:
        cells = []
        for m in cols:
            row = next((r for r in res[m]["rows"] if r["size_bytes"] == n), None)
            cells.append(f"{row['median_gb_per_s']:14.2f}" if row else f"{'-':>14s}")
        lines.append(f"{n // MiB:>5d} MiB" + "".join(cells))
    for m in methods:
        r = res.get(m, {})
        if "skipped" in r or "error" in r:
            lines.append(f"{m}: {'skipped: ' + r['skipped'] if 'skipped' in r else 'error: ' + r['error']}"[:200])
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--sizes-mib", default="1,4,16,64,256,1024")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds per size (>= 5 for the issue; +1 warm-up)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument(
        "--batch-mib",
        type=float,
        default=256.0,
        help="bytes moved per timed round (several transfers of a small size), GPU methods",
    )
    ap.add_argument("--tcp-batch-mib", type=float, default=64.0, help="the same for tcp (slower: fewer bytes)")
    ap.add_argument("--budget-s", type=float, default=100.0, help="start no new size after this many seconds")
    ap.add_argument("--tag", default=None, help="file gpu-link-<tag>.json (default: cpu, or the GPU and count)")
    ap.add_argument("--out", default=None, help="result JSON path (default: $OUT or benchmarks/results)")
    ap.add_argument("--role", choices=["send", "recv"], help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--store-port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sizes = [int(float(x) * MiB) for x in args.sizes_mib.split(",") if x]
    wanted = [m for m in args.methods.split(",") if m]
    bad = [m for m in wanted if m not in METHODS]
    if bad or args.repeats < 1 or not sizes:
        print(f"--methods: choose from {', '.join(METHODS)} (got {bad}); --repeats >= 1; --sizes-mib", file=sys.stderr)
        return 2
    from gpu_link_methods import Plan, peer_copy, run_role

    if args.role:
        plan = Plan(sizes, args.repeats, int(args.batch_mib * MiB), int(args.tcp_batch_mib * MiB), args.deadline)
        out = run_role(args.role, wanted, args.device, args.port, args.store_port, plan)
        print(RESULT_TAG + json.dumps(out), flush=True)
        return 0

    import torch

    t_start = time.monotonic()
    started_utc = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    deadline = time.time() + args.budget_s
    plan = Plan(sizes, args.repeats, int(args.batch_mib * MiB), int(args.tcp_batch_mib * MiB), deadline)
    res: dict[str, Any] = {}
    names: list[str] = []
    peer_access: dict[str, bool] = {}
    ids: list[str] = []
    if args.device == "cuda":
        if not torch.cuda.is_available():
            print("--device cuda: no CUDA device (use --device cpu for the smoke test)", file=sys.stderr)
            return 2
        n = torch.cuda.device_count()
        names = [torch.cuda.get_device_name(i) for i in range(n)]
        ids = gpu_ids(min(n, 2))
        if n > 1:
            peer_access = {
                "0->1": torch.cuda.can_device_access_peer(0, 1),
                "1->0": torch.cuda.can_device_access_peer(1, 0),
            }
        direction = "GPU0 -> GPU1" if n > 1 else "GPU0 -> GPU0 across two processes (one GPU: no link is crossed)"
        device_desc = f"{n} x {names[0]}" if len(set(names)) == 1 else ", ".join(names)
        tag = args.tag or f"{slug(names[0])}x{n}"
    else:
        n = 0
        direction = "CPU -> CPU across two processes (smoke test of the script: the tcp path on CPU tensors)"
        device_desc = f"CPU ({os.cpu_count()} cores)"
        tag = args.tag or "cpu"
    for m in wanted:  # what cannot run here, and why
        if args.device == "cpu" and m != "tcp":
            res[m] = {"skipped": "--device cpu runs only tcp"}
        elif n == 1 and m == "nccl":
            res[m] = {"skipped": "one GPU: NCCL refuses two ranks on one GPU"}
        elif n == 1 and m == "ipc_isolated":
            res[m] = {"skipped": "one GPU: the same as ipc"}
        elif m.endswith("_mps") and n < 2:
            res[m] = {"skipped": "needs two GPUs (GPU1 under MPS, GPU0 whole)"}
        elif m.endswith("_mps") and shutil.which("nvidia-cuda-mps-control") is None:
            res[m] = {"skipped": "no nvidia-cuda-mps-control on PATH"}
    if "peer" in wanted and "peer" not in res:
        t0 = time.perf_counter()
        try:
            res["peer"] = {"rows": peer_copy(torch.device("cuda:0"), torch.device(f"cuda:{min(1, n - 1)}"), plan)}
        except Exception as e:  # noqa: BLE001 - recorded
            res["peer"] = {"error": f"{type(e).__name__}: {e}"}
        res["peer"]["wall_s"] = time.perf_counter() - t0
        res["peer"]["layout"] = "one process"
        torch.cuda.empty_cache()
    visible: dict[str, dict[str, str]] = {}
    devices_seen: dict[str, Any] = {}
    groups = (
        ("own-first", ["ipc", "shm", "nccl", "tcp"]),
        ("isolated", ["ipc_isolated"]),
        ("mps", ["ipc_mps", "shm_mps"]),
    )
    for layout, group in groups:
        todo = [m for m in group if m in wanted and m not in res]
        if not todo:
            continue
        mps = None
        try:
            recv_env = None
            if layout == "mps":
                from hetserve.device.mps import MpsDaemon

                mps = MpsDaemon(visible_devices=ids[1]).start()
                recv_env = mps.client_env(thread_percentage=MPS_SHARE)
            got, vis = run_pair(todo, layout, args, ids, deadline, recv_env)
        except Exception as e:  # noqa: BLE001 - recorded (the MPS daemon did not start, say)
            got, vis = {m: {"error": f"{type(e).__name__}: {e}", "layout": layout} for m in todo}, {}
            got["_devices"] = {}
        finally:
            if mps is not None:
                mps.stop()
        devices_seen[layout] = got.pop("_devices")
        res.update(got)
        visible[layout] = vis
    for m, r in res.items():
        r["description"] = DESCRIPTIONS[m]
    text = table(wanted, res, sizes)
    out = {
        "benchmark": "copy bandwidth GPU0 -> GPU1 (issue 9)",
        "command": " ".join([sys.executable, *sys.argv]),
        "git_commit": _git_commit(),
        "started_utc": started_utc,
        "device": device_desc,
        "devices": names,
        "num_gpus": n,
        "direction": direction,
        "emulation": None,
        "peer_access": peer_access,
        "visible_devices": visible,
        "devices_seen_by_processes": devices_seen,
        "env": {
            k: os.environ.get(k)
            for k in (
                "NCCL_NVLS_ENABLE",
                "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                "NVSHMEM_DISABLE_NVLS",
                "CUDA_DEVICE_ORDER",
                "CUDA_VISIBLE_DEVICES",
            )
        },
        "config": {
            "sizes_bytes": sizes,
            "repeats": args.repeats,
            "warmup_rounds": 1,
            "batch_bytes": plan.batch_bytes,
            "tcp_batch_bytes": plan.tcp_batch_bytes,
            "methods": wanted,
            "budget_s": args.budget_s,
        },
        "units": "GB/s = 1e9 bytes/s; median over rounds of (transfers x size / round seconds)",
        "methods": res,
        "complete": all(len(r.get("rows", [])) == len(sizes) or "skipped" in r for r in res.values()),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "wall_s": time.monotonic() - t_start,
        "table": text,
    }
    dest = (
        Path(args.out)
        if args.out
        else (Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks/results")
        / f"gpu-link-{tag}.json"
    )
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {dest} ({out['wall_s']:.0f} s)")
    print(f"{direction} ({device_desc}), GB/s, median of {args.repeats} rounds")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
