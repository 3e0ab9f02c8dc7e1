#!/usr/bin/env bash
# One-shot GPU check for the device machine: correctness of the CUDA paths, then the benchmarks
# (bf16). Usage there: bash scripts/gpu_check.sh OUTDIR   (wheels for the pinned transformers in .whl/)
set -uo pipefail
OUT=${1:-results/gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
export PYTHONUNBUFFERED=1
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
python3 scripts/gpu_correctness.py 2>&1 | tee "$OUT/correctness.txt"
python3 -m mea bench train --device cuda --dtype bfloat16 --preset llama3.2-1b --batch 4 --seq 1024 --steps 5 \
  --repeats 3 --out "$OUT/train_llama1b.json" > /dev/null && python3 -c "import json; d=json.load(open('$OUT/train_llama1b.json')); print('train', d['tokens_per_s'], d['ratios'])"
python3 -m mea bench decode --device cuda --dtype bfloat16 --preset llama3.2-1b --contexts 1024 4096 16384 32768 \
  --budgets 0.5 0.25 --batches 1 8 --steps 20 --out "$OUT/decode_llama1b.json" > /dev/null && cat "$OUT/decode_llama1b.md"
python3 -m mea bench prefill --device cuda --dtype bfloat16 --preset llama3.2-1b --contexts 1024 4096 16384 \
  --budgets 0.5 0.25 --out "$OUT/prefill_llama1b.json" > /dev/null && cat "$OUT/prefill_llama1b.md"
python3 -m mea bench memory --device cuda --dtype bfloat16 --preset llama3.2-1b --contexts 4096 32768 \
  --budgets 0.5 0.25 --out "$OUT/memory_llama1b.json" > /dev/null && cat "$OUT/memory_llama1b.md"
python3 scripts/decode_kernels.py | tee "$OUT/decode_kernels_cpu.md"
