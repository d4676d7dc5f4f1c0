#!/usr/bin/env bash
# One device call for issues 6-8 on an H100: CUDA IPC probe, profiles of the MPS clients, a smoke pass of every
# strategy on a 2-layer model, then the measured runs (as many as fit before the deadline). Results in $OUT.
# usage (device tool): bash benchmarks/gpu_cluster_run.sh [STRATEGIES] [RATES] [DEADLINE_S]
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
STRATS=${1:-high-alone,low-alone,dp,pp,pd-lp,pd-hp,cronus,hetis}
RATES=${2:-8,16,24}
DEADLINE=${3:-420}
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee "$OUT/nvidia-smi.txt"
if [ -n "${SMOKE:-}" ]; then
  timeout 240 python benchmarks/gpu_cluster.py --layers 2 --num-requests 6 --rates 8 --max-input 256 \
    --max-output 16 --strategies "$SMOKE" --tag smoke --deadline-s 200 2>&1 | tail -40 | tee "$OUT/smoke.log"
fi
timeout $((DEADLINE + 120)) python benchmarks/gpu_cluster.py --strategies "$STRATS" --rates "$RATES" \
  --deadline-s "$DEADLINE" ${EXTRA:-} 2>&1 | tee "$OUT/cluster.log" | grep -v "^\s*$" | tail -60
