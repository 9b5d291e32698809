#!/usr/bin/env bash
# Everything the GPU race (benches/gpu_train_step.sh) needs, made here before the device calls (the GPU machine
# has no Rust and no network): the stripped, gzipped bench and test binaries and the peers in gpu-carry/, the
# GPT-2 graphs without their weights (gpu-carry/*.skeleton.onnx, ~0.3 MB each, given random weights there), and
# ONNX Runtime's CUDA libraries (PyPI onnxruntime-gpu, a CUDA 13 build) packed with xz and cut into parts under
# .gpu/, sized so that each call, with the working tree beside it, stays within 64 MiB. Prints the device calls.
#
#   bash benches/gpu_prepare.sh        # ~2 min from a warm build cache; ~10 min more the first time (skeletons, packing)
#
# Needs the reference venv (PFX_PYTHON, default /root/.cache/pfx/ref/bin/python) for the skeletons; existing
# skeletons and the packed libraries (in $TMPDIR) are kept. gpu-carry/ and .gpu/ are ignored by git.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PFX_PYTHON:-/root/.cache/pfx/ref/bin/python}
TARGET=${CARGO_TARGET_DIR:-$PWD/target}
SHARED_GPU=${SHARED_GPU:-$(cd .. && pwd)/shared/tools/gpu}
ORT_VERSION=${ORT_GPU_VERSION:-1.31.1}
[ -d "$SHARED_GPU" ] || { echo "gpu_prepare: no shared GPU tools at $SHARED_GPU (set SHARED_GPU)"; exit 2; }
mkdir -p gpu-carry .gpu

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

echo "== ONNX Runtime $ORT_VERSION's CUDA libraries"
# The shared packer downloads onnxruntime-gpu and packs its libraries into one xz stream (cached in $TMPDIR);
# the parts are cut here, sized to the calls.
ORT_GPU_VERSION=$ORT_VERSION bash "$SHARED_GPU/pack-ort-cuda.sh" .gpu 1 >/dev/null
packed=${TMPDIR:-/tmp}/ort-gpu-$ORT_VERSION/libs.tar.xz

# Every device call carries the working tree too (tracked and untracked, not ignored, files), 64 MiB in all. The
# calls run on the tree slimmed by benches/gpu_slim.sh (~2 MiB left of ~48). The first call carries gpu-carry/
# and the first part; the others one part each.
LIMIT=$((64 * 1024 * 1024))
MARGIN=$((1024 * 1024)) # for files the tree may gain before the calls
tree=$(bash benches/gpu_slim.sh size)
room=$((LIMIT - MARGIN - tree))
carry=$(du -cb gpu-carry | tail -1 | cut -f1)
[ "$carry" -lt "$room" ] || { echo "gpu_prepare: gpu-carry/ ($carry bytes) does not fit a call ($room)" >&2; exit 1; }
total=$(stat -c %s "$packed")
first=$((room - carry))
[ "$first" -lt "$total" ] || first=$total
rest=$((total - first))
more=$(((rest + room - 1) / room))
rm -f .gpu/ortgpu.part*
head -c "$first" "$packed" >.gpu/ortgpu.part00
if [ "$more" -gt 0 ]; then
  tail -c +$((first + 1)) "$packed" | split -b $(((rest + more - 1) / more)) -d --numeric-suffixes=1 - .gpu/ortgpu.part
fi
cat .gpu/ortgpu.part* | cmp - "$packed"
last=$(printf '%02d' "$more")
ls -l .gpu gpu-carry
cat <<TXT
== ready: the slimmed tree is $tree bytes, so each call carries at most $room more. First, here:
    bash benches/gpu_slim.sh out      (and \`bash benches/gpu_slim.sh back\` once the calls are done)
then $((more + 1)) device calls, back to back (the machine is taken back after ~30 s idle):
  1. carry ["gpu-carry", ".gpu/ortgpu.part00"], timeout_s 60 (the peers start timing in the background):
    mkdir -p /tmp/ortgpu && cp .gpu/ortgpu.part00 /tmp/ortgpu/ && bash benches/gpu_train_step.sh stage && nvidia-smi
TXT
for ((i = 1; i < more; i++)); do
  n=$(printf '%02d' $i)
  echo "  $((i + 1)). carry [\".gpu/ortgpu.part$n\"]: cp .gpu/ortgpu.part$n /tmp/ortgpu/ && tail -3 /tmp/pfx-gpu/logs/stage.txt"
done
cat <<TXT
  $((more + 1)). carry [".gpu/ortgpu.part$last"], timeout_s as device time allows (BUDGET_S: no case starts after it):
    cp .gpu/ortgpu.part$last /tmp/ortgpu/ && (cd /tmp/ortgpu && cat ortgpu.part* | xz -d -T0 | tar xf -) && BUDGET_S=300 bash benches/gpu_train_step.sh run
Dry run here first (numbers meaningless):
  export DEVICE=cpu SIZES=tiny STAGE=/tmp/pfx-gpu-dry PYTHON=$PY OUT=/tmp/gpu-dry
  bash benches/gpu_train_step.sh stage && bash benches/gpu_train_step.sh run
TXT
