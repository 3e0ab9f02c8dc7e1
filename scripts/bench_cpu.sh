#!/usr/bin/env bash
# Every performance number in docs/performance.md: `bash scripts/bench_cpu.sh [OUTDIR]` (default results/bench);
# then `python3 scripts/render_docs.py`.
# Run it on a quiet machine: each benchmark interleaves its systems, but other load still adds noise.
set -euo pipefail
OUT=${1:-results/bench}
MEA=${MEA:-.venv/bin/mea}
mkdir -p "$OUT"
$MEA bench train --repeats 5 --out "$OUT/train.json" > /dev/null
$MEA bench prefill --out "$OUT/prefill.json" > /dev/null
$MEA bench decode --out "$OUT/decode.json" > /dev/null
$MEA bench decode --dtype bfloat16 --batches 1 --out "$OUT/decode_bf16.json" > /dev/null
$MEA bench memory --out "$OUT/memory.json" > /dev/null
for f in train prefill decode decode_bf16 memory; do echo "## $f"; cat "$OUT/$f.md"; done
