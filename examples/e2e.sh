#!/usr/bin/env bash
# E2E table-to-text, end to end on the embedded default (tract, pure Rust):
# compile the shipped small GPT-2, prefix-tune it on E2E MR -> text, generate for unseen test MRs, and score
# the result next to the same model without a prefix.
#
#   bash examples/e2e.sh            # OUT=out/e2e by default; EPOCHS, LR, BACKEND, WEIGHTS (f32|f16) may be overridden
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/e2e}
EPOCHS=${EPOCHS:-2}
LR=${LR:-5e-3}
BACKEND=${BACKEND:-tract}
WEIGHTS=${WEIGHTS:-f32}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/pfx/target}"

cargo build --release --quiet -p pfx-compiler -p pfx-runtime
BIN="$CARGO_TARGET_DIR/release"
mkdir -p "$OUT"
start=$(date +%s)

echo "== compile"
"$BIN/pfxc" compile graphs/e2e-small/model.onnx --prefix-len 10 --mid-dim 512 \
  --batch 8 --seq 96 --prompt-len 48 --max-new 72 --gen-rows 8 --weights "$WEIGHTS" -o "$OUT/bundle"

echo "== prefix-tune on examples/data/e2e_train.txt ($EPOCHS epochs, lr $LR, $BACKEND)"
# A new run: its generations start over too (an interrupted run's .partial files were for the old prefix).
rm -rf "$OUT/run" "$OUT"/hyp.*.partial "$OUT"/hyp.*.partial.key
"$BIN/pfxrun" train "$OUT/bundle" --train examples/data/e2e_train.txt --epochs "$EPOCHS" --lr "$LR" \
  --warmup-steps 50 --checkpoint-every 200 --backend "$BACKEND" -o "$OUT/run"

echo "== generate for the test MRs (greedy)"
"$BIN/pfxrun" generate "$OUT/bundle" --prefix "$OUT/run/prefix.safetensors" --inputs examples/data/e2e_test.txt \
  --backend "$BACKEND" --output "$OUT/hyp.prefix.txt" --refs-out "$OUT/refs.txt"
"$BIN/pfxrun" generate "$OUT/bundle" --no-prefix --inputs examples/data/e2e_test.txt \
  --backend "$BACKEND" --output "$OUT/hyp.noprefix.txt"

echo "== score ($(wc -l < "$OUT/hyp.prefix.txt") test MRs, multi-reference)"
echo "-- without a prefix (the pretrained LM alone):"
"$BIN/pfxrun" score --hyp "$OUT/hyp.noprefix.txt" --refs "$OUT/refs.txt"
echo "-- with the trained prefix:"
"$BIN/pfxrun" score --hyp "$OUT/hyp.prefix.txt" --refs "$OUT/refs.txt"
echo "== done in $(( $(date +%s) - start ))s; samples:"
paste -d '\n' <(head -3 "$OUT/hyp.prefix.txt") /dev/null | sed 's/^/  /'
