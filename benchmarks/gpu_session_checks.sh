#!/usr/bin/env bash
# The end-of-session checks on one GPU, one call (~8 min): the GPU test files, NIXL by itself (READ, as the nixl
# transport moves bytes, and WRITE), the nixl transport's tests, and `hetserve profile --sustained` on the 8B shape.
# Run from the device machine's repository root with the tree in .clean and wheels in .whl and .whl-nixl (carry
# all three). Results: $OUT/checks.tgz (the device tool returns at most 8 files) and $OUT/checks.log.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
  .whl-nixl/*.whl 2>&1 | grep -v WARN | tail -1
export PYTHONPATH=/tmp/site:$PWD/.clean PYTHONUNBUFFERED=1
cd .clean || exit 1
exec > >(tee -a "$OUT/checks.log") 2>&1
t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
el "GPU tests"
timeout -k 10 330 python -m pytest -q -m "gpu or not gpu or slow" tests/kernels tests/engine/test_cuda_graphs.py \
  tests/engine/test_piecewise_graphs.py tests/engine/test_linears.py tests/engine/test_sampler.py \
  tests/runtime/test_gpu_transfer.py tests/runtime/test_hetis_mailbox.py tests/runtime/test_kv_direct.py \
  tests/device/test_emulation.py tests/profiling/test_profiler.py tests/profiling/test_sustained.py \
  tests/runtime/test_nixl_transport.py 2>&1 | tail -4
for op in READ WRITE; do
  el "nixl_raw --op $op"
  timeout -k 5 60 python benchmarks/nixl_raw.py --device cuda --op $op --repeats 10 --blocks 1,16 \
    --out "$OUT/nixl_raw_gpu_$op.json" 2>&1 | grep -E "KiB|rror" | cut -c1-130
done
el "profile --sustained"
timeout -k 10 240 python -c "import sys; from hetserve.cli.main import main; sys.exit(main())" profile \
  --model examples/models/llama-3.1-8b --device cuda --dtype auto --layers 2 --attention-backend auto --seed 0 \
  --output "$OUT/profile-sustained.json" --device-name H100-SXM --sustained 2>&1 | grep -E "sustained|wrote|rror"
el "done"
cd "$OUT" && tar czf checks.tgz ./*.json && rm -f ./*.json
