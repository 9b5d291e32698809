#!/usr/bin/env bash
# BART prefix-tuning on E2E, end to end on tract: compile the small BART shipped in graphs/bart-e2e-small/
# (pretrained only as a denoiser of E2E sentences: it has never seen an MR), prefix-tune it on MR -> text in
# both of pfx's BART layouts, generate for unseen test MRs, and score against the model without a prefix.
#
#   bash examples/bart_e2e.sh             # OUT=out/bart-e2e; MODES="paper peft", EPOCHS, LR, BACKEND overridable
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/bart-e2e}
MODES=${MODES:-paper peft}
EPOCHS=${EPOCHS:-2}
LR=${LR:-5e-3}
BACKEND=${BACKEND:-tract}
MODEL=graphs/bart-e2e-small
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/pfx/target}"

cargo build --release --quiet -p pfx-compiler -p pfx-runtime
BIN="$CARGO_TARGET_DIR/release"
mkdir -p "$OUT"
# A new run: generations start over (an interrupted run's .partial files were for the old bundles).
rm -f "$OUT"/hyp.noprefix.txt.partial "$OUT"/hyp.noprefix.txt.partial.key
start=$(date +%s)

for mode in $MODES; do
  echo "== compile ($mode layout)"
  # Sources are at most 57 tokens with <s> </s>, references 87 (longer ones are cut in training).
  "$BIN/pfxc" compile "$MODEL" --bart-prefix "$mode" --prefix-len 10 --mid-dim 512 \
    --batch 8 --src-len 64 --tgt-len 72 --gen-rows 8 --max-new 72 -o "$OUT/$mode/bundle"

  echo "== prefix-tune on examples/data/e2e_train.txt ($mode, $EPOCHS epochs, lr $LR, $BACKEND)"
  rm -rf "$OUT/$mode/run" "$OUT/$mode"/hyp.txt.partial "$OUT/$mode"/hyp.txt.partial.key
  "$BIN/pfxrun" train "$OUT/$mode/bundle" --train examples/data/e2e_train.txt --epochs "$EPOCHS" --lr "$LR" \
    --warmup-steps 50 --checkpoint-every 200 --backend "$BACKEND" -o "$OUT/$mode/run"

  echo "== generate for the test MRs (greedy)"
  "$BIN/pfxrun" generate "$OUT/$mode/bundle" --prefix "$OUT/$mode/run/prefix.safetensors" \
    --inputs examples/data/e2e_test.txt --backend "$BACKEND" --output "$OUT/$mode/hyp.txt" --refs-out "$OUT/refs.txt"
done

echo "== the model without a prefix"
first=$(echo $MODES | cut -d' ' -f1)
"$BIN/pfxrun" generate "$OUT/$first/bundle" --no-prefix --inputs examples/data/e2e_test.txt \
  --backend "$BACKEND" --output "$OUT/hyp.noprefix.txt"

echo "== score ($(wc -l < "$OUT/hyp.noprefix.txt") test MRs, multi-reference)"
echo "-- without a prefix (the denoiser alone):"
"$BIN/pfxrun" score --hyp "$OUT/hyp.noprefix.txt" --refs "$OUT/refs.txt"
for mode in $MODES; do
  echo "-- with the trained prefix, $mode layout:"
  "$BIN/pfxrun" score --hyp "$OUT/$mode/hyp.txt" --refs "$OUT/refs.txt"
done
echo "== done in $(( $(date +%s) - start ))s; samples ($first):"
paste -d '\n' <(head -3 "$OUT/$first/hyp.txt") /dev/null | sed 's/^/  /'
