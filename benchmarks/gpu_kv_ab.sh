#!/usr/bin/env bash
# KV hand-offs side by side in one device call: benchmarks/kv_runtime.py (two worker processes on one GPU as
# MPS clients 25% -> 75%, CUDA IPC, paced links) for each source tree given, in turn, then the in-process stage
# breakdown (kv_breakdown.py) of the first. Results: $OUT/kv-<name>.json, $OUT/kv-breakdown.json.
#
#   TREES=".clean:new .old:old" LINKS=pcie4x16,eth25 SIZES=1024,4096,16384,65536 REPEATS=5 \
#       bash .clean/benchmarks/gpu_kv_ab.sh
set -u
LINKS=${LINKS:-pcie4x16,eth25}
SIZES=${SIZES:-1024,4096,16384,65536}
REPEATS=${REPEATS:-5}
first=""
for spec in ${TREES:-.clean:new}; do
  dir=${spec%%:*}; name=${spec##*:}
  [ -z "$first" ] && first=$dir
  (cd "$dir" && PYTHONPATH=/tmp/site:$PWD timeout ${KV_TIMEOUT:-200} python benchmarks/kv_runtime.py --device cuda \
     --mps --shape llama8b --links "$LINKS" --sizes-kib "$SIZES" --repeats "$REPEATS" --out "$OUT/kv-$name.json" \
     2>&1 | grep -v Warning | tee "$OUT/kv-$name.log" | cut -c1-150)
done
(cd "$first" && PYTHONPATH=/tmp/site:$PWD timeout 120 python benchmarks/kv_breakdown.py --device cuda \
   --tokens 16,128,512 --out "$OUT/kv-breakdown.json" 2>&1 | tail -3 | cut -c1-300)
