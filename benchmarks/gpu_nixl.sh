#!/usr/bin/env bash
# NIXL on one GPU, in one device call (~4-6 min): NIXL by itself between two processes (nixl_raw.py, VRAM -> VRAM),
# then KV hand-offs between two worker processes (kv_runtime.py, Llama-3.1-8B's KV) over shm (CUDA IPC) and over
# nixl, same options. Run from the device machine's repository root, the tree to measure in .clean, wheels in
# .whl (msgspec, pyzmq) and .whl-nixl (the UCX-only nixl-cu13 cp312 wheel + the nixl meta wheel):
#
#   bash .clean/benchmarks/gpu_nixl.sh        # carry: .clean .whl .whl-nixl
#
# MPS=1 (default): the workers are MPS clients 25% (sender) / 75% (receiver), as the emulated pair; if the nixl
# run fails under MPS it is run again without (and shm too, time permitting). MPS=0: both without MPS.
# Results: $OUT/gpu-nixl.tgz (the device tool returns at most 8 files) holding nixl_raw_gpu.json,
# kv_runtime_gpu_{shm,nixl}[_nomps].json and their logs; gpu-nixl.log beside it.
set -u
LINKS=${LINKS:-pcie4x16,eth25}
SIZES=${SIZES:-1024,4096,16384,65536}
REPEATS=${REPEATS:-5}
MPS=${MPS:-1}
LOG_NAME=gpu-nixl.log
. "$(dirname "$0")/gpu_common.sh"
"$PY" -c "import torch, nixl._api as a; print('torch', torch.__version__, torch.version.cuda, '| nixl', a.__file__)" \
  || { el "nixl is not importable"; exit 1; }
cd "$TREE" || exit 1
cat benchmarks/.commit 2>/dev/null

el "nixl_raw --device cuda"
timeout -k 10 120 "$PY" benchmarks/nixl_raw.py --device cuda --repeats 20 --out "$OUT/nixl_raw_gpu.json" 2>&1 \
  | grep -v Warning | tee "$OUT/nixl_raw_gpu.log" | cut -c1-160

kv() {  # kv <transport> <suffix> [--mps]
  el "kv_runtime --transport $1 $3"
  timeout -k 10 "${KV_TIMEOUT:-150}" "$PY" benchmarks/kv_runtime.py --device cuda --shape llama8b --links "$LINKS" \
    --sizes-kib "$SIZES" --repeats "$REPEATS" --transport "$1" $3 --out "$OUT/kv_runtime_gpu_$1$2.json" 2>&1 \
    | grep -v Warning | tee "$OUT/kv_runtime_gpu_$1$2.log" | cut -c1-160
  [ -s "$OUT/kv_runtime_gpu_$1$2.json" ]
}
if [ "$MPS" = 1 ]; then
  kv shm "" --mps
  if ! kv nixl "" --mps && [ $(( $(date +%s) - t0 )) -lt 200 ]; then
    el "nixl under MPS failed: nixl again without MPS (then shm, if there is time)"
    kv nixl _nomps ""
    [ $(( $(date +%s) - t0 )) -lt 300 ] && kv shm _nomps ""
  fi
else
  kv shm _nomps ""
  kv nixl _nomps ""
fi
el "done"
cd "$OUT" && tar czf gpu-nixl.tgz nixl_raw_gpu.* kv_runtime_gpu_* 2>/dev/null && rm -f nixl_raw_gpu.* kv_runtime_gpu_*
ls -la "$OUT"
