#!/usr/bin/env bash
# One-shot GPU check (at most 10 minutes on one GPU: the step limits add up to 585 s): correctness of the CUDA paths in bf16 (cached vs uncached
# decoding incl. QK-norm, eager vs fused attention, no host-device sync per decoding step), `mea compress` and
# `mea recover` of SmolLM2 on the GPU with the CPU's time beside it, the streaming compression of a
# Llama-3.2-1B-shaped checkpoint, and the decode benchmark. Results under OUT (default results/gpu).
# Usage there: bash scripts/gpu_check.sh [OUT]   (wheels for the pinned transformers in .whl/ if any)
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
WORK=$(mktemp -d)
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to OUT/NAME.log, record the wall time
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s%N)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(( ($(date +%s%N) - t0) / 1000000 ))" | tee -a "$OUT/steps.tsv"
}
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())" \
  | tee "$OUT/versions.txt"
printf 'step\trc\tmilliseconds\n' > "$OUT/steps.tsv"
step correctness 60 python3 scripts/gpu_correctness.py
SMALL="--virtual-heads 1 --calib-windows 8 --calib-window 512 --fit-steps 10 --eval-windows 4"
step compress_cuda 90 python3 -m mea compress smollm2 "$WORK/c-cuda" $SMALL --device cuda --dtype bf16 --skip-original-eval
step compress_cpu 90 python3 -m mea compress smollm2 "$WORK/c-cpu" $SMALL --device cpu --dtype fp32 --skip-original-eval
REC="--teacher smollm2 --tokens 16384 --seq-len 1024 --batch 2 --no-eval --save-every 100"
step recover_cuda 60 python3 -m mea recover "$WORK/c-cuda" "$WORK/r-cuda" $REC --device cuda
step recover_cpu 60 python3 -m mea recover "$WORK/c-cuda" "$WORK/r-cpu" --teacher smollm2 --tokens 4096 --seq-len 1024 \
  --batch 2 --no-eval --device cpu
for f in compress_cuda compress_cpu recover_cuda recover_cpu; do tail -n 40 "$OUT/$f.log" | sed -n '/^{/,/^}/p' > "$OUT/$f.json"; done
TOK=(); [ -d .whl/tokenizer ] && TOK=(--tokenizer .whl/tokenizer)  # SmolLM2's tokenizer files, where its package is absent
CALIB=(); [ -d .whl/calib ] && CALIB=(--calib .whl/calib)  # calibration text, where the Debian documentation is absent
step synthetic_1b 45 python3 scripts/make_synthetic_checkpoint.py "$WORK/llama1b" --shape llama3.2-1b "${TOK[@]}"
step stream_1b_cuda 60 python3 scripts/measure_streaming.py "$WORK/llama1b" "$OUT/streaming_1b_cuda.json" \
  --virtual-heads 4 --recover none --no-eval --calib-windows 16 --calib-window 512 --device cuda --dtype bf16 "${CALIB[@]}"
step decode_bench 120 python3 -m mea bench decode --device cuda --dtype bfloat16 --preset llama3.2-1b \
  --contexts 4096 32768 --budgets 0.5 0.25 --batches 1 8 --steps 20 --out "$OUT/decode_llama1b.json"
cat "$OUT/correctness.log" "$OUT/steps.tsv"
rm -rf "$WORK"
