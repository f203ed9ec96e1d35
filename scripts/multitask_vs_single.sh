#!/usr/bin/env bash
# Multi-task against single-task at the same budget: one `finetune.py --tasks` run on SST-2 + STS-B + CoLA,
# then one single-task run per task with exactly the steps that task got in the multi-task run (read from
# its metrics.json), so the three single-task runs together train as many steps of as many examples as the
# multi-task run, and each task reads the same batches in both (TaskDataset's batches depend on the data,
# the batch size and the seed only). Every run evaluates once, at the end: the last weights, no dev-set
# selection.
#
#   bash scripts/multitask_vs_single.sh INIT SST2_TRAIN [STEPS] [SEEDS] [OUT]   # default 600 steps, 1 seed, out/mt-vs-st
#
# SST2_TRAIN: all of SST-2 or a subset (the README's table: its first 8,000 sentences); the dev sets are the
# full GLUE ones under $PLAINBERT_DATA (default ../shared/data). One thread, one run at a time; a seed whose
# four runs finished is not rerun. The table (median over seeds, and each seed) is printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
INIT=$1 SST2=$2 STEPS=${3:-600} SEEDS=${4:-1} OUT=${5:-out/mt-vs-st}
D=${PLAINBERT_DATA:-../shared/data}
C=$D/cola/cola_public/raw
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
COMMON=(--init "$INIT" --eval-every 0 --save-every 0 --log-every 50 --no-progress)
declare -A TRAIN=([sst2]=$SST2 [stsb]=$D/stsb/train.tsv [cola]=$C/in_domain_train.tsv)
declare -A DEV=([sst2]=$D/sst2/dev.tsv [stsb]=$D/stsb/dev.tsv [cola]=$C/in_domain_dev.tsv)
declare -A KIND=([sst2]=binary [stsb]=regression [cola]=binary)
NAMES=(sst2 stsb cola)

mkdir -p "$OUT"
for ((s = 1; s <= SEEDS; s++)); do
  seed=$((1336 + s)) dir=$OUT/seed$s
  if [ ! -f "$dir/multi/metrics.json" ]; then
    rm -rf "$dir/multi"
    specs=()
    for n in "${NAMES[@]}"; do specs+=("$n:${KIND[$n]}:${TRAIN[$n]}:${DEV[$n]}"); done
    t0=$SECONDS
    python finetune.py "${COMMON[@]}" --tasks "${specs[@]}" --max-steps "$STEPS" --seed "$seed" \
        --out "$dir/multi" > "$dir.multi.log" 2>&1
    rm -f "$dir"/multi/*.pt
    echo "seed $s multi-task: $STEPS steps in $((SECONDS - t0)) s"
  fi
  for n in "${NAMES[@]}"; do
    [ -f "$dir/$n/metrics.json" ] && continue
    rm -rf "${dir:?}/$n"
    steps=$(python -c "import json, sys; print(json.load(open(sys.argv[1]))['tasks'][sys.argv[2]]['steps'])" \
        "$dir/multi/metrics.json" "$n")
    t0=$SECONDS
    python finetune.py "${COMMON[@]}" --task "${KIND[$n]}" --train "${TRAIN[$n]}" --dev "${DEV[$n]}" \
        --max-steps "$steps" --seed "$seed" --out "$dir/$n" > "$dir.$n.log" 2>&1
    rm -f "$dir/$n"/*.pt
    echo "seed $s single-task $n: $steps steps in $((SECONDS - t0)) s"
  done
done

python - "$OUT" <<'EOF'
import json, pathlib, statistics, sys
out = pathlib.Path(sys.argv[1])
metric = {"sst2": "accuracy", "stsb": "spearman", "cola": "mcc"}
seeds = sorted(p for p in out.glob("seed*") if (p / "cola" / "metrics.json").is_file())
rows = {"multi-task": [], "single-task": []}
for p in seeds:
    multi = json.loads((p / "multi" / "metrics.json").read_text())
    rows["multi-task"].append({n: multi["tasks"][n]["dev"][m] for n, m in metric.items()})
    rows["single-task"].append({n: json.loads((p / n / "metrics.json").read_text())["dev_last"][m] for n, m in metric.items()})
    steps = {n: multi["tasks"][n]["steps"] for n in metric}
    print(f"{p.name}: steps per task {steps}")
print(f"| dev, median of {len(seeds)} seed(s) | SST-2 accuracy | STS-B Spearman | CoLA MCC | average |")
print("|---|---:|---:|---:|---:|")
for name, runs in rows.items():
    med = {n: statistics.median(r[n] for r in runs) for n in metric}
    print(f"| {name} | " + " | ".join(f"{med[n]:.4f}" for n in metric) + f" | {statistics.mean(med.values()):.4f} |")
for name, runs in rows.items():
    for p, r in zip(seeds, runs):
        print(f"  {name} {p.name}: " + ", ".join(f"{n} {v:.4f}" for n, v in r.items()))
EOF
