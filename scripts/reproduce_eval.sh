#!/usr/bin/env bash
# Regenerate the committed evaluation results of the embedded SmolLM2-135M-Instruct on a GPU:
# perplexity (2k/4k/8k), needle grid (4 lengths x 5 depths x 3 trials), passkey (up to 8k, 10 trials),
# and the end-to-end benchmark (4k..32k, RoPE linear x4 to reach 32k).
#
#   bash scripts/reproduce_eval.sh [BOOKS_DIR] [OUT_DIR]      (defaults: ../shared/data/books, results/eval/<gpu>)
#   STEPS="ppl needle" bash scripts/reproduce_eval.sh ...      (a subset of: ppl needle passkey e2e seer)
#   "seer": the shipped SeerAttention gates at densities 0.5/0.2/0.1 (their default calibrated allocation,
#   and 0.2/0.1 with the uniform one), threshold 0.012 and the oracle (8k perplexity), densities 0.2/0.1
#   and threshold 0.012 (needle), and the whole-model prefill at 8k-32k, into $OUT/seer
#
# Evaluation text is held out from training: pride_and_prejudice.txt and news_from_nowhere.txt are
# only ever evaluated on; the recipes train on the other books.
set -u
books=${1:-../shared/data/books}
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().split()[-1].lower())")
out=${2:-results/eval/smollm2-$gpu}
held=("$books/pride_and_prejudice.txt" "$books/news_from_nowhere.txt")
mkdir -p "$out"
steps=" ${STEPS:-ppl needle passkey e2e seer} "
run() { echo "+ $*" >&2; timeout 900 python -m attn_patch.cli "$@"; }
want() { [[ $steps == *" $1 "* ]]; }
want ppl && run eval ppl --data "${held[@]}" --lengths 2048 4096 8192 --method sdpa --method flash --out "$out" \
  > "$out/perplexity.log" 2>&1
want needle && run eval needle --haystack "${held[@]}" --lengths 1024 2048 4096 8192 --depths 0 25 50 75 100 --trials 3 \
  --method sdpa --method flash --out "$out" > "$out/needle.log" 2>&1
want passkey && run eval passkey --lengths 1024 2048 4096 8192 --trials 10 --method sdpa --method flash --out "$out" \
  > "$out/passkey.log" 2>&1
want e2e && run bench e2e --lengths 4096 8192 16384 32768 --rope-scaling linear:4 --decode-tokens 32 \
  --method sdpa-flash --method sdpa-cudnn --method flash --results "$out/e2e.csv" --out "$out" \
  > "$out/e2e.log" 2>&1
if want seer; then
  mkdir -p "$out/seer"
  run eval ppl --data "${held[@]}" --lengths 8192 --method flash --method seer:density=0.5 --method seer:density=0.2 \
    --method seer:density=0.1 --method seer:density=0.2,allocation=uniform --method seer:density=0.1,allocation=uniform \
    --method seer:threshold=0.012 --method seer:density=0.1,oracle=true,allocation=uniform \
    --method seer:density=0.1,oracle=true --out "$out/seer" > "$out/seer/perplexity.log" 2>&1
  run eval needle --haystack "${held[@]}" --lengths 1024 2048 4096 8192 --depths 0 25 50 75 100 --trials 3 \
    --method flash --method seer:density=0.2 --method seer:density=0.1 --method seer:threshold=0.012 \
    --out "$out/seer" > "$out/seer/needle.log" 2>&1
  run bench e2e --lengths 8192 16384 32768 --rope-scaling linear:4 --decode-tokens 8 --reps 10 --method sdpa-flash \
    --method sdpa-cudnn --method flash --method seer:density=0.1 --method seer:density=0.2 \
    --method seer:density=0.1,allocation=uniform --method seer:threshold=0.012 --results "$out/seer/e2e.csv" \
    --out "$out/seer" > "$out/seer/e2e.log" 2>&1
fi
echo "results in $out" >&2
