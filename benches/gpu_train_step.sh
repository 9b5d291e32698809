#!/usr/bin/env bash
# The issue's GPU training race, for one call on the lent GPU machine (no Rust, no network there): pfx on ONNX
# Runtime CUDA against PyTorch + PEFT (eager and torch.compile), gpt2-medium and gpt2, B=5 and B=32, T=128,
# fp32 and TF32. Not run yet: no session so far was lent a GPU.
#
# Here, before the device calls:
#   cargo build --release --bench train_step_cpu
#   mkdir -p gpu-carry && cp "$(ls -t $CARGO_TARGET_DIR/release/deps/train_step_cpu-* | grep -v '\.d$' | head -1)" gpu-carry/train_step
#   cp "$(ls -t $CARGO_TARGET_DIR/release/deps/generate_tokens-* | grep -v '\.d$' | head -1)" gpu-carry/generate_tokens
#   bash /work/shared/tools/gpu/pack-ort-cuda.sh .gpu 4        # ORT's CUDA libraries in four parts
# On the device (see ../shared/tools/gpu/README.md): one call per part copies it into /tmp/ortgpu, back to back;
# the last call carries gpu-carry/ and runs
#   PEER=/path/to/peft_step.py bash benches/gpu_train_step.sh
# (the repository copy on the device holds benches/make_gpt2_export.py and benches/peft_step_threads.py).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-gpu-carry/train_step}
PEER=${PEER:?set PEER to peft_step.py}
export ORT_DYLIB_PATH=${ORT_DYLIB_PATH:-$(ls /tmp/ortgpu/libonnxruntime.so.* | head -1)}
export LD_LIBRARY_PATH=/tmp/ortgpu:/usr/local/cuda-13/targets/x86_64-linux/lib:${LD_LIBRARY_PATH:-}
export PFX_PEFT_STEP=$PEER PFX_PEFT_PYTHON=${PFX_PEFT_PYTHON:-python3}
export PFX_BENCH_DEVICE=cuda PFX_BENCH_ENGINES=ort,peft PFX_BENCH_ROUNDS=${ROUNDS:-3} PFX_BENCH_SEQ=128
export PFX_BENCH_WARMUP=3 PFX_BENCH_STEPS=10
OUT=${OUT:-$PWD/gpu-results}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

for size in gpt2-medium gpt2; do
  # Exported there (~12 s for gpt2-medium): a 1.4 GB export cannot be carried.
  [ -f "/tmp/pfx-bench/$size/model.onnx" ] || python3 benches/make_gpt2_export.py --size "$size" --no-check "/tmp/pfx-bench/$size"
  for b in 5 32; do
    bundle="/tmp/pfx-bench/bundle-$size-b$b"
    for tf32 in off on; do
      for peer_compile in 0 1; do
        tag="$size-b$b-tf32$tf32-compile$peer_compile"
        echo "== $tag"
        PFX_BENCH_MODEL="/tmp/pfx-bench/$size/model.onnx" PFX_BENCH_BUNDLE="$bundle" PFX_BENCH_BATCH=$b \
          PFX_BENCH_TF32=$tf32 PFX_BENCH_PEER_COMPILE=$peer_compile "$BIN" --bench 2>&1 | tee "$OUT/$tag.txt" | tail -6
        # The same with ORT replaying a CUDA graph (pfx only).
        PFX_BENCH_MODEL="/tmp/pfx-bench/$size/model.onnx" PFX_BENCH_BUNDLE="$bundle" PFX_BENCH_BATCH=$b \
          PFX_BENCH_TF32=$tf32 PFX_BENCH_CUDA_GRAPH=1 PFX_BENCH_ENGINES=ort "$BIN" --bench 2>&1 \
          | tee "$OUT/$tag-cudagraph.txt" | tail -3
      done
    done
  done
  # Generation, ms per token (prompt 32, 64 new; greedy B=1, B=8, beam 5), with and without CUDA graphs.
  for graph in 0 1; do
    PFX_BENCH_MODEL="/tmp/pfx-bench/$size/model.onnx" PFX_BENCH_CUDA_GRAPH=$graph "${GEN_BIN:-gpu-carry/generate_tokens}" \
      --bench 2>&1 | tee "$OUT/generate-$size-cudagraph$graph.txt"
  done
done
# The peer for generation (HF generate with the PEFT prefix in its cache), same machine, same call.
OUT="$OUT" python3 "$(dirname "$PEER")/peft_generate.py" | tee "$OUT/peft_generate.txt"
