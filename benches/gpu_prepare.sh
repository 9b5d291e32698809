#!/usr/bin/env bash
# Everything the GPU race needs, made here before the device calls (the GPU machine has no Rust and no network):
# the stripped, gzipped bench and test binaries and the peers in gpu-carry/, the GPT-2 graphs without their
# weights (gpu-carry/*.skeleton.onnx, ~0.3 MB each, given random weights there), and ONNX Runtime's CUDA
# libraries in parts under .gpu/, each small enough to travel beside the working tree in one call. Prints the
# device calls to make back to back.
#
#   bash benches/gpu_prepare.sh        # ~2 min from a warm build cache; ~10 min more when the skeletons must be made
#
# Needs the reference venv (PFX_PYTHON, default /root/.cache/pfx/ref/bin/python) for the skeletons; existing
# skeletons are kept (delete them to remake). gpu-carry/ and .gpu/ are ignored by git.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PFX_PYTHON:-/root/.cache/pfx/ref/bin/python}
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
SHARED_GPU=${SHARED_GPU:-$(cd .. && pwd)/shared/tools/gpu}
[ -d "$SHARED_GPU" ] || { echo "gpu_prepare: no shared GPU tools at $SHARED_GPU (set SHARED_GPU)"; exit 2; }
mkdir -p gpu-carry

# The newest build of a bench or test target (cargo names them NAME-HASH).
newest() { ls -t "$TARGET"/release/deps/"$1"-* | grep -v '\.d$' | head -1; }

echo "== building (release)"
cargo build --release --bench train_step_cpu --bench generate_tokens
cargo test --release -p pfx-runtime --test gpu_ort --no-run
for pair in train_step:train_step_cpu generate_tokens:generate_tokens gpu_ort:gpu_ort; do
  strip -o "gpu-carry/${pair%%:*}" "$(newest "${pair#*:}")"
  gzip -f "gpu-carry/${pair%%:*}"
done
cp "$SHARED_GPU/peft_step.py" "$SHARED_GPU/peft_generate.py" gpu-carry/
chmod u+w gpu-carry/*.py

for size in gpt2-medium gpt2; do
  if [ ! -s "gpu-carry/$size.skeleton.onnx" ]; then
    echo "== exporting $size (random weights) for its skeleton"
    "$PY" benches/make_gpt2_export.py --size "$size" --no-check "/tmp/pfx-bench/$size"
    "$PY" benches/gpt2_skeleton.py strip "/tmp/pfx-bench/$size" "gpu-carry/$size.skeleton.onnx"
  fi
done

# Every device call carries the working tree too (tracked and untracked, not ignored, files), 64 MiB in all: the
# tree (~32 MiB now) leaves each call room for one ORT part or the binaries, not both. The parts are sized to fit.
LIMIT=$((64 * 1024 * 1024))
MARGIN=$((1024 * 1024)) # for files the tree may gain before the calls
tree=$(git ls-files -z -co --exclude-standard | xargs -0 stat -c %s | awk '{s += $1} END {print s + 0}')
room=$((LIMIT - MARGIN - tree))
carry=$(du -cb gpu-carry | tail -1 | cut -f1)
if [ "$carry" -gt "$room" ]; then
  echo "gpu_prepare: gpu-carry/ holds $carry bytes, but a call has $room beside the $tree-byte tree" >&2
  exit 1
fi
echo "== ONNX Runtime's CUDA libraries"
bash "$SHARED_GPU/pack-ort-cuda.sh" .gpu 1 >/dev/null # once whole, to learn its size
ort=$(du -cb .gpu/ortgpu.part* | tail -1 | cut -f1)
parts=$(((ort + room - 1) / room))
bash "$SHARED_GPU/pack-ort-cuda.sh" .gpu "$parts" >/dev/null
ls -l .gpu gpu-carry
cat <<TXT
== ready: the tree is $tree bytes, so each call carries at most $room more. The $((parts + 1)) device calls, back to
back (the machine is taken back after ~30 s idle):
  calls 1-$parts (NN = 00..$(printf '%02d' $((parts - 1)))): carry [".gpu/ortgpu.partNN"], command:
    mkdir -p /tmp/ortgpu && cp .gpu/ortgpu.partNN /tmp/ortgpu/
  call $((parts + 1)): carry ["gpu-carry"], timeout_s 600, command:
    (cd /tmp/ortgpu && cat ortgpu.part* | xz -d -T0 | tar xf -) && bash benches/gpu_train_step.sh
Dry run here first (numbers meaningless):
  DEVICE=cpu SIZES=tiny PEER=gpu-carry/peft_step.py PFX_PEFT_PYTHON=/root/.cache/pfx/ref/bin/python \
    PYTHON=/root/.cache/pfx/ref/bin/python OUT=/tmp/gpu-dry bash benches/gpu_train_step.sh
TXT
