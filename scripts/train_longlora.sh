#!/usr/bin/env bash
# Extend the embedded SmolLM2-135M-Instruct from 8k to 32k tokens with the LongLoRA recipe, merge it,
# and evaluate it against the same model with the same RoPE scaling and no training (one GPU, ~10 min).
#
#   bash scripts/train_longlora.sh [BOOKS_DIR] [RUN_DIR]
#       (defaults: ../shared/data/books, runs/longlora-smollm2; RS=theta:1e6:4 MIX=0.5 STEPS=300
#        LR=1e-4 TRIALS=20)
#
# Training text: moby_dick, jack_sheppard and tinyshakespeare; pride_and_prejudice and
# news_from_nowhere are held out (the recipe refuses them) and are what perplexity is measured on.
# RoPE: the rotary base raised from 1e5 to 1e6 (RS, any --rope-scaling value). MIX: the share of the
# training windows with made-up facts hidden in the book text and questions about them at the end
# (--retrieval-mix; 0 trains on the books alone). Passkey: TRIALS prompts per length.
set -euo pipefail
books=${1:-../shared/data/books}
out=${2:-runs/longlora-smollm2}
rs=${RS:-theta:1e6:4}
trials=${TRIALS:-20}
accelerate launch --config_file recipes/configs/single_gpu.yaml recipes/longlora_train.py \
  --data "$books/moby_dick.txt" "$books/jack_sheppard.txt" "$books/tinyshakespeare.txt" \
  --rope-scaling "$rs" --seq-len 32768 --steps "${STEPS:-300}" --lr "${LR:-1e-4}" --warmup 10 \
  --retrieval-mix "${MIX:-0.5}" --save-every 100 --log-every 5 --out "$out" --merge
held=("$books/pride_and_prejudice.txt" "$books/news_from_nowhere.txt")
lengths=(1024 2048 4096 8192 16384 32768)
python scripts/eval_perplexity.py --model "$out/merged" --data "${held[@]}" --lengths 8192 16384 32768 \
  --method flash --out "$out/eval/ppl-extended"
python scripts/eval_perplexity.py --rope-scaling "$rs" --data "${held[@]}" --lengths 8192 16384 32768 \
  --method flash --out "$out/eval/ppl-untrained"
python scripts/eval_passkey.py --model "$out/merged" --lengths "${lengths[@]}" --trials "$trials" --method flash \
  --out "$out/eval/passkey-extended"
python scripts/eval_passkey.py --rope-scaling "$rs" --lengths "${lengths[@]}" --trials "$trials" --method flash \
  --out "$out/eval/passkey-untrained"
