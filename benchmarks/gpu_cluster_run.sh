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
#
# Issue 9, two GPUs of one host (kind nvidia-h200-x2; README "Two GPUs"): each plan runs conv AND code on every
# strategy's workers (one start-up per strategy), 3 rates each, 6 s of arrivals a run, --fail-fast (a run that
# can no longer reach 90% good is cut once every request was sent), strategies in order of value:
#   h200x2-lowend  gpu_link.py (~40 s), H200 / H200-MPS25 profiles if profiles/ lacks them (~30 s, both GPUs at
#                  once), then cronus, pd-lp, hetis, dp, pp on h200-pair-lowend.yaml (GPU1 = MPS 25% + 24 GB):
#                  conv 32,48,64 (pd-lp 8,16,32; cronus 32,56,80), code 16,32,48 (pd-lp 4,8,16; cronus
#                  24,40,56)                                                        30 runs   est. ~540 s + ~70
#   h200x2         the H200 profile if missing, then pd-tp2, pd-lp, cronus, hetis, dp, pp on h200-pair.yaml:
#                  conv 24,48,72 (dp, cronus, pp 48,72,96), code 32,48,64 (pd-tp2 16,32,48)
#                                                                                   36 runs   est. ~640 s
# Rates bracket each strategy's limit in --sim-only between the H100 profiles standing in for the H200 and the
# H200 roofline (README "Two GPUs").
# (estimates by the H100 time model above, pessimistic for an H200 with --fail-fast). Neither fits its ~430 s of
# runs: the deadline skips the last strategies (recorded as skipped; the order is PD, Cronus, Hetis, then the DP
# and PP baselines), which a third call picks up (STRATS=..., or TRACE=code).
# Extra env vars: SPAN (s of arrivals per run), TRACE_RATES ("code=8,16"), FAIL_FAST (1/0), LINK (1: run
# gpu_link.py first). NVLink multicast is off in every plan (NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1,
# NVSHMEM_DISABLE_NVLS=1); two-GPU plans also set CUDA_DEVICE_ORDER=PCI_BUS_ID (CUDA ordinals = nvidia-smi's).
set -u
export PYTHONUNBUFFERED=1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"; export OUT
PLAN=${PLAN:-conv}
ALL=high-alone,low-alone,dp,pp,pd-lp,pd-hp,cronus
d_trace_rates=""; d_span=""; d_ff=""; d_link=0; d_gpus=1
case "$PLAN" in
  conv) d_trace=conv; d_strats=$ALL; d_rates=48,64,80; d_n=100; d_reps=1; d_cluster=""
        d_for="low-alone=6,9,12;pp=24,36,48;pd-lp=24,36,48;dp=48,64,80,96;cronus=24,36,48,64,80" ;;
  conv-repeats) d_trace=conv; d_strats=cronus,pd-lp,pd-hp,dp; d_rates=36,48; d_n=80; d_reps=3; d_cluster=""
        d_for="cronus=36,48,64;pd-lp=24,36;pd-hp=48,64" ;;
  code) d_trace=code; d_strats=$ALL; d_rates=16,32,48; d_n=80; d_reps=1; d_cluster=""
        d_for="low-alone=4,8,12;pd-lp=8,16,24" ;;
  starved) d_trace=conv; d_strats=hetis,dp,pp,pd-lp,pd-hp; d_rates=4,8,12; d_n=60; d_reps=1
        d_cluster=examples/clusters/emulated-h100-mps-pair-starved.yaml; d_for="" ;;
  h200x2-lowend) d_trace=conv,code; d_strats=cronus,pd-lp,hetis,dp,pp; d_rates=32,48,64; d_n=40; d_reps=1
        d_trace_rates="code=16,32,48"; d_span=6; d_ff=1; d_link=1; d_gpus=2
        d_for="conv:pd-lp=8,16,32;conv:cronus=32,56,80;code:pd-lp=4,8,16;code:cronus=24,40,56"
        d_cluster=examples/clusters/h200-pair-lowend.yaml ;;
  h200x2) d_trace=conv,code; d_strats=pd-tp2,pd-lp,cronus,hetis,dp,pp; d_rates=24,48,72; d_n=40; d_reps=1
        d_trace_rates="code=32,48,64"; d_for="conv:dp=48,72,96;conv:cronus=48,72,96;conv:pp=48,72,96;code:pd-tp2=16,32,48"
        d_span=6; d_ff=1; d_gpus=2; d_cluster=examples/clusters/h200-pair.yaml ;;
  *) echo "PLAN: conv | conv-repeats | code | starved | h200x2-lowend | h200x2 (got $PLAN)"; exit 2 ;;
esac
TRACE=${TRACE:-$d_trace}
STRATS=${STRATS:-$d_strats}
RATES=${RATES:-$d_rates}
RATES_FOR=${RATES_FOR-$d_for}
N=${N:-$d_n}
REPEATS=${REPEATS:-$d_reps}
CLUSTER=${CLUSTER:-${d_cluster:-examples/clusters/emulated-h100-mps-pair.yaml}}
if [ "$d_gpus" = 2 ]; then TAG=${TAG:-$PLAN-$(date -u +%m%d%H%M)}; else TAG=${TAG:-h100-mps-$PLAN-$(date -u +%m%d%H%M)}; fi
DEADLINE=${DEADLINE:-470}
HARD=${HARD:-560}
STOP_AFTER_FAIL=${STOP_AFTER_FAIL:-1}
TRACE_RATES=${TRACE_RATES-$d_trace_rates}
SPAN=${SPAN-$d_span}
FAIL_FAST=${FAIL_FAST-$d_ff}
LINK=${LINK-$d_link}
ARGS=(--trace "$TRACE" --strategies "$STRATS" --rates "$RATES" --rates-for "$RATES_FOR" --num-requests "$N"
      --repeats "$REPEATS" --cluster "$CLUSTER" --tag "$TAG" --stop-after-fail "$STOP_AFTER_FAIL")
[ -n "$TRACE_RATES" ] && ARGS+=(--trace-rates "$TRACE_RATES")
[ -n "$SPAN" ] && ARGS+=(--span-s "$SPAN")
[ "$FAIL_FAST" = 1 ] && ARGS+=(--fail-fast)
if [ "$d_gpus" = 2 ]; then
  export CUDA_DEVICE_ORDER=PCI_BUS_ID
  # the simulator's profiles: measured on this machine (below) when profiles/ lacks them
  P0=profiles/h200-llama-3.1-8b.json; P1=profiles/h200-mps25-llama-3.1-8b.json
  PROF=(H200="$P0")
  case "$CLUSTER" in *lowend*) PROF+=(H200-MPS25="$P1") ;; esac
fi
echo "plan $PLAN: ${ARGS[*]} --deadline-s $DEADLINE ${EXTRA:-}" | tee "$OUT/cluster.log"
python benchmarks/gpu_cluster.py "${ARGS[@]}" --estimate ${EXTRA:-} | tee -a "$OUT/cluster.log"
[ -n "${DRY:-}" ] && exit 0
if [ "$d_gpus" = 2 ]; then  # at most 8 files come back from $OUT: logs go into cluster.log
  { nvidia-smi --query-gpu=index,name,uuid,pci.bus_id,memory.used,memory.total --format=csv; nvidia-smi topo -m; } \
    2>&1 | tee -a "$OUT/cluster.log"
else
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee "$OUT/nvidia-smi.txt"
fi
T0=$(date +%s)
if [ "$d_gpus" = 2 ]; then
  mapfile -t UUIDS < <(nvidia-smi --query-gpu=uuid --format=csv,noheader)
  if [ "${#UUIDS[@]}" -lt 2 ]; then echo "plan $PLAN needs two GPUs; nvidia-smi lists ${#UUIDS[@]}"; exit 2; fi
  if [ "$LINK" = 1 ]; then
    timeout -k 5 150 python benchmarks/gpu_link.py --budget-s 90 2>&1 | tee -a "$OUT/cluster.log" | tail -14
    # the low-end pair's workers (whole GPU0, MPS client on GPU1) could not share CUDA memory: stage KV via the host
    if [ "${#PROF[@]}" = 2 ] && python -c 'import json, sys; m = json.load(open(sys.argv[1]))["methods"]
sys.exit(0 if any("error" in m.get(k, {}) for k in ("ipc_mps", "shm_mps")) else 1)' "$OUT/gpu-link-h200x2.json" \
      2>/dev/null; then
      export HETSERVE_KV_HOST_STAGING=1
      echo "gpu_link: CUDA IPC with GPU1's MPS client failed: KV hand-offs go through host memory" \
        | tee -a "$OUT/cluster.log"
    fi
  fi
  pids=(); rm -f /tmp/profile-h200*.log
  if [ ! -f "$P0" ]; then
    CUDA_VISIBLE_DEVICES=${UUIDS[0]} timeout -k 5 150 python -m hetserve.cli.main profile \
      --model examples/models/llama-3.1-8b --device cuda --layers 2 --device-name H200 --output "$P0" \
      > /tmp/profile-h200.log 2>&1 & pids+=($!)
  fi
  if [ "${#PROF[@]}" = 2 ] && [ ! -f "$P1" ]; then  # GPU1 as the MPS client it is in the cluster file
    CUDA_VISIBLE_DEVICES=${UUIDS[1]} timeout -k 5 150 python -m hetserve.cli.main profile \
      --model examples/models/llama-3.1-8b --device cuda --layers 2 --partition mps:25,mem:24 \
      --device-name H200-MPS25 --output "$P1" > /tmp/profile-h200-mps25.log 2>&1 & pids+=($!)
  fi
  for p in "${pids[@]}"; do wait "$p"; done
  for f in /tmp/profile-h200*.log; do [ -f "$f" ] && { echo "== $f"; tail -8 "$f"; } | tee -a "$OUT/cluster.log"; done
  mkdir -p "$OUT/profiles"; for f in "$P0" "$P1"; do [ -f "$f" ] && cp "$f" "$OUT/profiles/"; done
  if [ -f "$P0" ] && { [ "${#PROF[@]}" = 1 ] || [ -f "$P1" ]; }; then
    ARGS+=(--profiles "$(IFS=,; echo "${PROF[*]}")")
  else  # no profile measured: the H100's stand in (H200 bandwidth is ~1.4x: predictions pessimistic; re-simulate)
    echo "profiles missing: the simulator uses the H100 profiles as stand-ins" | tee -a "$OUT/cluster.log"
    ARGS+=(--profiles "H200=profiles/h100-sxm-llama-3.1-8b.json,H200-MPS25=profiles/h100-mps25-llama-3.1-8b.json")
  fi
fi
if [ -n "${SMOKE:-}" ]; then
  SMOKE_ARGS=(); [ "$d_gpus" = 2 ] && SMOKE_ARGS=(--cluster "$CLUSTER")
  timeout 240 python benchmarks/gpu_cluster.py --layers 2 --num-requests 6 --rates 8 --max-input 256 \
    --max-output 16 --strategies "$SMOKE" --tag smoke --deadline-s 200 "${SMOKE_ARGS[@]}" 2>&1 | tail -40 \
    | tee "$OUT/smoke.log"
fi
LEFT=$((HARD - $(date +%s) + T0))
DL=$((DEADLINE < LEFT - 60 ? DEADLINE : LEFT - 60))
timeout -k 10 "$LEFT" python benchmarks/gpu_cluster.py "${ARGS[@]}" --deadline-s "$DL" ${EXTRA:-} 2>&1 \
  | tee -a "$OUT/cluster.log" | grep -v "^\s*$" | tail -60
echo "exit ${PIPESTATUS[0]} after $(($(date +%s) - T0)) s"
