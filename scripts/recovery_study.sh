#!/usr/bin/env bash
# What long-sequence recovery with retrieval sequences buys on SmolLM2 at KV kept 0.67, against the short plain-text
# recipe, at the same token budget; both train on the modern calibration text (Python documentation prose) and are
# judged on the modern held-out text (Debian Reference), on Hamlet and on the needle test. Each step is skipped when
# its result exists (rerun to resume).
#   bash scripts/recovery_study.sh OUT RESULTS TOKENS
# Results: RESULTS/<system>-ppl-{modern,hamlet}.json, RESULTS/<system>-needle/, RESULTS/rec-*.json (recovery runs,
# with seconds and CPU seconds per step and the precision); then `python scripts/recovery_summary.py RESULTS`.
set -euo pipefail
OUT=$1 R=$2 TOKENS=$3
MEA=${MEA:-"python -m mea"}
mkdir -p "$OUT" "$R"

step() {  # result file, command...: run the command, its JSON to the result file (atomically) unless it exists
  local res=$1; shift
  [ -e "$res" ] && { echo "skip $res"; return; }
  echo "+ $*" >&2
  "$@" > "$res.tmp" && mv "$res.tmp" "$res"
}

# the start: the paper's data-free SVD at KV kept 0.67 (2 of 3 heads), no layer-wise fit (cheap on a shared CPU)
[ -d "$OUT/kv67" ] || $MEA compress smollm2 "$OUT/kv67" --method svd --virtual-heads 2 --recover none --no-eval
step "$R/rec-short-plain.json" $MEA recover "$OUT/kv67" "$OUT/rec-short-plain" --teacher smollm2 --tokens "$TOKENS" \
  --lr 2e-4 --seq-len 256 --batch 4 --retrieval-frac 0 --no-eval
step "$R/rec-long-retrieval.json" $MEA recover "$OUT/kv67" "$OUT/rec-long-retrieval" --teacher smollm2 \
  --tokens "$TOKENS" --lr 2e-4 --seq-len 2048 --batch 1 --retrieval-frac 0.25 --no-eval

for system in original kv67 rec-short-plain rec-long-retrieval; do
  model=$OUT/$system
  [ "$system" = original ] && model=smollm2
  step "$R/$system-ppl-modern.json" $MEA eval ppl "$model" --domain modern --windows 8 --window 1024
  step "$R/$system-ppl-hamlet.json" $MEA eval ppl "$model" --domain shakespeare --windows 8 --window 1024
  [ -e "$R/$system-needle/needle.json" ] || $MEA eval needle "$model" "$R/$system-needle" \
    --lengths 512 1024 2048 --depths 0.1 0.5 0.9 --trials 3 > /dev/null
done
