#!/usr/bin/env bash
# KV hand-offs on one GPU in one device call (~6-8 min): the GPU tests of the transfer paths, the host cost of one
# hand-off's KV work (kv_breakdown.py), then hand-offs between two worker processes (kv_runtime.py, Llama-3.1-8B's
# KV) over shm (CUDA IPC) and nixl, one at a time and ``STREAM`` back to back. Run from the device machine's
# repository root, the tree to measure in .clean, wheels in .whl (msgspec, pyzmq) and .whl-nixl:
#
#   bash .clean/benchmarks/gpu_kv_stream.sh        # carry: .clean .whl .whl-nixl
#
# The workers are MPS clients 25% (sender) / 75% (receiver), as the emulated pair. TESTS=0 skips the tests,
# BREAKDOWN=0 kv_breakdown.py. RUNS: transport:batch pairs (default "shm:1 shm:0 nixl:1"; batch 0 runs with
# HETSERVE_KV_BATCH=0: one message per hand-off). Results: $OUT/gpu-kv-stream.tgz (the device tool returns at
# most 8 files) holding kv_breakdown_gpu.json, kv_runtime_gpu_<transport>_batch<0|1>.json, the logs;
# gpu-kv-stream.log beside it.
set -u
LINKS=${LINKS:-pcie4x16,eth25}
SIZES=${SIZES:-1024,4096,16384,65536}
REPEATS=${REPEATS:-3}
STREAM=${STREAM:-8}
TESTS=${TESTS:-1}
RUNS=${RUNS:-shm:1 shm:0 nixl:1}
BREAKDOWN=${BREAKDOWN:-1}
LOG_NAME=gpu-kv-stream.log
. "$(dirname "$0")/gpu_common.sh"
cd "$TREE" || exit 1
cat benchmarks/.commit 2>/dev/null
if [ "$TESTS" = 1 ]; then
  el "GPU tests of the transfer paths"
  timeout -k 10 240 "$PY" -m pytest -q -x -m "gpu or not gpu or slow" -p no:cacheprovider \
    tests/runtime/test_gpu_transfer.py tests/runtime/test_kv_link_clock.py tests/runtime/test_kv_direct.py \
    tests/runtime/test_kv_batch.py tests/runtime/test_nixl_transport.py 2>&1 | tail -15 | tee "$OUT/tests.log"
fi
if [ "$BREAKDOWN" = 1 ]; then
  el "kv_breakdown --device cuda"
  timeout -k 10 90 "$PY" benchmarks/kv_breakdown.py --device cuda --out "$OUT/kv_breakdown_gpu.json" 2>&1 \
    | tail -20 | cut -c1-160
fi
for run in $RUNS; do
  tr=${run%%:*}; batch=${run##*:}
  el "kv_runtime --transport $tr --mps --stream $STREAM (HETSERVE_KV_BATCH=$batch)"
  HETSERVE_KV_BATCH=$batch timeout -k 10 "${KV_TIMEOUT:-200}" "$PY" benchmarks/kv_runtime.py --device cuda \
    --shape llama8b --links "$LINKS" --sizes-kib "$SIZES" --repeats "$REPEATS" --transport "$tr" --mps \
    --stream "$STREAM" --out "$OUT/kv_runtime_gpu_${tr}_batch${batch}.json" 2>&1 | grep -v Warning \
    | tee "$OUT/kv_runtime_gpu_${tr}_batch${batch}.log" | cut -c1-150
done
el "done"
cd "$OUT" && tar czf gpu-kv-stream.tgz kv_breakdown_gpu.json kv_runtime_gpu_* tests.log 2>/dev/null \
  && rm -f kv_breakdown_gpu.json kv_runtime_gpu_* tests.log
ls -la "$OUT"
