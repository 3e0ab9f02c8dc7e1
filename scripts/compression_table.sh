#!/usr/bin/env bash
# The compression table of docs/compression.md: every row is one `mea` command; JSON results land in
# results/compression/ (then `python3 scripts/render_docs.py`).
# Usage: bash scripts/compression_table.sh [SRC]   (SRC defaults to the embedded SmolLM2; converting it
# once first, `mea convert smollm2 out/smollm2-mea`, and passing that directory is faster).
set -euo pipefail
SRC=${1:-smollm2}
MEA=${MEA:-.venv/bin/mea}
R=results/compression
mkdir -p "$R" out/table
run() {  # name, then mea compress flags
  local name=$1; shift
  [ -f "$R/$name.json" ] && { echo "skip $name (done)"; return; }
  $MEA compress "$SRC" "out/table/$name" --overwrite --skip-original-eval "$@" > "$R/$name.json.tmp" && mv "$R/$name.json.tmp" "$R/$name.json"
  echo "$name: $(python3 -c "import json; d=json.load(open('$R/$name.json')); print(round(d['perplexity']['compressed'], 2), d['kv_fraction'])")"
}
[ -f "$R/original.json" ] || $MEA eval ppl "$SRC" > "$R/original.json"
run full2-svd --virtual-heads 2 --method svd --recover none
run full2-whitened-plain --virtual-heads 2 --no-key-weighting --no-value-weighting --recover none
run full2-whitened-keys --virtual-heads 2 --no-value-weighting --recover none
run full2-whitened-values --virtual-heads 2 --no-key-weighting --recover none
run full2-whitened --virtual-heads 2 --recover none
run full2-whitened-fit20 --virtual-heads 2 --fit-steps 20
run half2-whitened --virtual-heads 2 --preset half --recover none
run budget50-whitened-fit20 --kv-budget 0.5 --fit-steps 20
run full2-teacher60 --virtual-heads 2 --fit-mode teacher --fit-steps 60 --no-eval
recover() {  # name, compressed row to start from: KL distillation toward SRC, 150k tokens
  local name=$1 from=$2
  [ -f "$R/$name.json" ] && { echo "skip $name (done)"; return; }
  $MEA recover "out/table/$from" "out/table/$name" --teacher "$SRC" --tokens 150000 --lr 2e-4 --overwrite \
    > "$R/$name.json.tmp" && mv "$R/$name.json.tmp" "$R/$name.json"
}
recover full2-teacher60-rec full2-teacher60
recover budget50-rec budget50-whitened-fit20
