"""Training curves as a picture: metrics.jsonl (the trainer's log) -> curves.png.

    python plots.py out/finetune            # writes out/finetune/curves.png

Left panel: the training loss per logged step and every evaluation loss ("eval/loss",
"eval/wikitext-test/loss", ...). Right panel: the other evaluation series ("eval/accuracy", ...); perplexity
is the exponential of a loss already drawn, so it is left out. pretrain.py and finetune.py call `plot_metrics` at
the end of a run. matplotlib is optional (requirements-dev.txt): without it the run says so in one line and
writes no picture. Nothing here imports torch.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

PNG_NAME = "curves.png"


def read_series(metrics_path) -> dict[str, tuple[list[int], list[float]]]:
    """{name: (steps, values)} of every numeric field worth plotting: the training "loss" and each "eval/..."."""
    series: dict[str, tuple[list[int], list[float]]] = {}
    with open(metrics_path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{metrics_path}:{n}: not a JSON line") from None
            for key, value in record.items():
                if (key == "loss" or key.startswith("eval/")) and isinstance(value, (int, float)):
                    steps, values = series.setdefault(key, ([], []))
                    steps.append(record["step"])
                    values.append(float(value))
    return series


def plot_metrics(run_dir, out=None, title=None) -> str | None:
    """Write run_dir/curves.png (or `out`) from run_dir/metrics.jsonl; the path, or None (with a one-line
    note) when matplotlib is missing or there is nothing to plot."""
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(metrics):
        print(f"no curves: {metrics} not found")
        return None
    series = read_series(metrics)
    if not series:
        print(f"no curves: {metrics} has no loss or eval values yet")
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")                        # files only: no display needed, none opened
        import matplotlib.pyplot as plt
    except ImportError:
        print("no curves: matplotlib is not installed (pip install matplotlib)")
        return None
    # left: every loss (training and evaluation: one scale); right: the other evaluation series
    # (accuracy, F1, ...). Perplexity is exp(loss), already on the left, so it is not drawn twice.
    losses = ["loss"] * ("loss" in series) + sorted(k for k in series if k.startswith("eval/") and k.endswith("loss"))
    others = sorted(k for k in series if k.startswith("eval/") and not k.endswith(("loss", "ppl")))
    fig, axes = plt.subplots(1, 2 if others else 1, figsize=(11 if others else 6, 4), squeeze=False)
    left = axes[0][0]
    for key in losses:
        left.plot(*series[key], label="train loss" if key == "loss" else key, marker=None if key == "loss" else "o")
    left.set(xlabel="step", ylabel="loss", title="loss")
    left.legend()
    if others:
        right = axes[0][1]
        for key in others:
            right.plot(*series[key], marker="o", label=key)
        right.set(xlabel="step", title="evaluation")
        right.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = out or os.path.join(run_dir, PNG_NAME)
    fig.savefig(path, dpi=100, metadata={"Description": "series: " + ", ".join(sorted(series))})
    plt.close(fig)
    print(f"wrote the curves to {path}")
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Plot a run's metrics.jsonl as curves.png.", allow_abbrev=False)
    p.add_argument("run", help="a pretrain.py or finetune.py --out folder (holding metrics.jsonl)")
    p.add_argument("--out", help="the PNG to write (default RUN/curves.png)")
    args = p.parse_args(argv)
    try:
        plot_metrics(args.run, args.out)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
