#!/usr/bin/env bash
# Issue #10 in one command: pre-train here, then ask whether it pays on a labelled task. The stages are the
# best of the earlier CPU pipelines (docs/pretraining.md, "Earlier CPU runs (sessions 5–22)"; the README's documented run
# since is plain masked LM on mini for 229 M tokens):
#   1. data/prepare.py: raw text -> a SentencePiece vocabulary and token shards ($DATA), and held-out text
#      (WikiText test) with the same tokenizer ($HELDOUT_DATA)
#   2. word_vectors.py: co-occurrence counts -> PPMI -> SVD, written into the word embeddings of a fresh pre-LN
#      model with an embedding LayerNorm ($OUT/wv; docs/pretraining.md#word-vectors)
#   3. pretrain.py --freeze-embeddings: masked LM on top of that frozen table, the small-budget recipe (no
#      dropout, 25 % masking, 6 % warm-up then linear decay to 0): a cycle of $STEPS1 steps at peak lr 1e-3
#      ($OUT/mlm), then one of $STEPS2 at 5e-4 with another seed, so other windows and masks ($OUT/mlm-2)
#   4. learning_curve.py: that model ("pretrained"), the word vectors alone ("word-vectors") and a random-init
#      copy of the same architecture ("random"), fine-tuned on the same nested subsets of $TRAIN with one
#      recipe (mean pooling, lr 3e-4, 3 epochs within 300-1,000 steps, $SEEDS seeds: the median), against
#      bag-of-words ("bow"): the table, curve.png and curve.json in $OUT/curve
#
#   bash scripts/transfer_curve.sh [OUT]          # default out/transfer
#
# On this project's 2-core CPU with one thread: prepare ~2 min, word vectors ~2 min, masked LM ~70 min,
# then 27 fine-tunes of 3-5 min: about 3 hours. A stage that finished is skipped when the script runs again
# (a pre-training cycle that was stopped resumes from its checkpoint; learning_curve.py keeps finished runs),
# so an interrupted run picks up where it stopped. Settings come from the environment, e.g. a bigger budget
# on a GPU (every script picks cuda when there is one):
#   STEPS1=20000 STEPS2=10000 BATCH=128 SIZES="500 1000 4000 16000 all" bash scripts/transfer_curve.sh out/gpu
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${PLAINBERT_DATA:-../shared/data}
OUT=${1:-out/transfer}
MODEL=${MODEL:-mini}
STEPS1=${STEPS1:-2000}
STEPS2=${STEPS2:-1000}
BATCH=${BATCH:-32}
SEQ_LEN=${SEQ_LEN:-128}
TRAIN=${TRAIN:-"$SHARED/sst2/train.tsv"}                  # any binary (or multi-class) file finetune.py reads
DEV=${DEV:-"$SHARED/sst2/dev.tsv"}
SIZES=${SIZES:-"500 1000 4000"}
SEEDS=${SEEDS:-3}
FT_MIN_STEPS=${FT_MIN_STEPS:-300}
FT_MAX_STEPS=${FT_MAX_STEPS:-1000}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT"

# 1. shards and the held-out text (scripts/shards.sh)
source scripts/shards.sh

# 2. word vectors (a minute or two: redone from the start if a previous run stopped inside it)
if [ ! -f "$OUT/wv.done" ]; then
    say "word vectors -> $OUT/wv"
    rm -rf "$OUT/wv"
    python word_vectors.py --data "$DATA" --model "$MODEL" --norm pre --embedding-norm --out "$OUT/wv" > "$OUT/wv.log"
    tail -n 3 "$OUT/wv.log"
    touch "$OUT/wv.done"
fi

# 3. masked LM on the frozen word vectors, two cycles; a cycle with a checkpoint but no .done marker resumes
RECIPE=(--freeze-embeddings --data "$DATA" "${EVAL[@]}" --dropout 0 --mask-rate 0.25 --seq-len "$SEQ_LEN"
        --batch-size "$BATCH" --warmup 0.06 --eval-every 250 --eval-batches 20 --save-every 250 --no-progress)
cycle() {   # name, --init folder, then the flags of this cycle
    local name=$1 init=$2; shift 2
    [ -f "$OUT/$name.done" ] && return
    if [ -f "$OUT/$name/checkpoint.pt" ]; then
        say "masked LM $OUT/$name: resuming its checkpoint"
        python pretrain.py --resume "${RECIPE[@]}" "$@" --out "$OUT/$name" >> "$OUT/$name.log" 2>&1
    else
        say "masked LM $init -> $OUT/$name"
        python pretrain.py --init "$init" "${RECIPE[@]}" "$@" --out "$OUT/$name" > "$OUT/$name.log" 2>&1
    fi
    grep -E "eval/" "$OUT/$name.log" | tail -n 1 || true
    touch "$OUT/$name.done"
}
cycle mlm "$OUT/wv" --lr 1e-3 --max-steps "$STEPS1"
cycle mlm-2 "$OUT/mlm" --lr 5e-4 --max-steps "$STEPS2" --seed 7

# 4. the learning curve
say "learning curve on $TRAIN -> $OUT/curve"
# shellcheck disable=SC2086   # SIZES is a list
python learning_curve.py --train "$TRAIN" --dev "$DEV" --pretrained "$OUT/mlm-2" --also word-vectors="$OUT/wv" \
    --arms random,pretrained,also,bow --pooling mean --lr 3e-4 --also-lr 3e-4 --min-steps "$FT_MIN_STEPS" \
    --max-steps "$FT_MAX_STEPS" --sizes $SIZES --seeds "$SEEDS" --out "$OUT/curve"
