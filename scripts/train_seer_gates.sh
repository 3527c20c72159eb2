#!/usr/bin/env bash
# Train the SeerAttention gates shipped for the embedded SmolLM2-135M-Instruct (one GPU, a few minutes).
#
#   bash scripts/train_seer_gates.sh [BOOKS_DIR] [RUN_DIR]
#       (defaults: ../shared/data/books, runs/seer-smollm2); the gates (safetensors + config.json)
#       and their calibration (calibration.json: the recipe's --calibrate-windows, 8 training windows)
#       are then copied to attn_patch/seer/gates/smollm2-135m-instruct/ unless SHIP=0
#
# Training text: moby_dick, jack_sheppard and tinyshakespeare. pride_and_prejudice and
# news_from_nowhere are held out for the evaluations (the recipe refuses them).
set -euo pipefail
books=${1:-../shared/data/books}
out=${2:-runs/seer-smollm2}
ship=attn_patch/seer/gates/smollm2-135m-instruct
accelerate launch --config_file recipes/configs/single_gpu.yaml recipes/seer_distill.py \
  --data "$books/moby_dick.txt" "$books/jack_sheppard.txt" "$books/tinyshakespeare.txt" \
  --seq-len 8192 --batch-size "${BATCH:-2}" --steps "${STEPS:-500}" --lr "${LR:-2e-3}" --warmup 20 \
  --block-size 64 --save-dtype bfloat16 --save-every 0 --log-every 10 --out "$out" "${@:3}"
if [ "${SHIP:-1}" = 1 ]; then
  mkdir -p "$ship" && cp "$out/gates.safetensors" "$out/config.json" "$out/calibration.json" "$ship/"
  echo "shipped gates in $ship"
fi
