#!/usr/bin/env bash
# The issue's GPU race on the lent GPU machine (no Rust, no network there): pfx on ONNX Runtime CUDA against
# PyTorch + PEFT (eager and torch.compile), gpt2-medium and gpt2, B=5 and B=32, T=128, TF32 and fp32, then ms per
# generated token against HF generate.
#
# Device time is the scarce thing (15 minutes a session, machine start and transfers included), and ONNX
# Runtime's CUDA libraries take several calls to carry. So the work is in two halves:
#   stage  (the first call, which carries gpu-carry/ and the first ORT part): copies what the run needs to
#          $STAGE (/tmp/pfx-gpu), then starts, in a session of its own that outlives the call, the half that needs
#          no ORT: unpack the binaries, give the skeleton graphs random weights, and time the peers
#          (peft_step.py, peft_generate.py) while the next calls carry the rest of ORT.
#   run    (the last call, once ORT is there): waits for the peers to finish (PEER_WAIT_S, default 120; those still
#          running then are stopped, so that nothing shares the GPU with pfx's timings), runs the GPU correctness
#          tests (runtime/tests/gpu_ort.rs), then pfx's cases, most important first (the goal cases: gpt2-medium
#          B=5 and B=32 in TF32, then generation). No new case starts after BUDGET_S seconds (default 300).
# The summary (peers and pfx side by side, with ratios) goes to $OUT/summary.md and stdout; every log, packed after
# each case, to $OUT/logs.tgz (a call brings back at most 8 files).
#
# Here, one command builds and packs everything and prints the device calls:
#   bash benches/gpu_prepare.sh
#
# Dry run on this machine's CPU (checks the script, the binaries and the peers' arguments; numbers meaningless),
# from a tree where gpu_prepare.sh ran:
#   export DEVICE=cpu SIZES=tiny STAGE=/tmp/pfx-gpu-dry PYTHON=/root/.cache/pfx/ref/bin/python OUT=/tmp/gpu-dry
#   bash benches/gpu_train_step.sh stage && bash benches/gpu_train_step.sh run
set -euo pipefail
cd "$(dirname "$0")/.."
MODE=${1:-run}
STAGE=${STAGE:-/tmp/pfx-gpu}
LOGS=$STAGE/logs
BIN_DIR=$STAGE/bin
DEVICE=${DEVICE:-cuda}
SIZES=${SIZES:-gpt2-medium gpt2}
FIRST=${SIZES%% *}
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$LOGS" "$BIN_DIR"

# The peers' cases, most important first: size batch precision(tf32|fp32) mode(compile|eager).
peer_cases() {
  [ "${PEERS:-1}" = 0 ] && return # PEERS=0: no peers (a run whose peers were timed by an earlier call)
  if [ -n "${PEER_CASES:-}" ]; then # the cases a later run still lacks, e.g. "gpt2-medium 5 tf32 eager;generate"
    tr ';' '\n' <<<"$PEER_CASES"
    return
  fi
  if [ "$DEVICE" = cpu ]; then
    echo "$FIRST 5 fp32 eager"
    return
  fi
  # The goals: B=5 against torch.compile, B=32 against PEFT, generation against HF generate.
  printf '%s\n' "$FIRST 5 tf32 compile" "$FIRST 32 tf32 eager" generate "$FIRST 5 tf32 eager" \
    "$FIRST 32 tf32 compile" "$FIRST 5 fp32 eager"
  for size in ${SIZES#"$FIRST"}; do printf '%s\n' "$size 5 tf32 compile" "$size 32 tf32 compile"; done
}

# The half without ORT, in the background: binaries, models, then the peers one after another (alone on the GPU).
stage_work() {
  for packed in gpu-carry/*.gz; do
    [ -e "$packed" ] || continue
    gunzip -c "$packed" >"$BIN_DIR/$(basename "${packed%.gz}")" && chmod +x "$BIN_DIR/$(basename "${packed%.gz}")"
  done
  echo "binaries: $(ls "$BIN_DIR" | tr '\n' ' ')"
  for size in $SIZES; do # the skeletons made here, given random weights there (benches/gpt2_skeleton.py)
    [ -f "/tmp/pfx-bench/$size/model.onnx" ] && continue
    "$PYTHON" benches/gpt2_skeleton.py fill "gpu-carry/$size.skeleton.onnx" "/tmp/pfx-bench/$size" \
      >"$LOGS/fill-$size.txt" 2>&1 || echo "filling $size failed: fill-$size.txt"
  done &
  local fill=$!
  while read -r size batch precision mode; do
    local start=$SECONDS
    if [ "$size" = generate ]; then
      OUT="$LOGS" "$PYTHON" gpu-carry/peft_generate.py >"$LOGS/peer-generate.txt" 2>&1 || echo "(exit $?)" >>"$LOGS/peer-generate.txt"
    else
      local args=(--size "$size" --batch "$batch" --seq 128 --prefix-len 10 --mid-dim 512 --device "$DEVICE"
        --precision "$precision" --steps 20 --warmup 3)
      [ "$mode" = compile ] && args+=(--compile)
      "$PYTHON" gpu-carry/peft_step.py "${args[@]}" >"$LOGS/peer-$size-b$batch-$precision-$mode.txt" 2>&1 ||
        echo "(exit $?)" >>"$LOGS/peer-$size-b$batch-$precision-$mode.txt"
    fi
    echo "peer $size $batch $precision $mode: $((SECONDS - start)) s"
  done < <(peer_cases)
  wait "$fill"
  touch "$STAGE/peers.done"
}

if [ "$MODE" = stage ]; then
  # Run from a copy, so that the next calls' fresh copies of the working tree cannot change a script being read.
  rm -rf "$STAGE/tree" "$STAGE/peers.done"
  mkdir -p "$STAGE/tree"
  cp -r benches gpu-carry "$STAGE/tree/"
  cd "$STAGE/tree"
  STAGE=$STAGE DEVICE=$DEVICE SIZES=$SIZES PYTHON=$PYTHON PEERS=${PEERS:-1} PEER_CASES=${PEER_CASES:-} setsid bash benches/gpu_train_step.sh stage-work \
    >"$LOGS/stage.txt" 2>&1 </dev/null &
  echo "gpu_train_step: staging in the background (log: $LOGS/stage.txt)"
  exit 0
fi
if [ "$MODE" = stage-work ]; then
  echo $$ >"$STAGE/stage.pid"
  stage_work
  exit 0
fi
[ "$MODE" = run ] || { echo "usage: gpu_train_step.sh stage|run" >&2; exit 2; }

# ---- run: pfx's half, once ORT's libraries are there ----
BUDGET_S=${BUDGET_S:-300}
PEER_WAIT_S=${PEER_WAIT_S:-120}
OUT=${OUT:-$PWD/gpu-results}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.md"
: >"$SUMMARY"
START=$SECONDS
if [ "$DEVICE" != cpu ]; then
  export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$(ls /tmp/ortgpu/libonnxruntime.so.* | head -1)}
  export LD_LIBRARY_PATH=/tmp/ortgpu:/usr/local/cuda-13/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
fi
# GPU timings are steady: one round of 10 steps per engine and case.
export PFX_BENCH_DEVICE=$DEVICE PFX_BENCH_ROUNDS=${ROUNDS:-1} PFX_BENCH_SEQ=128
export PFX_BENCH_WARMUP=3 PFX_BENCH_STEPS=10 PFX_BENCH_ENGINES=ort
export RUST_BACKTRACE=0 # errors as their chains of causes, not stack frames

pack_logs() { tar czf "$OUT/logs.tgz.tmp" -C "$LOGS" . && mv "$OUT/logs.tgz.tmp" "$OUT/logs.tgz"; }
say() { echo "$*" | tee -a "$SUMMARY"; }

waited=0
while [ ! -e "$STAGE/peers.done" ] && [ "$waited" -lt "$PEER_WAIT_S" ]; do
  sleep 2
  waited=$((waited + 2))
done
if [ ! -e "$STAGE/peers.done" ]; then
  say "== peers still running after ${PEER_WAIT_S}s: stopped (their cases below are missing)"
  [ -s "$STAGE/stage.pid" ] && kill -- -"$(cat "$STAGE/stage.pid")" 2>/dev/null || true
  sleep 2
fi
say "== staging log"
tee -a "$SUMMARY" <"$LOGS/stage.txt" || true
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$LOGS/gpu.txt" | tee -a "$SUMMARY"
fi
pack_logs

# True while a new case may start.
in_budget() {
  pack_logs
  if [ $((SECONDS - START)) -ge "$BUDGET_S" ]; then
    say "== budget of ${BUDGET_S}s spent; the cases after this one were not run"
    return 1
  fi
}

# The GPU correctness tests (device state on CUDA, CUDA graphs, TensorRT where its libraries exist, each against
# ORT CPU; generation with the caches on the device against PEFT's tokens): a failure there makes the timings moot.
gpu_tests() {
  [ "$DEVICE" != cpu ] && [ -x "$BIN_DIR/gpu_ort" ] || return 0
  # onnxruntime-gpu lists TensorRT among its providers whether or not TensorRT's own libraries are there.
  local TEST_SKIP=""
  ldconfig -p | grep -q libnvinfer || { TEST_SKIP="--skip tensorrt"; say "(no libnvinfer here: the TensorRT test is skipped)"; }
  say "== gpu_ort tests ($((SECONDS - START)) s)"
  PFX_REPO_ROOT=$PWD PFX_GPU_TESTS=1 timeout 120 "$BIN_DIR/gpu_ort" --test-threads 1 --nocapture $TEST_SKIP >"$LOGS/gpu_ort.txt" 2>&1 ||
    echo "(exit $?)" >>"$LOGS/gpu_ort.txt"
  grep -E "^test |test result|skipping|panicked|exit|Caused|^ +[0-9]: " "$LOGS/gpu_ort.txt" | head -40 | tee -a "$SUMMARY" || true
}

# train SIZE BATCH TF32(on|off): pfx on ORT, then on ORT replaying a CUDA graph.
train() {
  in_budget || return 1
  local tag="$1-b$2-tf32$3" bundle="/tmp/pfx-bench/bundle-$1-b$2"
  say "== train $tag ($((SECONDS - START)) s)"
  local env=(PFX_BENCH_MODEL="/tmp/pfx-bench/$1/model.onnx" PFX_BENCH_BUNDLE="$bundle" PFX_BENCH_BATCH="$2"
    PFX_BENCH_TF32="$3")
  local graphs="0"
  [ "$DEVICE" != cpu ] && graphs="0 1"
  for graph in $graphs; do
    env "${env[@]}" PFX_BENCH_CUDA_GRAPH=$graph "$BIN_DIR/train_step" --bench >"$LOGS/ort-$tag-graph$graph.txt" 2>&1 ||
      echo "(exit $?)" >>"$LOGS/ort-$tag-graph$graph.txt"
    grep -E '^\| pfx|FAILED|exit|^Error|^ +[0-9]: ' "$LOGS/ort-$tag-graph$graph.txt" | head -12 |
      sed "s/^| pfx-ort /| pfx-ort graph=$graph /" |
      tee -a "$SUMMARY" || tail -5 "$LOGS/ort-$tag-graph$graph.txt" | tee -a "$SUMMARY"
  done
}

# generate SIZE GRAPH [WEIGHTS]: ms per token (prompt 32, 64 new; greedy B=1, B=8, beam 5).
generate() {
  in_budget || return 1
  local tag="$1-graph$2-${3:-f32}"
  say "== generate $tag ($((SECONDS - START)) s)"
  PFX_BENCH_MODEL="/tmp/pfx-bench/$1/model.onnx" PFX_BENCH_CUDA_GRAPH=$2 PFX_BENCH_WEIGHTS=${3:-f32} PFX_BENCH_RUNS=3 \
    "$BIN_DIR/generate_tokens" --bench >"$LOGS/generate-$tag.txt" 2>&1 || echo "(exit $?)" >>"$LOGS/generate-$tag.txt"
  grep -E '^\||exit|^Error|^ +[0-9]: ' "$LOGS/generate-$tag.txt" | head -16 | tee -a "$SUMMARY" || true
}

# pfx against the peers, one line per training case that has both (ms per step; ratio = peer's time / pfx's).
table() {
  "$PYTHON" - "$LOGS" <<'PY' | tee -a "$SUMMARY"
import glob, json, os, re, sys
logs = sys.argv[1]
def peer(size, b, prec, mode):
    try:
        lines = [l for l in open(f"{logs}/peer-{size}-b{b}-{prec}-{mode}.txt") if l.startswith("{")]
        return json.loads(lines[-1])["median_ms"]
    except (OSError, IndexError, KeyError, ValueError):
        return None
def ours(path):
    try:
        for l in open(path):
            if l.startswith("| pfx-ort "):
                return float(l.split("|")[2]) * 1e3
    except OSError:
        pass
    return None
f = lambda v: "-" if v is None else f"{v:.2f}"
r = lambda p, o: "-" if p is None or o is None else f"{p / o:.2f}x"
print("\n| model | B | precision | pfx-ort ms | pfx-ort + CUDA graph ms | PEFT eager ms | PEFT compile ms | vs eager | vs compile |")
print("|---|---|---|---|---|---|---|---|---|")
for path in sorted(glob.glob(f"{logs}/ort-*-graph0.txt")):
    size, b, tf = re.match(r".*/ort-(.+)-b(\d+)-tf32(on|off)-graph0\.txt", path).groups()
    prec = "tf32" if tf == "on" else "fp32"
    o0, o1 = ours(path), ours(path.replace("graph0", "graph1"))
    best = min([v for v in (o0, o1) if v is not None], default=None)
    pe, pc = peer(size, b, prec, "eager"), peer(size, b, prec, "compile")
    print(f"| {size} | {b} | {prec} | {f(o0)} | {f(o1)} | {f(pe)} | {f(pc)} | {r(pe, best)} | {r(pc, best)} |")
try:
    print("\nHF generate + PEFT prefix (peft_generate.py):")
    for l in open(f"{logs}/peer-generate.txt"):
        if l.startswith("{"):
            print("  " + l.strip())
except OSError:
    print("\n(no peft_generate.py results)")
PY
}

run_all() {
  gpu_tests
  train "$FIRST" 5 on || return 0
  train "$FIRST" 32 on || return 0
  # GENERATE=0: training only (a run after a change that generation does not read).
  local gen=${GENERATE:-1}
  if [ "$DEVICE" != cpu ] && [ "$gen" = 1 ]; then generate "$FIRST" 1 || return 0; fi
  if [ "$gen" = 1 ]; then generate "$FIRST" 0 || return 0; fi
  train "$FIRST" 5 off || return 0
  if [ "$DEVICE" != cpu ] && [ "$gen" = 1 ]; then generate "$FIRST" 1 f16 || return 0; fi
  for size in ${SIZES#"$FIRST"}; do
    train "$size" 5 on || return 0
    train "$size" 32 on || return 0
    if [ "$gen" = 1 ]; then generate "$size" 1 || return 0; fi
  done
}
run_all
table || true
say "== done in $((SECONDS - START)) s"
pack_logs
