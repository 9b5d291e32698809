#!/usr/bin/env bash
# The issue's GPU race, for one call on the lent GPU machine (no Rust, no network there): pfx on ONNX Runtime
# CUDA against PyTorch + PEFT (eager and torch.compile), gpt2-medium and gpt2, B=5 and B=32, T=128, TF32 and
# fp32, then ms per generated token against HF generate. Not run on a GPU yet: no session so far was lent one.
#
# First the GPU correctness tests (runtime/tests/gpu_ort.rs), then the cases, most important first (the goal cases:
# gpt2-medium B=5 and B=32 in TF32 against torch.compile, then generation). No new case starts after BUDGET_S
# seconds (default 300, counted from the start, tests included), so a call that a device's time limit cuts short
# still brings back the cases that matter. Every case writes its own file under $OUT (the device call's
# output folder) and appends its table to $OUT/summary.md.
#
# Here, before the device calls, one command builds and packs everything (binaries, peers, skeleton graphs, ORT's
# CUDA libraries in parts) and prints the calls:
#   bash benches/gpu_prepare.sh
# Every call also carries the working tree (~36 MiB of its 64 MiB), so each carries one ORT part or some binaries:
# gpu_prepare.sh prints the calls, e.g. binary calls (when the tree leaves too little room for them beside
# gpu-carry/: each unpacks its .gz files into /tmp/pfx-gpu-bin), part calls (each
# `mkdir -p /tmp/ortgpu && cp .gpu/ortgpu.partNN /tmp/ortgpu/`), then one carrying gpu-carry/ (timeout_s 600) that runs
#   (cd /tmp/ortgpu && cat ortgpu.part* | xz -d -T0 | tar xf -) && bash benches/gpu_train_step.sh
# back to back: the machine is taken back after ~30 s idle (../shared/tools/gpu/README.md).
# The results come back under $OUT (summary.md first). BUDGET_S (default 300) bounds when the last case starts.
#
# Dry run on this machine's CPU (checks the script, the binaries and the peer's arguments; numbers meaningless):
#   DEVICE=cpu SIZES=tiny PEER=/work/shared/tools/gpu/peft_step.py PFX_PEFT_PYTHON=/root/.cache/pfx/ref/bin/python \
#     PYTHON=/root/.cache/pfx/ref/bin/python OUT=/tmp/gpu-dry bash benches/gpu_train_step.sh
set -euo pipefail
cd "$(dirname "$0")/.."
# The binaries travel gzipped (stripped, ~34 MB each; ~10 MB compressed) and are unpacked outside gpu-carry/, so
# that a dry run here leaves the folder as small as it must be to be carried.
BIN_DIR=${BIN_DIR:-/tmp/pfx-gpu-bin}
mkdir -p "$BIN_DIR"
for packed in gpu-carry/*.gz; do
  if [ -e "$packed" ]; then
    gunzip -c "$packed" >"$BIN_DIR/$(basename "${packed%.gz}")" && chmod +x "$BIN_DIR/$(basename "${packed%.gz}")"
  fi
done
BIN=${BIN:-$BIN_DIR/train_step}
GEN_BIN=${GEN_BIN:-$BIN_DIR/generate_tokens}
PEER=${PEER:-gpu-carry/peft_step.py}
[ -f "$PEER" ] || { echo "gpu_train_step: no peer at $PEER (copy peft_step.py into gpu-carry/ or set PEER)"; exit 2; }
DEVICE=${DEVICE:-cuda}
SIZES=${SIZES:-gpt2-medium gpt2}
BUDGET_S=${BUDGET_S:-300}
PYTHON=${PYTHON:-python3}
if [ "$DEVICE" != cpu ]; then
  export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$(ls /tmp/ortgpu/libonnxruntime.so.* | head -1)}
  export LD_LIBRARY_PATH=/tmp/ortgpu:/usr/local/cuda-13/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
fi
export PFX_PEFT_STEP=$PEER PFX_PEFT_PYTHON=${PFX_PEFT_PYTHON:-python3}
# GPU timings are steady: one round of 10 steps per engine and case.
export PFX_BENCH_DEVICE=$DEVICE PFX_BENCH_ROUNDS=${ROUNDS:-1} PFX_BENCH_SEQ=128
export PFX_BENCH_WARMUP=3 PFX_BENCH_STEPS=10
OUT=${OUT:-$PWD/gpu-results}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
START=$SECONDS
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
fi

# True while a new case may start.
in_budget() {
  if [ $((SECONDS - START)) -ge "$BUDGET_S" ]; then
    echo "== budget of ${BUDGET_S}s spent; the cases after this one were not run" | tee -a "$SUMMARY"
    return 1
  fi
}

export_model() { # size: the skeleton made here, given random weights there (benches/gpt2_skeleton.py), or else
  # exported there (~12 s for gpt2-medium; its torch and transformers may export a graph never compiled here)
  [ -f "/tmp/pfx-bench/$1/model.onnx" ] && return 0
  if [ -f "gpu-carry/$1.skeleton.onnx" ]; then
    "$PYTHON" benches/gpt2_skeleton.py fill "gpu-carry/$1.skeleton.onnx" "/tmp/pfx-bench/$1" >"$OUT/export-$1.txt" 2>&1 &&
      return 0
    echo "== filling the $1 skeleton failed (export-$1.txt); exporting there instead" | tee -a "$SUMMARY"
  fi
  "$PYTHON" benches/make_gpt2_export.py --size "$1" --no-check "/tmp/pfx-bench/$1" >"$OUT/export-$1.txt" 2>&1 && return 0
  echo "== exporting $1 failed (export-$1.txt):" | tee -a "$SUMMARY"
  tail -5 "$OUT/export-$1.txt" | tee -a "$SUMMARY"
  return 1
}

# train SIZE BATCH TF32(on|off) PEER_COMPILE(0|1): pfx on ORT, pfx on ORT replaying a CUDA graph, and the peer.
train() {
  in_budget || return 1
  local tag="$1-b$2-tf32$3-compile$4" bundle="/tmp/pfx-bench/bundle-$1-b$2"
  echo "== $tag ($((SECONDS - START)) s)" | tee -a "$SUMMARY"
  local env=(PFX_BENCH_MODEL="/tmp/pfx-bench/$1/model.onnx" PFX_BENCH_BUNDLE="$bundle" PFX_BENCH_BATCH="$2"
    PFX_BENCH_TF32="$3" PFX_BENCH_PEER_COMPILE="$4")
  env "${env[@]}" PFX_BENCH_ENGINES=ort,peft "$BIN" --bench >"$OUT/$tag.txt" 2>&1 || echo "(exit $?)" >>"$OUT/$tag.txt"
  grep -E '^\|' "$OUT/$tag.txt" | tee -a "$SUMMARY" || tail -5 "$OUT/$tag.txt" | tee -a "$SUMMARY"
  if [ "$DEVICE" != cpu ]; then
    env "${env[@]}" PFX_BENCH_ENGINES=ort PFX_BENCH_CUDA_GRAPH=1 "$BIN" --bench >"$OUT/$tag-cudagraph.txt" 2>&1 ||
      echo "(exit $?)" >>"$OUT/$tag-cudagraph.txt"
    grep -E '^\| pfx' "$OUT/$tag-cudagraph.txt" | sed 's/^| pfx-ort /| pfx-ort + CUDA graph /' | tee -a "$SUMMARY" ||
      tail -5 "$OUT/$tag-cudagraph.txt" | tee -a "$SUMMARY"
  fi
}

# generate SIZE: ms per token (prompt 32, 64 new; greedy B=1, B=8, beam 5), with and without CUDA graphs.
generate() {
  local graphs="0"
  [ "$DEVICE" != cpu ] && graphs="1 0"
  for graph in $graphs; do
    in_budget || return 1
    echo "== generate $1 cuda-graph $graph ($((SECONDS - START)) s)" | tee -a "$SUMMARY"
    PFX_BENCH_MODEL="/tmp/pfx-bench/$1/model.onnx" PFX_BENCH_CUDA_GRAPH=$graph PFX_BENCH_RUNS=3 "$GEN_BIN" --bench \
      >"$OUT/generate-$1-cudagraph$graph.txt" 2>&1 || echo "(exit $?)" >>"$OUT/generate-$1-cudagraph$graph.txt"
    grep -E '^\|' "$OUT/generate-$1-cudagraph$graph.txt" | tee -a "$SUMMARY" || true
  done
}

peer_generate() { # HF generate with the PEFT prefix in its cache, same machine, same call
  in_budget || return 1
  echo "== peft_generate ($((SECONDS - START)) s)" | tee -a "$SUMMARY"
  OUT="$OUT" "$PYTHON" "$(dirname "$PEER")/peft_generate.py" >"$OUT/peft_generate.txt" 2>&1 || true
  tail -8 "$OUT/peft_generate.txt" | tee -a "$SUMMARY"
}

# The GPU correctness tests (`runtime/tests/gpu_ort.rs`: device state on CUDA, CUDA graphs, TensorRT where its
# libraries exist, each against ORT CPU; generation with the caches kept on the device, with and without CUDA
# graphs, against PEFT's tokens) before any timing: a failure there makes the timings moot.
gpu_tests() {
  [ "$DEVICE" != cpu ] && [ -x "$BIN_DIR/gpu_ort" ] || return 0
  echo "== gpu_ort tests ($((SECONDS - START)) s)" | tee -a "$SUMMARY"
  PFX_REPO_ROOT=$PWD PFX_GPU_TESTS=1 timeout 180 "$BIN_DIR/gpu_ort" --test-threads 1 --nocapture >"$OUT/gpu_ort.txt" 2>&1 ||
    echo "(exit $?)" >>"$OUT/gpu_ort.txt"
  grep -E "^test |test result|skipping|panicked|exit" "$OUT/gpu_ort.txt" | tee -a "$SUMMARY" || true
}

run_all() {
  local first=${SIZES%% *}
  gpu_tests
  export_model "$first" || return 0
  # The goal cases first: the largest model, TF32, against torch.compile and eager.
  train "$first" 5 on 1 || return 0
  train "$first" 32 on 1 || return 0
  generate "$first" || return 0
  if [ "$DEVICE" != cpu ]; then peer_generate || return 0; fi
  train "$first" 5 on 0 || return 0
  train "$first" 32 on 0 || return 0
  train "$first" 5 off 0 || return 0
  for size in ${SIZES#"$first"}; do
    export_model "$size" || return 0
    train "$size" 5 on 1 || return 0
    train "$size" 32 on 1 || return 0
    generate "$size" || return 0
  done
}
run_all
echo "== done in $((SECONDS - START)) s" | tee -a "$SUMMARY"
