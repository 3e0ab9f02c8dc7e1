#!/usr/bin/env bash
# Models sized from a probe's table with a width floor, recovered like the frontier's models (results/floor/):
#   bash scripts/floor_models.sh OUT TABLE [LEVEL ...]   (default levels 0.5 0.445; seeds 0 1)
# TABLE: the probe.json that `mea compress --allocate probe` writes beside its model (the frontier's 1/3 probe
# model's covers 0.5 and 0.445). KV kept 0.445 holds 2,880 bytes a token with the int4 cache: 1/8 of SmolLM2's
# 16-bit cache. Each step is skipped when its model exists. Put them on the frontier with
# `mea study frontier OUT2 ... --models rope-pair-latent-L-floor033-rec-sS=OUT/rope-pair-latent-L-floor033-rec-sS`.
set -euo pipefail
out=$1 table=$2; shift 2
levels=("${@:-0.5 0.445}")
MEA=${MEA:-mea}
for level in ${levels[*]}; do
  m=$out/rope-pair-latent-$level-floor033
  [ -d "$m-fit" ] || $MEA compress smollm2 "$m-fit" --method rope-pair-latent --kv-budget "$level" \
    --sensitivity "$table" --probe-floor 0.33 --dtype fp32 --no-eval
  for seed in 0 1; do
    [ -d "$m-rec-s$seed" ] || $MEA recover "$m-fit" "$m-rec-s$seed" --teacher smollm2 --tokens 98304 --seed "$seed" \
      --lr 3e-4 --retrieval-frac 0.5 --no-eval
  done
done
