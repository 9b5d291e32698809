#!/usr/bin/env bash
# One frozen model, one prefix per user, one batch: prefix-tune the shipped small GPT-2 twice on E2E with two
# writing styles (two "users"), then generate for both users' requests in a single run, each request with its own
# user's prefix (a JSONL line's "prefix"), and show each user's outputs.
#
#   bash examples/many_prefixes.sh     # OUT=out/many by default; EPOCHS, LR, BACKEND may be overridden
#
# The styles are made from the same references so that the difference is the prefix alone:
#   terse:  the reference cut after its first clause ("Alimentum is not a family - friendly place .");
#   upbeat: the reference followed by "You will love it !".
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/many}
EPOCHS=${EPOCHS:-1}
LR=${LR:-5e-3}
BACKEND=${BACKEND:-tract}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/pfx/target}"

cargo build --release --quiet -p pfx-compiler -p pfx-runtime
BIN="$CARGO_TARGET_DIR/release"
mkdir -p "$OUT/users"
start=$(date +%s)

echo "== two styles of the same training references"
# terse: up to the first " , " or " . " (kept as the end " ."); upbeat: the whole reference and a fixed sign-off.
awk -F'\\|\\|' '{ t = $2; sub(/ +$/, "", t); c = index(t, " , "); d = index(t, " . ");
                  if (c > 0 && (d == 0 || c < d)) t = substr(t, 1, c - 1) " ."; else if (d > 0) t = substr(t, 1, d + 1);
                  print $1 "||" t }' examples/data/e2e_train.txt > "$OUT/terse.txt"
awk -F'\\|\\|' '{ t = $2; sub(/ +$/, "", t); print $1 "||" t " You will love it !" }' \
  examples/data/e2e_train.txt > "$OUT/upbeat.txt"
head -1 "$OUT/terse.txt" | sed 's/^/  terse:  /'
head -1 "$OUT/upbeat.txt" | sed 's/^/  upbeat: /'

echo "== compile"
"$BIN/pfxc" compile graphs/e2e-small/model.onnx --prefix-len 10 --mid-dim 512 \
  --batch 8 --seq 96 --prompt-len 48 --max-new 48 --gen-rows 8 -o "$OUT/bundle"

for user in terse upbeat; do
  echo "== prefix-tune for $user ($EPOCHS epoch(s), lr $LR, $BACKEND)"
  rm -rf "$OUT/run-$user"
  "$BIN/pfxrun" train "$OUT/bundle" --train "$OUT/$user.txt" --epochs "$EPOCHS" --lr "$LR" --warmup-steps 50 \
    --backend "$BACKEND" -o "$OUT/run-$user"
  cp "$OUT/run-$user/prefix.safetensors" "$OUT/users/$user.safetensors"
done

echo "== one run, both users' requests interleaved (each line names its user's prefix)"
# Six unseen test MRs, asked by both users: twelve requests in batches of eight rows.
awk -F'\\|\\|' '!seen[$1]++ { print $1 }' examples/data/e2e_test.txt | head -6 > "$OUT/mrs.txt"
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
mrs = open(f"{out}/mrs.txt").read().splitlines()
with open(f"{out}/users/requests.jsonl", "w") as f:
    for mr in mrs:
        for user in ("terse", "upbeat"):
            f.write(json.dumps({"source": mr, "prefix": f"{user}.safetensors"}) + "\n")
PY
rm -f "$OUT/outputs.txt"
"$BIN/pfxrun" generate "$OUT/bundle" --inputs "$OUT/users/requests.jsonl" --backend "$BACKEND" \
  --output "$OUT/outputs.txt"
paste -d '\t' <(python3 -c "import json,sys; [print(json.loads(l)['prefix'].split('.')[0]) for l in open(sys.argv[1])]" \
  "$OUT/users/requests.jsonl") "$OUT/outputs.txt" | sed 's/^/  /'
echo "== done in $(( $(date +%s) - start ))s"
