#!/usr/bin/env bash
# Continue-tune the embedded SmolLM2-135M-Instruct into MoH at 75% and 50% of the query heads, and the
# dense model on the same tokens (the baseline), then measure held-out perplexity at 8k tokens for
# each and for the untouched model, uncalibrated and calibrated (one H200: ~12 min).
#
#   bash scripts/train_moh.sh [BOOKS_DIR] [RUN_DIR]
#       (defaults: ../shared/data/books, runs/moh-smollm2; STEPS=300 SEQ=8192 LR=5e-5 ROUTER=norm)
#
# Training text: moby_dick, jack_sheppard and tinyshakespeare; pride_and_prejudice and
# news_from_nowhere are held out (the recipe refuses them) and are what perplexity is measured on.
# Each run is evaluated as soon as it is trained, MoH 75% first (the acceptance run).
set -euo pipefail
books=${1:-../shared/data/books}
out=${2:-runs/moh-smollm2}
train=("$books/moby_dick.txt" "$books/jack_sheppard.txt" "$books/tinyshakespeare.txt")
held=("$books/pride_and_prejudice.txt" "$books/news_from_nowhere.txt")
common=(--data "${train[@]}" --seq-len "${SEQ:-8192}" --lr "${LR:-5e-5}" --warmup 20 --save-every 0 --log-every 10)
run() { accelerate launch --config_file recipes/configs/single_gpu.yaml recipes/moh_train.py "${common[@]}" "$@"; }
ppl() { python scripts/eval_perplexity.py --data "${held[@]}" --lengths 8192 "$@"; }
# the untouched model: dense, MoH with the first heads shared, MoH with calibrated routers (--steps 0)
run --steps 0 --router "${ROUTER:-norm}" --active 0.75 --no-save-model --out "$out/calib75"
run --steps 0 --router "${ROUTER:-norm}" --active 0.5 --no-save-model --out "$out/calib50"
ppl --method flash --method moh:active=0.75 --method "moh:routers=$out/calib75/routers" --method moh:active=0.5 \
    --method "moh:routers=$out/calib50/routers" --out "$out/eval/ppl-untouched"
run --steps "${STEPS:-300}" --router "${ROUTER:-norm}" --active 0.75 --out "$out/moh75"
ppl --model "$out/moh75/model" --method "moh:routers=$out/moh75/routers" --out "$out/eval/ppl-moh75"
run --steps "${STEPS:-300}" --dense --out "$out/dense"
ppl --model "$out/dense/model" --method flash --out "$out/eval/ppl-dense-tuned"
run --steps "${STEPS:-300}" --router "${ROUTER:-norm}" --active 0.5 --out "$out/moh50"
ppl --model "$out/moh50/model" --method "moh:routers=$out/moh50/routers" --out "$out/eval/ppl-moh50"
