#!/usr/bin/env bash
# Continue-tune the embedded SmolLM2-135M-Instruct into MoH at 75% and 50% of the query heads, and the
# dense model on the same tokens (the baseline), then measure held-out perplexity at 8k tokens for
# each and for the untouched model (one GPU, ~10 min).
#
#   bash scripts/train_moh.sh [BOOKS_DIR] [RUN_DIR]
#       (defaults: ../shared/data/books, runs/moh-smollm2; STEPS=300 SEQ=8192 LR=5e-5 ROUTER=norm)
#
# Training text: moby_dick, jack_sheppard and tinyshakespeare; pride_and_prejudice and
# news_from_nowhere are held out (the recipe refuses them) and are what perplexity is measured on.
set -euo pipefail
books=${1:-../shared/data/books}
out=${2:-runs/moh-smollm2}
train=("$books/moby_dick.txt" "$books/jack_sheppard.txt" "$books/tinyshakespeare.txt")
held=("$books/pride_and_prejudice.txt" "$books/news_from_nowhere.txt")
common=(--data "${train[@]}" --seq-len "${SEQ:-8192}" --steps "${STEPS:-300}" --lr "${LR:-5e-5}" --warmup 20
        --save-every 0 --log-every 10)
run() { accelerate launch --config_file recipes/configs/single_gpu.yaml recipes/moh_train.py "$@"; }
run "${common[@]}" --dense --out "$out/dense"
run "${common[@]}" --router "${ROUTER:-norm}" --active 0.75 --out "$out/moh75"
run "${common[@]}" --router "${ROUTER:-norm}" --active 0.5 --out "$out/moh50"
ppl() { python scripts/eval_perplexity.py --data "${held[@]}" --lengths 8192 "$@"; }
ppl --method flash --method moh:active=0.75 --method moh:active=0.5 --out "$out/eval/ppl-untouched"
ppl --model "$out/dense/model" --method flash --out "$out/eval/ppl-dense-tuned"
ppl --model "$out/moh75/model" --method "moh:routers=$out/moh75/routers" --out "$out/eval/ppl-moh75"
ppl --model "$out/moh50/model" --method "moh:routers=$out/moh50/routers" --out "$out/eval/ppl-moh50"
