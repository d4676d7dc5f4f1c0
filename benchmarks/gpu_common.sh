# Sourced by gpu_kv_stream.sh and gpu_nixl.sh after they set LOG_NAME: $OUT, $ROOT, $TREE (the tree to measure,
# .clean), $PY, PYTHONPATH, everything printed also going to $OUT/$LOG_NAME, el (a message with the seconds so
# far), the carried wheels (.whl: msgspec, pyzmq; .whl-nixl: nixl) installed into /tmp/site where one is missing,
# and the GPU named.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
ROOT=${ROOT:-$PWD}
TREE=${TREE:-$ROOT/.clean}
PY=${PY:-python}
export PYTHONPATH=/tmp/site:$TREE PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/$LOG_NAME") 2>&1
t0=$(date +%s)
el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }

if ! "$PY" -c "import nixl._api, zmq, msgspec" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    "$ROOT"/.whl/*.whl "$ROOT"/.whl-nixl/*.whl || el "pip install failed"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
