#!/usr/bin/env bash
# Issue 6 on one GPU: a fresh profile, this machine's sustained-speed calibration, then online fidelity runs of
# both Azure traces over several request draws, all in one call (one machine). Results: $OUT/fidelity-cal.tgz
# (the device tool returns at most 8 files) holding profile.json, fid-<trace>-<seed>.json,
# profile-calibrated-{first,last}.json, fid-cal-last.json
#   bash benchmarks/gpu_fidelity_cal.sh "0 1 2"     # seeds
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SEEDS=${1:-"0 1 2"}
RATES=${RATES:-12,18}
N=${N:-240}
PY=${PY:-python}
run() { PYTHONUNBUFFERED=1 "$PY" "$@"; }
t0=$(date +%s)
run -c "import sys; from hetserve.cli.main import main; sys.exit(main())" profile --model examples/models/llama-3.1-8b \
  --device cuda --dtype auto --layers 2 --attention-backend auto --seed 0 --output "$OUT/profile.json" \
  --device-name H100-SXM || exit 1
echo "profile done at $(( $(date +%s) - t0 )) s"
first=1
for seed in $SEEDS; do
  for trace in conv code; do
    cal=""; [ $first = 1 ] && cal="--calibrate"
    run benchmarks/gpu_online_fidelity.py --trace $trace --seed $seed --rates $RATES --num-requests $N \
      --profile "$OUT/profile.json" $cal || break 2
    mv "$OUT/gpu-online-fidelity.json" "$OUT/fid-$trace-$seed.json"
    [ $first = 1 ] && mv "$OUT/profile-calibrated.json" "$OUT/profile-calibrated-first.json"
    first=0
    echo "$trace seed $seed done at $(( $(date +%s) - t0 )) s"
  done
done
# the calibration again at the end: how much the machine's sustained speed drifts within a call
run benchmarks/gpu_online_fidelity.py --trace conv --seed 0 --rates 18 --num-requests 40 --profile "$OUT/profile.json" \
  --calibrate && mv "$OUT/profile-calibrated.json" "$OUT/profile-calibrated-last.json" \
  && mv "$OUT/gpu-online-fidelity.json" "$OUT/fid-cal-last.json"
echo "all done at $(( $(date +%s) - t0 )) s"
(cd "$OUT" && tar czf fidelity-cal.tgz profile*.json fid-*.json && rm -f profile*.json fid-*.json)
