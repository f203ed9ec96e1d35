#!/usr/bin/env bash
# The README's two set-up commands, exactly, in a fresh virtualenv from a fresh clone of this checkout's
# HEAD, then the Quickstart with its README examples checked. .ci/run runs it after the suite, with the
# test command narrowed (the suite itself ran there already).    usage: bash .ci/fresh_clone.sh [WORKDIR]
# The test command runs as README writes it; PYTEST_ADDOPTS (read by pytest itself) can narrow it on a slow
# machine, e.g. PYTEST_ADDOPTS="-k 'test_cli or test_docs'" bash .ci/fresh_clone.sh
set -euo pipefail
src="$(cd "$(dirname "$0")/.." && pwd)"
work="${1:-$(mktemp -d)}"
git clone -q "$src" "$work/plainbert"
cd "$work/plainbert"
python3 -m venv .venv
. .venv/bin/activate
# The torch pin first, as README says to (and .ci/run does): requirements.txt's unpinned torch>=2.4 would
# otherwise pull the newest CUDA build and its nvidia-* wheels (GBs). 2.13.0 resolves to the CPU build
# that lies in pip's find-links on the CI machines; elsewhere, PyTorch's CPU index supplies it.
python -m pip install -q torch==2.13.0+cpu 2>/dev/null ||
    python -m pip install -q torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
python -c 'import torch; assert torch.version.cuda is None, torch.__version__; print("torch", torch.__version__, "(CPU build)")'
# the two commands of README.md "Start here", pulled out of the README so that they cannot drift
mapfile -t cmds < <(awk '/^## Start here/{on=1} on && /^```bash/{code=1; next} code && /^```/{exit} code && !/^#/' README.md)
[ "${#cmds[@]}" -eq 2 ] || { echo "expected two commands in README 'Start here', found ${#cmds[@]}"; exit 1; }
for c in "${cmds[@]}"; do echo "+ $c"; start=$SECONDS; bash -c "$c"; echo "(took $((SECONDS - start)) s)"; done
# the Quickstart's end: the README's two examples labelled right
python finetune.py --task binary
python predict.py out/finetune "a gripping, funny film" "dull and far too long" --format jsonl | python -c '
import json, sys
rows = [json.loads(line) for line in sys.stdin]
assert [r["label"] for r in rows] == ["1", "0"], rows
print("quickstart: both README examples labelled right")'
