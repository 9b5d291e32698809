#!/usr/bin/env bash
# Where pfx's training step spends its time on the GPU, for the last call of a GPU session (after
# `PEERS=0 bash benches/gpu_train_step.sh stage` staged the binaries and models, and ORT's libraries are in
# /tmp/ortgpu): the gpt2-medium step timed with and without a CUDA graph, then
#   - ORT's own per-node profile of that step with CUDA_LAUNCH_BLOCKING=1 (each node's time is then its GPU
#     time plus one launch), written as $OUT/ortprof.json.gz (and $OUT/ortprof-async.json.gz without blocking:
#     each node's launch cost): `python3 benches/gpu_profile_report.py` sums them;
#   - Nsight Compute's per-kernel GPU times of one gpt2 (small) step, $OUT/ncu.csv.gz (when ncu is there).
# Printed last: the timing rows. Everything else comes back in $OUT/logs.tgz.
set -euo pipefail
cd "$(dirname "$0")/.."
STAGE=${STAGE:-/tmp/pfx-gpu}
LOGS=$STAGE/logs
BIN=$STAGE/bin/train_step
OUT=${OUT:-$PWD/gpu-results}
mkdir -p "$OUT" "$LOGS"
DEVICE=${DEVICE:-cuda}
BIG=${BIG:-gpt2-medium}
SMALL=${SMALL:-gpt2} # dry run on the CPU: DEVICE=cpu BIG=tiny SMALL=tiny STAGE=... OUT=...
if [ "$DEVICE" != cpu ]; then
  export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$(ls /tmp/ortgpu/libonnxruntime.so.* | head -1)}
  export LD_LIBRARY_PATH=/tmp/ortgpu:/usr/local/cuda-13/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
fi
export PFX_BENCH_DEVICE=$DEVICE PFX_BENCH_ROUNDS=1 PFX_BENCH_SEQ=128 PFX_BENCH_WARMUP=3 PFX_BENCH_STEPS=10
export PFX_BENCH_ENGINES=ort PFX_BENCH_TF32=on RUST_BACKTRACE=0
START=$SECONDS
pack_logs() { tar czf "$OUT/logs.tgz.tmp" -C "$LOGS" . && mv "$OUT/logs.tgz.tmp" "$OUT/logs.tgz"; }

# time SIZE BATCH GRAPH: the bench's median step (compiles the bundle the first time).
time_step() {
  local log="$LOGS/ort-$1-b$2-tf32on-graph$3.txt"
  PFX_BENCH_MODEL="/tmp/pfx-bench/$1/model.onnx" PFX_BENCH_BUNDLE="/tmp/pfx-bench/bundle-$1-b$2" PFX_BENCH_BATCH=$2 \
    PFX_BENCH_CUDA_GRAPH=$3 "$BIN" --bench >"$log" 2>&1 || echo "(exit $?)" >>"$log"
  echo "$1 B=$2 graph=$3 ($((SECONDS - START)) s): $(grep -E '^\| pfx-ort|FAILED|^ +[0-9]: |exit' "$log" | head -4)"
  pack_logs
}
time_step "$BIG" 5 0
time_step "$BIG" 5 1
time_step "$BIG" 32 1
time_step "$SMALL" 5 0

# ort_profile NAME BLOCKING: one engine process, as the bench's child runs it (1 warm-up, 2 timed steps), with
# ORT's profiler on; blocking launches (1) make each node's time its GPU time, async ones (0) its launch cost.
ort_profile() {
  echo "== ORT profile $1, $BIG B=5, CUDA_LAUNCH_BLOCKING=$2 ($((SECONDS - START)) s)"
  rm -f "$LOGS/$1"*.json
  (PFX_BENCH_BATCH=5 CUDA_LAUNCH_BLOCKING=$2 PFX_ORT_PROFILE="$LOGS/$1" timeout 120 "$BIN" --engine ort \
    --bundle "/tmp/pfx-bench/bundle-$BIG-b5" --warmup 1 --steps 2 --threads 2 >"$LOGS/$1.txt" 2>&1) ||
    echo "(exit $?)" >>"$LOGS/$1.txt"
  tail -2 "$LOGS/$1.txt"
  local prof
  prof=$(ls -S "$LOGS/$1"*.json 2>/dev/null | head -1 || true)
  if [ -n "$prof" ]; then gzip -c "$prof" >"$OUT/$1.json.gz" && ls -l "$OUT/$1.json.gz"; fi
  rm -f "$LOGS/$1"*.json
  pack_logs
}
ort_profile ortprof 1
ort_profile ortprof-async 0

NCU=$(command -v ncu || ls /usr/local/cuda*/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1 || true)
if [ -n "$NCU" ]; then
  echo "== ncu, $SMALL B=5, one warm-up and one step ($((SECONDS - START)) s): $NCU"
  (PFX_BENCH_BATCH=5 timeout "${NCU_S:-100}" "$NCU" --clock-control none --metrics gpu__time_duration.sum --csv \
    --log-file "$LOGS/ncu.csv" "$BIN" --engine ort --bundle "/tmp/pfx-bench/bundle-$SMALL-b5" --warmup 1 --steps 1 \
    --threads 2 >"$LOGS/ncu.txt" 2>&1) || echo "(exit $?)" >>"$LOGS/ncu.txt"
  tail -3 "$LOGS/ncu.txt"
  [ -s "$LOGS/ncu.csv" ] && gzip -c "$LOGS/ncu.csv" >"$OUT/ncu.csv.gz" && rm "$LOGS/ncu.csv" && ls -l "$OUT/ncu.csv.gz"
else
  echo "== no ncu on this machine"
fi
pack_logs
echo "== done in $((SECONDS - START)) s"
