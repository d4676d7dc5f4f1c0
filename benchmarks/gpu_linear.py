"""Decode-batch linear layers of the 8B shape: cuBLAS (``F.linear``) vs the skinny Triton GEMM, per weight.

Each weight is repeated once per layer (32 copies; the LM head once, 1 GB), and one timed unit is a CUDA graph
of one call per copy, so the weights stream from HBM (no copy fits in what L2 keeps between its uses) and no
host launch time is counted. Reports GB/s and the fraction of the measured copy bandwidth.

    python benchmarks/gpu_linear.py [--rows 1,4,8,16] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch
import torch.nn.functional as F
from suite_common import git_commit

from hetserve.engine.model.linears import graph_ms
from hetserve.kernels.skinny_gemm import SkinnyConfig, skinny_linear

SHAPES = {"qkv": (6144, 4096), "o_proj": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336), "lm_head": (128256, 4096)}


def _copy_bps() -> float:
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = graph_ms(lambda: dst.copy_(src))
    return 2 * n / (ms * 1e-3)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rows", default="1,4,8,16")
    ap.add_argument("--quick", action="store_true", help="a small config grid")
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated subset of " + ",".join(SHAPES))
    args = ap.parse_args()
    rows_list = [int(r) for r in args.rows.split(",")]
    copy_bps = _copy_bps()
    grid = ([SkinnyConfig(bn, bk, 4, st) for bn, bk, st in itertools.product((16, 32), (256,), (4,))]
            if args.quick else
            [SkinnyConfig(bn, bk, w, st) for bn, bk, w, st in itertools.product((16, 32, 64), (128, 256, 512), (4,),
                                                                                 (3, 4, 5))])
    results: dict[str, Any] = {}
    t0 = time.perf_counter()
    for name, (n, k) in SHAPES.items():
        if name not in args.shapes.split(","):
            continue
        copies = 1 if name == "lm_head" else 32
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / 64 for _ in range(copies)]
        nbytes = copies * n * k * 2
        per: dict[str, Any] = {}
        for rows in rows_list:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x, ws[0])
            entry: dict[str, Any] = {}

            def cublas(x: torch.Tensor = x, ws: list[torch.Tensor] = ws) -> None:
                for w in ws:
                    F.linear(x, w)

            ms = graph_ms(cublas)
            entry["cublas"] = {"ms": ms, "gb_s": nbytes / (ms * 1e-3) / 1e9, "bw_util": nbytes / (ms * 1e-3) / copy_bps}
            best: tuple[float, SkinnyConfig] | None = None
            cands = []
            for cfg in grid:
                try:
                    out = skinny_linear(x, ws[0], None, cfg)
                    err = float((out.float() - ref.float()).abs().max() / ref.float().abs().max())

                    def skinny(x: torch.Tensor = x, cfg: SkinnyConfig = cfg, ws: list[torch.Tensor] = ws) -> None:
                        for w in ws:
                            skinny_linear(x, w, None, cfg)

                    ms = graph_ms(skinny)
                except Exception as e:  # noqa: BLE001 - a config that does not compile (shared memory) is skipped
                    cands.append({"config": cfg.__dict__, "error": f"{type(e).__name__}: {str(e)[:120]}"})
                    continue
                cands.append({"config": cfg.__dict__, "ms": ms, "rel_err": err})
                if best is None or ms < best[0]:
                    best = (ms, cfg)
            if best is not None:
                entry["skinny_best"] = {"config": best[1].__dict__, "ms": best[0],
                                        "gb_s": nbytes / (best[0] * 1e-3) / 1e9,
                                        "bw_util": nbytes / (best[0] * 1e-3) / copy_bps,
                                        "speedup_vs_cublas": entry["cublas"]["ms"] / best[0]}
            entry["skinny_all"] = cands
            per[f"rows{rows}"] = entry
            sb = entry.get("skinny_best", {})
            print(f"{name:8s} rows {rows:2d}: cublas {entry['cublas']['bw_util'] * 100:5.1f}% "
                  f"skinny {sb.get('bw_util', 0) * 100:5.1f}% {sb.get('config')}", flush=True)
        results[name] = {"n": n, "k": k, "copies": copies, "bytes_per_unit": nbytes, "by_rows": per}
        del ws
        torch.cuda.empty_cache()
    out = {"benchmark": "decode-batch linear layers, cuBLAS vs skinny Triton GEMM", "command": " ".join(sys.argv),
           "git_commit": git_commit(), "device": torch.cuda.get_device_name(), "emulation": None, "emulated": False,
           "copy_gb_s": copy_bps / 1e9, "config": {"rows": rows_list, "grid": [c.__dict__ for c in grid],
                                                   "timing": "median of 5 CUDA-graph replays (linears.graph_ms), one call per copy"},
           "results": results, "wall_s": time.perf_counter() - t0}
    dst = Path(os.environ.get("OUT", ROOT / "benchmarks/results")) / "gpu-linear.json"
    dst.write_text(json.dumps(out, indent=2))
    print(f"wrote {dst}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
