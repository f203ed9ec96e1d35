#!/usr/bin/env bash
# The small-budget pre-training recipe, one change at a time: each row trains the same number of tokens
# (the shape rows: the same training FLOPs) on data/wiki and reports the MLM validation loss at a fixed 15 %
# masking, so rows trained at other mask rates are scored on the same task.
#
#   bash scripts/recipe_sweep.sh [STEPS] [OUT]      # default 300 steps of 16 x 128 tokens per row, out/sweep
#
# Needs data/wiki (README: "The documented pre-training run"). One thread per run, one run at a time.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-300}
OUT=${2:-out/sweep}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# the recipe: pre-LN, no dropout, 25 % masking, peak lr 1e-3, 6 % warm-up then linear decay to 0 at the budget
BASE=(--data data/wiki --seq-len 128 --batch-size 16 --eval-batches 20 --eval-mask-rate 0.15 --save-every 0
      --eval-every 0 --log-every 50 --no-progress --warmup 0.06)
RECIPE=(--norm pre --dropout 0 --mask-rate 0.25 --lr 1e-3)

row() {   # name, steps, then the flags that differ from the recipe
  local name=$1 steps=$2; shift 2
  [ -f "$OUT/$name/metrics.jsonl" ] && grep -q eval/loss "$OUT/$name/metrics.jsonl" && return
  rm -rf "$OUT/$name"
  local t0=$SECONDS
  python pretrain.py "${BASE[@]}" --model mini "${RECIPE[@]}" "$@" --max-steps "$steps" --out "$OUT/$name" \
      > "$OUT/$name.log" 2>&1
  echo "{\"row\": \"$name\", \"seconds\": $((SECONDS - t0))}" > "$OUT/$name/row.json"
  echo "$name: $(grep -o 'eval/loss [0-9.]*' "$OUT/$name.log" | tail -1) ($((SECONDS - t0)) s)"
}

mkdir -p "$OUT"
row recipe          "$STEPS"
row post-ln         "$STEPS" --norm post
row dropout-0.1     "$STEPS" --dropout 0.1
row mask-0.15       "$STEPS" --mask-rate 0.15
row mask-0.40       "$STEPS" --mask-rate 0.40
row lr-5e-4         "$STEPS" --lr 5e-4
row lr-2e-3         "$STEPS" --lr 2e-3
row batch-32-accum  $((STEPS / 2)) --grad-accum 2
row constant-lr     "$STEPS" --schedule constant
# shapes at equal training FLOPs (6 N per token, N = non-embedding weights + the decoder on the masked
# 25 %): tiny 2x128 ~0.65 M, mini 4x256 ~3.6 M, small 4x512 ~13.6 M
row shape-tiny      $((STEPS * 55 / 10)) --model tiny
row shape-small     $((STEPS * 36 / 136)) --model small
python - "$OUT" <<'PY'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = []
for d in sorted(p for p in out.iterdir() if (p / "row.json").is_file()):
    log = [json.loads(l) for l in open(d / "metrics.jsonl")]
    ev = [r for r in log if "eval/loss" in r][-1]
    steps = max(r["step"] for r in log)
    rows.append({"row": d.name, "steps": steps, "val_loss_at_15pct": ev["eval/loss"], "val_accuracy": ev["eval/accuracy"],
                 **json.loads((d / "row.json").read_text())})
base = next((r for r in rows if r["row"] == "recipe"), None)
for r in rows:
    r["delta"] = r["val_loss_at_15pct"] - base["val_loss_at_15pct"] if base else None
(out / "sweep.json").write_text(json.dumps(rows, indent=1))
print(f"{'row':16} {'steps':>6} {'val loss':>9} {'vs recipe':>10} {'acc':>6} {'s':>5}")
for r in rows:
    print(f"{r['row']:16} {r['steps']:>6} {r['val_loss_at_15pct']:9.3f} {r['delta']:+10.3f} {100*r['val_accuracy']:5.1f}% {r['seconds']:>5}")
PY
