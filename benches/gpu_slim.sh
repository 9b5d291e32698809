#!/usr/bin/env bash
# The device calls carry the working tree (64 MiB per call, all in), and the fixtures under graphs/, the snapshots
# and the example data are most of it, though the GPU run (benches/gpu_train_step.sh and runtime/tests/gpu_ort.rs)
# reads only graphs/gpt2-optimum, graphs/peft, graphs/peft-generate and graphs/*.py. Taking the rest out of the
# working tree for the calls leaves each call room for more of ONNX Runtime's CUDA libraries: fewer calls.
#
#   bash benches/gpu_slim.sh size   bytes of the tree as the calls would carry it slimmed
#   bash benches/gpu_slim.sh out    delete those files from the working tree (refused if any has changes)
#   bash benches/gpu_slim.sh back   restore them from git (also after a crash: they are all committed)
set -euo pipefail
cd "$(dirname "$0")/.."

AREAS=(graphs tests/snapshots compiler/tests/snapshots examples/data)
KEEP='^graphs/(gpt2-optimum|peft|peft-generate)/|^graphs/[^/]*\.py$'

# NUL-separated tracked files of AREAS that the GPU run does not read.
unneeded() {
  git ls-files -z -- "${AREAS[@]}" | grep -zvE "$KEEP" || true
}

case "${1:-}" in
  size)
    # What the calls carry: tracked and untracked (not ignored) files, less the unneeded ones.
    comm -z -23 <(git ls-files -z -co --exclude-standard | sort -z) <(unneeded | sort -z) |
      xargs -0 -r stat -c %s | awk '{s += $1} END {print s + 0}'
    ;;
  out)
    if [ -n "$(git status --porcelain -- "${AREAS[@]}")" ]; then
      echo "gpu_slim: uncommitted changes under ${AREAS[*]}; commit or stash them first (back restores from git)" >&2
      exit 1
    fi
    unneeded | xargs -0 -r rm -f
    echo "gpu_slim: fixtures the GPU run does not read are out of the tree; \`bash benches/gpu_slim.sh back\` after the calls"
    ;;
  back)
    git checkout -- "${AREAS[@]}"
    echo "gpu_slim: restored"
    ;;
  *)
    echo "usage: bash benches/gpu_slim.sh size|out|back" >&2
    exit 2
    ;;
esac
