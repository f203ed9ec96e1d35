# Sourced by scripts/transfer_curve.sh and scripts/gpu_transfer.sh: their first stage. Raw text -> shards in
# $DATA (skipped when $DATA already holds them, e.g. the README's documented run prepared data/wiki) and the
# held-out text, tokenized alike, in $HELDOUT_DATA; sets EVAL to pretrain.py's flags for the held-out shards.
SHARED=${SHARED:-${PLAINBERT_DATA:-../shared/data}}
TEXT=${TEXT:-"$SHARED/wiki/text $SHARED/books"}          # raw text: files or folders (data/prepare.py --input)
HELDOUT=${HELDOUT-"$SHARED/wikitext/wiki.test.raw"}       # held-out text scored at every evaluation ("": none)
DATA=${DATA:-data/wiki}                                   # shards of TEXT (reused when already prepared)
HELDOUT_DATA=${HELDOUT_DATA:-data/wikitext-test}
VOCAB=${VOCAB:-8192}
say() { echo "== $(date +%H:%M:%S) $*"; }

# shellcheck disable=SC2086   # TEXT is a list of paths
[ -f "$DATA/meta.json" ] || { say "prepare $TEXT -> $DATA"; python data/prepare.py --input $TEXT --out "$DATA" --vocab-size "$VOCAB"; }
EVAL=()
if [ -n "$HELDOUT" ]; then
    [ -f "$HELDOUT_DATA/meta.json" ] || { say "prepare $HELDOUT -> $HELDOUT_DATA";
        python data/prepare.py --input "$HELDOUT" --out "$HELDOUT_DATA" --val-only --tokenizer "$DATA"; }
    EVAL=(--eval-data "$HELDOUT_DATA")
fi
