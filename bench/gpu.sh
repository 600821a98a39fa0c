#!/usr/bin/env bash
# The one prepared device run (issue #20): on the lent GPU machine, from the repository root, with the
# carried folders .whl (pydantic and its needs, which the GPU image lacks) and .bench (a copy of
# ../shared/bench/reference_step.py), both made by `bash bench/gpu-prepare.sh` (its --check runs this script on
# CPU as the device will). Writes every result as JSON under $OUT; logs to $OUT/log.txt.
#   device: run(command="bash bench/gpu.sh", carry=[".whl", ".bench"], timeout_s=540)
#   on CPU, to check the script itself: OUT=/tmp/o SPEC=specs/tiny.yaml STEPS=2 bash bench/gpu.sh
set -uo pipefail
OUT=${OUT:?set OUT}
SPEC=${SPEC:-specs/palm-1b-gpu.yaml}
STEPS=${STEPS:-20}
REF=${REF:-.bench/reference_step.py}
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1 && ! python3 -c "import pydantic" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-} || exit 1
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
PY=${PY:-python3}
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null; $PY -c "import jax; print(jax.__version__, jax.devices())"; } >> "$OUT/log.txt" 2>&1  # at most 8 files come back from the device
run() {  # name, then palm arguments; one JSON per run, failures logged and the next run still made
  local name=$1; shift
  echo "== $name: palm $*" >> "$OUT/log.txt"
  timeout "${RUN_TIMEOUT:-240}" $PY -m palm.cli "$@" --json > "$OUT/$name.json" 2>> "$OUT/log.txt" \
    || echo "!! $name exited $?" >> "$OUT/log.txt"
}
REFARG=(); [ -f "$REF" ] && REFARG=(--reference "$REF")
# The acceptance command first (the spec's own settings: save_dots remat, the loss in one slice), profiled;
# then the variants worth comparing. At most 8 files come back: log.txt, trace.json.gz and 6 JSON.
run train bench train "$SPEC" --steps "$STEPS" "${REFARG[@]}" --profile /tmp/prof-a
cp "$(find /tmp/prof-a -name perfetto_trace.json.gz | head -1)" "$OUT/trace.json.gz" 2>/dev/null
run decode bench decode "$SPEC" --batches 1,64
run train-remat-full bench train "$SPEC" --steps "$STEPS" --set model.remat=full
run train-chunk4096 bench train "$SPEC" --steps "$STEPS" --set train.loss_chunk_mib=4096
echo done >> "$OUT/log.txt"
