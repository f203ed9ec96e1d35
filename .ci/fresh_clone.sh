#!/usr/bin/env bash
# The README's two set-up commands, exactly, in a fresh virtualenv from a fresh clone of this checkout's
# HEAD, then the Quickstart with its README examples checked. Slow (it downloads torch and pre-trains):
# run it by hand before a release, not in CI.    usage: bash .ci/fresh_clone.sh [WORKDIR]
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d)}"
git clone -q "$src" "$work/plainbert"
cd "$work/plainbert"
python3 -m venv .venv
. .venv/bin/activate
# the two commands of README.md "Start here", pulled out of the README so that they cannot drift
mapfile -t cmds < <(awk '/^## Start here/{on=1} on && /^```bash/{code=1; next} code && /^```/{exit} code && !/^#/' README.md)
[ "${#cmds[@]}" -eq 2 ] || { echo "expected two commands in README 'Start here', found ${#cmds[@]}"; exit 1; }
for c in "${cmds[@]}"; do echo "+ $c"; bash -c "$c"; done
# the Quickstart's end: the README's two examples labelled right
python finetune.py --task binary
python predict.py out/finetune "a gripping, funny film" "dull and far too long" --format jsonl | python -c '
import json, sys
rows = [json.loads(line) for line in sys.stdin]
assert [r["label"] for r in rows] == ["1", "0"], rows
print("quickstart: both README examples labelled right")'
