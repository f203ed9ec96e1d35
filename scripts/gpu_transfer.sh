#!/usr/bin/env bash
# Issue #10 on a GPU in one command: masked LM from random weights for a wall-clock budget, then does it pay
# on a labelled task? The README's section "Pre-training that transfers" ran these stages on one H200:
#   1. data/prepare.py: raw text -> shards ($DATA) and held-out text (WikiText test) with their tokenizer
#   2. a 60-step trial of the recipe measures tokens/s, and --max-steps is set so that the run fills $MINUTES
#      (its linear decay ends where the budget does; evaluations and saves get 12 % of the time)
#   3. pretrain.py, the small-budget recipe with a GPU's batch: pre-LN with the embedding LayerNorm, no
#      dropout, 25 % masking, $BATCH windows a step, peak lr $LR, 6 % warm-up, bf16 ($OUT/mlm)
#   4. learning_curve.py: random init, that model, + TAPT on the task's own text, that model fine-tuned as a
#      cloze ($TEMPLATE, $VERBALIZER: finetune.py --task prompt), bag-of-words, on nested subsets of $TRAIN,
#      $SEEDS seeds, $JOBS fine-tunes side by side ($OUT/curve: table, curve.png/json; $ARMS picks the rows)
#
#   MINUTES=6 bash scripts/gpu_transfer.sh [OUT]          # default out/gpu-transfer
#
# A finished stage is skipped when the script runs again. On a CPU it runs too (AMP=none for tiny, AMP=bf16
# from mini up where the CPU has AMX: docs/pretraining.md; small BATCH; the --jobs fine-tunes share the cores),
# as the test does at a tiny size and the README's session-18 run did (MODEL=tiny AMP=none BATCH=128 MINUTES=85
# JOBS=2), but the point of it is the tokens a GPU gives in minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${PLAINBERT_DATA:-../shared/data}
OUT=${1:-out/gpu-transfer}
MODEL=${MODEL:-mini}
MINUTES=${MINUTES:-6}
BATCH=${BATCH:-512}
LR=${LR:-2e-3}
AMP=${AMP:-bf16}
SEQ_LEN=${SEQ_LEN:-128}
TRAIN=${TRAIN:-"$SHARED/sst2/train.tsv"}
DEV=${DEV:-"$SHARED/sst2/dev.tsv"}
SIZES=${SIZES:-"500 1000 4000 16000 all"}
SEEDS=${SEEDS:-3}
JOBS=${JOBS:-9}
TAPT_STEPS=${TAPT_STEPS:-600}
TAPT_SEQ_LEN=${TAPT_SEQ_LEN:-128}
FT_MIN_STEPS=${FT_MIN_STEPS:-300}
FT_MAX_STEPS=${FT_MAX_STEPS:-1000}
ARMS=${ARMS:-random,pretrained,tapt,prompt,bow}
TEMPLATE=${TEMPLATE:-"{text} It was [MASK] ."}
VERBALIZER=${VERBALIZER:-terrible,great}
mkdir -p "$OUT"

# 1. shards and the held-out text (scripts/shards.sh)
source scripts/shards.sh

RECIPE=(--data "$DATA" --model "$MODEL" --norm pre --embedding-norm --dropout 0 --mask-rate 0.25 --seq-len "$SEQ_LEN"
        --batch-size "$BATCH" --lr "$LR" --warmup 0.06 --amp "$AMP" --no-progress)
if [ ! -f "$OUT/mlm.done" ]; then
    # 2. the trial: tokens/s over its last 20 steps (the first ones pay for start-up), then the step count
    rm -rf "$OUT/trial" "$OUT/mlm"
    say "a 60-step trial of the recipe -> $OUT/trial"
    python pretrain.py "${RECIPE[@]}" --max-steps 60 --eval-every 0 --save-every 0 --log-every 20 --out "$OUT/trial" \
        > "$OUT/trial.log" 2>&1 || { tail -n 5 "$OUT/trial.log"; exit 1; }
    STEPS=$(python - "$OUT/trial/metrics.jsonl" "$MINUTES" "$BATCH" "$SEQ_LEN" <<'PY'
import json, sys
path, minutes, batch, seq_len = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
speed = [json.loads(line) for line in open(path) if '"tokens_per_s"' in line][-1]["tokens_per_s"]
print(max(10, int(0.88 * minutes * 60 * speed / (batch * seq_len))))
PY
)
    say "$MINUTES minutes at the trial's speed: $STEPS steps of $BATCH x $SEQ_LEN tokens"
    # 3. the run (a stopped one is not resumed here: the step count belongs to the machine that measured it)
    python pretrain.py "${RECIPE[@]}" "${EVAL[@]}" --max-steps "$STEPS" --eval-every $(( (STEPS + 9) / 10 )) \
        --eval-batches 20 --save-every $(( (STEPS + 3) / 4 )) --log-every 50 --out "$OUT/mlm" > "$OUT/mlm.log" 2>&1 \
        || { tail -n 5 "$OUT/mlm.log"; exit 1; }
    grep -E "eval/" "$OUT/mlm.log" | tail -n 1 || true
    touch "$OUT/mlm.done"
fi

# 4. the learning curve (finished runs are kept: a second call only runs what is missing)
say "learning curve on $TRAIN -> $OUT/curve"
# shellcheck disable=SC2086   # SIZES is a list
python learning_curve.py --train "$TRAIN" --dev "$DEV" --pretrained "$OUT/mlm" --arms "$ARMS" \
    --pooling mean --lr 3e-4 --min-steps "$FT_MIN_STEPS" --max-steps "$FT_MAX_STEPS" --tapt-steps "$TAPT_STEPS" \
    --tapt-seq-len "$TAPT_SEQ_LEN" --template "$TEMPLATE" --verbalizer "$VERBALIZER" --sizes $SIZES --seeds "$SEEDS" \
    --jobs "$JOBS" --out "$OUT/curve"
