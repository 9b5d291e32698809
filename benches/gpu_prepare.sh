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

# Every device call carries the working tree too (tracked and untracked, not ignored, files), 64 MiB in all. The
# calls run on the tree slimmed by benches/gpu_slim.sh (the fixtures the GPU run does not read taken out: ~2 MiB
# left of ~48), so each call has room for most of 64 MiB. The parts are sized to fit.
LIMIT=$((64 * 1024 * 1024))
MARGIN=$((1024 * 1024)) # for files the tree may gain before the calls
tree=$(bash benches/gpu_slim.sh size)
room=$((LIMIT - MARGIN - tree))
carry=$(du -cb gpu-carry | tail -1 | cut -f1)
# When the tree has grown too much for the binaries to ride with the last call, they go first, in calls of their own:
# groups under .gpu/bin/NN/ that each fit, unpacked there into /tmp/pfx-gpu-bin (where gpu_train_step.sh looks).
rm -rf .gpu/bin
bin_groups=0
if [ "$carry" -gt "$room" ]; then
  mkdir -p .gpu/bin
  used=$room
  for packed in $(ls -S gpu-carry/*.gz); do
    size=$(stat -c %s "$packed")
    [ "$size" -le "$room" ] || { echo "gpu_prepare: $packed ($size bytes) does not fit a call ($room)" >&2; exit 1; }
    if [ $((used + size)) -gt "$room" ]; then
      bin_groups=$((bin_groups + 1))
      used=0
    fi
    group=.gpu/bin/$(printf '%02d' $((bin_groups - 1)))
    mkdir -p "$group" && mv "$packed" "$group/"
    used=$((used + size))
  done
  carry=$(du -cb gpu-carry | tail -1 | cut -f1)
  [ "$carry" -le "$room" ] || { echo "gpu_prepare: gpu-carry/ holds $carry bytes without the binaries, a call has $room" >&2; exit 1; }
fi
echo "== ONNX Runtime's CUDA libraries"
bash "$SHARED_GPU/pack-ort-cuda.sh" .gpu 1 >/dev/null # once whole, to learn its size
ort=$(du -cb .gpu/ortgpu.part* | tail -1 | cut -f1)
parts=$(((ort + room - 1) / room))
bash "$SHARED_GPU/pack-ort-cuda.sh" .gpu "$parts" >/dev/null
ls -l .gpu gpu-carry
[ "$bin_groups" -eq 0 ] || ls -lR .gpu/bin
cat <<TXT
== ready: the slimmed tree is $tree bytes, so each call carries at most $room more. First, here:
    bash benches/gpu_slim.sh out      (and \`bash benches/gpu_slim.sh back\` once the calls are done)
then the $((bin_groups + parts + 1)) device calls, back to back (the machine is taken back after ~30 s idle):
TXT
if [ "$bin_groups" -gt 0 ]; then
  cat <<TXT
  first $bin_groups call(s), the binaries (MM = 00..$(printf '%02d' $((bin_groups - 1)))): carry [".gpu/bin/MM"], command:
    mkdir -p /tmp/pfx-gpu-bin && for f in .gpu/bin/MM/*.gz; do b=/tmp/pfx-gpu-bin/\$(basename "\$f" .gz); gunzip -c "\$f" >"\$b" && chmod +x "\$b"; done
TXT
fi
cat <<TXT
  then $parts call(s) (NN = 00..$(printf '%02d' $((parts - 1)))): carry [".gpu/ortgpu.partNN"], command:
    mkdir -p /tmp/ortgpu && cp .gpu/ortgpu.partNN /tmp/ortgpu/
  last call: carry ["gpu-carry"], timeout_s 600, command:
    (cd /tmp/ortgpu && cat ortgpu.part* | xz -d -T0 | tar xf -) && bash benches/gpu_train_step.sh
Dry run here first (numbers meaningless; binaries moved to .gpu/bin/: run their calls' command here first):
  DEVICE=cpu SIZES=tiny PEER=gpu-carry/peft_step.py PFX_PEFT_PYTHON=/root/.cache/pfx/ref/bin/python \
    PYTHON=/root/.cache/pfx/ref/bin/python OUT=/tmp/gpu-dry bash benches/gpu_train_step.sh
TXT
