#!/usr/bin/env bash
# One device call (<= 9 minutes of wall time; the tool's hard limit is 600 s) of issue 8's measurements on an
# H100 split by MPS: benchmarks/gpu_cluster.py with a plan chosen by PLAN, every knob overridable by env vars.
# Results in $OUT: gpu-cluster-<TAG>[-<TRACE>].json (rewritten after every run, so a deadline or a kill still
# leaves what was measured), cluster.log, nvidia-smi.txt. Copy the JSON to benchmarks/results/ and run
# `python benchmarks/cluster_summary.py` (no GPU).
#
# usage (device tool, carry [".data", "benchmarks/.commit"], timeout_s 600):
#   PLAN=conv bash benchmarks/gpu_cluster_run.sh
#   PLAN=starved TAG=h100-mps-k bash benchmarks/gpu_cluster_run.sh
#   TRACE=code REPEATS=2 STRATS=dp,cronus RATES=16,32 bash benchmarks/gpu_cluster_run.sh   # a plan of your own
#   DRY=1 PLAN=code bash benchmarks/gpu_cluster_run.sh      # print the plan and its time estimate only (no GPU)
#
# Env vars: PLAN (conv | conv-repeats | code | starved; default conv), TRACE (conv | code), REPEATS, RATES (the
# default rates), RATES_FOR ("strategy=r1,r2;..." per-strategy rates), STRATS, N (requests per run), CLUSTER
# (cluster file; the memory-starved one is examples/clusters/emulated-h100-mps-pair-starved.yaml), TAG,
# DEADLINE (s after which no run starts that would not end in time, by its arrival span; default 470),
# HARD (kill after this many s; default 560), STOP_AFTER_FAIL (skip a strategy's higher rates after this many
# failing rates; default 1), SMOKE (strategies for a 2-layer wiring pass first; costs ~15 s per strategy), EXTRA.
#
# Time per (strategy, rate, repeat), fit to the wall times of files a-i (gpu-cluster-h100-mps-*.json: total
# wall minus start-ups minus arrival spans, per run): a run costs its arrival span N / rate plus ~5 s (h: rates
# 8-24, unsaturated) to ~11 s (i, f: rates 36-64, near saturation: the drain after the last arrival, up to 256
# output tokens at 15-20 ms, and the simulator); ~9 s is used below. Each strategy adds ~13 s of start-up (8-22 s
# measured) + ~2 s warm-up, the process ~10 s (MPS daemon, imports). A saturated run is cut at span + 32.5 s (the
# SLO bound, TTFT 2 s + 255 x TPOT 100 ms, + 5 s), and with STOP_AFTER_FAIL=1 the strategy's higher rates are
# skipped. Typical estimate = 10 + 15 x strategies + sum over runs (N / rate + 9); `gpu_cluster.py --estimate`
# prints it (and the worst case, every run cut). New result files record wall_s per run (real, sim): refit.
#
#   plan          strategies (rates)                                             N   reps est.  covers (issue 8)
#   conv          high-alone (48,64,80) low-alone (6,9,12) dp (48,64,80,96)     100  1    ~415 s comparisons 1, 2, 4, 5
#                 pp, pd-lp (24,36,48) pd-hp (48,64,80) cronus (24,...,80)                      on Azure-conv, one run per rate
#   conv-repeats  cronus (36,48,64) pd-lp (24,36) pd-hp (48,64) dp (36,48)       80  3    ~365 s medians of 3 for 1 and 2
#   code          high-alone, dp, pp, pd-hp, cronus (16,32,48) low-alone          80  1    ~405 s 1, 2, 4, 5 on Azure-code
#                 (4,8,12) pd-lp (8,16,24)                                                       (prefill-heavy)
#   starved       hetis, dp, pp, pd-lp, pd-hp (4,8,12), memory-starved pair       60  1    ~360 s comparison 3
# Not all of issue 8 fits one call: conv, then starved, then code (or conv-repeats) is the order of value.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
PLAN=${PLAN:-conv}
ALL=high-alone,low-alone,dp,pp,pd-lp,pd-hp,cronus
case "$PLAN" in
  conv) d_trace=conv; d_strats=$ALL; d_rates=48,64,80; d_n=100; d_reps=1; d_cluster=""
        d_for="low-alone=6,9,12;pp=24,36,48;pd-lp=24,36,48;dp=48,64,80,96;cronus=24,36,48,64,80" ;;
  conv-repeats) d_trace=conv; d_strats=cronus,pd-lp,pd-hp,dp; d_rates=36,48; d_n=80; d_reps=3; d_cluster=""
        d_for="cronus=36,48,64;pd-lp=24,36;pd-hp=48,64" ;;
  code) d_trace=code; d_strats=$ALL; d_rates=16,32,48; d_n=80; d_reps=1; d_cluster=""
        d_for="low-alone=4,8,12;pd-lp=8,16,24" ;;
  starved) d_trace=conv; d_strats=hetis,dp,pp,pd-lp,pd-hp; d_rates=4,8,12; d_n=60; d_reps=1
        d_cluster=examples/clusters/emulated-h100-mps-pair-starved.yaml; d_for="" ;;
  *) echo "PLAN: conv | conv-repeats | code | starved (got $PLAN)"; exit 2 ;;
esac
TRACE=${TRACE:-$d_trace}
STRATS=${STRATS:-$d_strats}
RATES=${RATES:-$d_rates}
RATES_FOR=${RATES_FOR-$d_for}
N=${N:-$d_n}
REPEATS=${REPEATS:-$d_reps}
CLUSTER=${CLUSTER:-${d_cluster:-examples/clusters/emulated-h100-mps-pair.yaml}}
TAG=${TAG:-h100-mps-$PLAN-$(date -u +%m%d%H%M)}
DEADLINE=${DEADLINE:-470}
HARD=${HARD:-560}
STOP_AFTER_FAIL=${STOP_AFTER_FAIL:-1}
ARGS=(--trace "$TRACE" --strategies "$STRATS" --rates "$RATES" --rates-for "$RATES_FOR" --num-requests "$N"
      --repeats "$REPEATS" --cluster "$CLUSTER" --tag "$TAG" --stop-after-fail "$STOP_AFTER_FAIL")
echo "plan $PLAN: ${ARGS[*]} --deadline-s $DEADLINE ${EXTRA:-}" | tee "$OUT/cluster.log"
python benchmarks/gpu_cluster.py "${ARGS[@]}" --estimate ${EXTRA:-} | tee -a "$OUT/cluster.log"
[ -n "${DRY:-}" ] && exit 0
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee "$OUT/nvidia-smi.txt"
T0=$(date +%s)
if [ -n "${SMOKE:-}" ]; then
  timeout 240 python benchmarks/gpu_cluster.py --layers 2 --num-requests 6 --rates 8 --max-input 256 \
    --max-output 16 --strategies "$SMOKE" --tag smoke --deadline-s 200 2>&1 | tail -40 | tee "$OUT/smoke.log"
fi
LEFT=$((HARD - $(date +%s) + T0))
DL=$((DEADLINE < LEFT - 60 ? DEADLINE : LEFT - 60))
timeout -k 10 "$LEFT" python benchmarks/gpu_cluster.py "${ARGS[@]}" --deadline-s "$DL" ${EXTRA:-} 2>&1 \
  | tee -a "$OUT/cluster.log" | grep -v "^\s*$" | tail -60
echo "exit ${PIPESTATUS[0]} after $(($(date +%s) - T0)) s"
