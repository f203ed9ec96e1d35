"""Does pre-training pay? Fine-tune on growing labelled subsets and plot accuracy against their size.

    python learning_curve.py --train ../shared/data/sst2/train.tsv --dev ../shared/data/sst2/dev.tsv \\
        --pretrained out/pretrain-mini --also all-MiniLM-L6-v2=$M --sizes 500 1000 4000 16000 all --seeds 3

Rows ("arms"), each fine-tuned with the same recipe on the same fixed, nested subsets (the first N of one
seeded shuffle of the training file), several seeds each, the median reported:
  random      the --pretrained folder's architecture and tokenizer with fresh random weights (a new draw per seed)
  pretrained  the --pretrained folder as it is
  tapt        the --pretrained folder after task-adaptive pre-training: more MLM on the training file's own
              text, labels dropped (Gururangan et al. 2020), once, then fine-tuned like the others
  prompt      the --pretrained folder fine-tuned as a cloze (finetune.py --task prompt: the sentence in
              --template, the masked LM's scores of the --verbalizer words at its [MASK] as the classes), so
              the pre-trained LM head is the classifier and nothing starts at random (PET, LM-BFF)
  NAME        each --also NAME=DIR folder (e.g. all-MiniLM-L6-v2)
  bow         bag-of-words logistic regression (baseline.py): convex, so one run per size
It runs on any binary (or multi-class) task file that finetune.py reads. Every finished run is kept under
--out/runs with the settings it was made with and a fingerprint of the weights it started from, so an
interrupted or extended curve only runs what is missing (a run made with other fine-tuning settings, e.g.
another --max-steps, or from a folder pre-trained again since, is run again; the random rows of another
checkpoint of the same architecture are the same draws, so a copy of an older curve's --out given a newer
--pretrained runs only the newer checkpoint's rows); --jobs N runs N
fine-tunes side by side (on a GPU, where one small model leaves it mostly idle). Writes curve.json,
curve.png and prints the table.

Several --lr, --min-steps or --layer-decay values make a small sweep, as papers tune fine-tuning per model:
every arm runs every (learning rate, step budget, layer-wise lr decay) and each cell of the table is that
arm's best median there, with what it picked. All are picked on the dev set the table reports, so every
arm's number is optimistic alike; the reason to sweep is that one recipe can suit one arm and hurt another
(a long fine-tune lifts a pre-trained encoder and lets a random one memorise a small subset; a layer decay
keeps what the lower layers learned in pre-training, which random weights do not have). A sweep over the
--out of a one-recipe curve reuses that curve's runs and runs only the recipes it adds.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import math
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import time

from atomic import write_json, write_text

ROOT = pathlib.Path(__file__).resolve().parent
from config import add_prompt_args, template_problem  # noqa: E402  finetune.py's --template and --verbalizer

# -----------------------------------------------------------------------------------------------------
# the fine-tuning recipe: one for every arm, so only the starting weights differ


def fine_tune_steps(n: int, batch_size: int, epochs: float, min_steps: int, max_steps: int) -> int:
    """`epochs` passes over the subset, but at least `min_steps` updates (a tiny subset still needs enough
    steps to move a randomly initialised head) and at most `max_steps` (the CPU budget)."""
    return int(min(max(min_steps, math.ceil(epochs * n / batch_size)), max_steps))


def fine_tune(init: str, train: pathlib.Path, dev: list[str], seed: int, steps: int, lr: float, out: pathlib.Path,
              a, prompt: bool = False, layer_decay: float = 1.0) -> dict:
    """One finetune.py run with the curve's recipe; prompt: the same recipe, the task asked as a cloze and
    scored by the LM head (--task prompt with --template and --verbalizer) instead of a --pooling head.
    layer_decay < 1: finetune.py's layer-wise lr decay (docs/finetuning.md)."""
    head = (["--task", "prompt", "--template", a.template, "--verbalizer", a.verbalizer] if prompt
            else ["--task", a.task, "--pooling", a.pooling])
    decay = ["--layer-decay", str(layer_decay)] if layer_decay != 1 else []
    cmd = [sys.executable, str(ROOT / "finetune.py"), *head, *decay, "--init", init, "--train", str(train),
           "--dev", *dev, "--seed", str(seed), "--max-steps", str(steps), "--lr", str(lr),
           "--batch-size", str(a.batch_size), "--dropout", str(a.dropout), "--warmup", str(a.warmup),
           "--clip", str(a.clip), "--select", "last", "--eval-every", "0", "--save-every", "0", "--no-progress", "--out", str(out)]
    return run_logged(cmd, out, out / "metrics.json", threads=a.threads)


PROMPT = "pretrained, prompt"      # the prompt arm's row


def dev_metrics(m: dict) -> dict:
    """A run's dev metrics: finetune.py's metrics.json keeps them under "dev", baseline.py's at the top."""
    return m.get("dev", m)


def run_settings(init: str, subset: pathlib.Path, seed: int, steps: int, lr: float, a, prompt: bool = False,
                 layer_decay: float = 1.0) -> dict:
    """Everything that makes one fine-tune what it is. A finished run under --out/runs is reused only when all
    of it matches: otherwise a run of another recipe (another --max-steps, --lr, subset ...) would stand in
    for this one with nothing to say so. A prompt run has no pooling; its template and verbalizer instead.
    The layer decay is named only when it is on, so the runs of curves made before --layer-decay are reused."""
    # (a prompt run made by the scripts/prompt_finetune.py of sessions 29-33, another loop, is run again)
    head = ({"template": a.template, "verbalizer": a.verbalizer, "runner": "finetune.py --task prompt"} if prompt
            else {"pooling": a.pooling})
    return {"init": init, "subset_sha256": hashlib.sha256(subset.read_bytes()).hexdigest(), "dev": list(a.dev),
            "task": a.task, "seed": seed, "steps": steps, "lr": lr, "batch_size": a.batch_size,
            "dropout": a.dropout, "warmup": a.warmup, "clip": a.clip, **head,
            **({"layer_decay": layer_decay} if layer_decay != 1 else {})}


def run_record(seed: int, recipe: tuple, m: dict) -> dict:
    """What curve.json keeps of one finished fine-tune besides its accuracy (the decay only when it was on)."""
    lr, steps, layer_decay = recipe
    return {"seed": seed, "steps": steps, "lr": lr, "mcc": dev_metrics(m).get("mcc"),
            **({"layer_decay": layer_decay} if layer_decay != 1 else {})}


def run_folder(out: pathlib.Path, arm: str, n: int, seed: int, recipe: tuple | None = None) -> pathlib.Path:
    """Where one fine-tune lives: runs/<arm>/n<N>/seed<k>, with a lr<lr>-steps<S>[-decay<ξ>] level when several
    recipes (lr, steps, layer decay) (a sweep) are run, so each recipe's runs are kept and reused apart."""
    folder = out / "runs" / arm.replace(" ", "").replace("+", "_").replace(",", "_") / f"n{n}"
    if recipe is not None:
        lr, steps, layer_decay = recipe
        folder = folder / (f"lr{lr:g}-steps{steps}" + (f"-decay{layer_decay:g}" if layer_decay != 1 else ""))
    return folder / f"seed{seed}"


def threads_per_job(jobs: int, environ, cpus: int | None) -> str | None:
    """OMP_NUM_THREADS for each fine-tune when --jobs runs several at once: the cores shared out between them
    (each torch process otherwise takes every core, and N of them fight over the same ones); None when one
    job runs or the caller already set OMP_NUM_THREADS."""
    if jobs <= 1 or "OMP_NUM_THREADS" in environ:
        return None
    return str(max(1, (cpus or 1) // jobs))


def run_logged(cmd, out: pathlib.Path, result: pathlib.Path, threads: str | None = None) -> dict:
    """Run one job as a subprocess (a fresh process each: no state leaks from one run into the next), its
    output to out/log.txt; return its result file, or stop the whole curve with the job's last lines."""
    out.mkdir(parents=True, exist_ok=True)
    env = None if threads is None else {**os.environ, "OMP_NUM_THREADS": threads}
    with open(out / "log.txt", "w") as log:
        code = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    if code != 0:
        tail = (out / "log.txt").read_text(errors="replace").strip().splitlines()[-3:]
        sys.exit(f"error: {' '.join(cmd[1:3])} ... failed (exit {code}); the end of {out / 'log.txt'}:\n  "
                 + "\n  ".join(tail))
    return json.loads(result.read_text())


# -----------------------------------------------------------------------------------------------------
# data: nested subsets of the training file, and its text alone for task-adaptive pre-training


def write_subsets(examples, sizes, folder: pathlib.Path, shuffle_seed: int) -> dict:
    """{N: path}: the first N examples of one seeded permutation, so every subset contains the smaller ones.
    Sentence pairs (e.g. STS-B, MNLI) keep their second sentence: sentence1, sentence2, label."""
    import numpy as np
    folder.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(shuffle_seed).permutation(len(examples.texts))
    clean = lambda s: str(s).replace("\t", " ").replace("\n", " ").replace("\r", " ")
    columns = [examples.texts] + ([] if examples.pairs is None else [examples.pairs]) + [examples.labels]
    paths = {}
    for n in sizes:
        path = folder / f"train_{n}.tsv"
        text = ("sentence\tlabel\n" if examples.pairs is None else "sentence1\tsentence2\tlabel\n") + "".join(
            "\t".join(clean(c[i]) for c in columns) + "\n" for i in order[:n])
        # rewritten when another --train or --shuffle-seed gives other rows: a stale subset is never reused
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            write_text(path, text)
        paths[n] = path
    return paths


def saved_settings(path: pathlib.Path) -> dict:
    """The settings a cached model or run was made with; {} when it kept none, or none that can be read (a file
    torn by an older version killed mid-write): the run is then made again rather than trusted or crashed on."""
    try:
        settings = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return settings if isinstance(settings, dict) else {}


def finished_with(folder: pathlib.Path, settings: dict) -> bool:
    """Whether folder holds a finished fine-tune made with exactly these settings."""
    return (folder / "metrics.json").is_file() and saved_settings(folder / "run.json") == settings


def folder_identity(folder: str, weights: bool = True) -> str:
    """A fingerprint of what a BERT-layout folder holds: its config (parsed: the order of keys does not count),
    its tokenizer and, unless weights=False, its weights. Cached runs and models are matched on this, not on the
    folder's name, so a folder pre-trained again under the same name is a new starting point (its old runs are
    run again, not passed off as its own), and two folders that hold the same thing share their runs: the random
    rows of two checkpoints of one architecture are the same draws. "missing" where there is no folder yet or its
    config.json is torn: that matches no cached run, so nothing is reused from it."""
    from data.prepare import file_sha256
    folder = pathlib.Path(folder)
    config = saved_settings(folder / "config.json")
    if not config:
        return "missing"
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    for name in ["tokenizer.model", "vocab.txt"] + (["model.safetensors"] if weights else []):
        if (folder / name).is_file():
            h.update(f"{name} {file_sha256(folder / name)}".encode())
    return ("weights and " if weights else "architecture and ") + "tokenizer sha256 " + h.hexdigest()


def tapt_settings(pretrained: str, a) -> dict:
    return {"init": folder_identity(pretrained), "steps": a.tapt_steps, "lr": a.tapt_lr, "seq_len": a.tapt_seq_len,
            "mask_rate": a.tapt_mask_rate}


def task_adaptive_pretraining(pretrained: str, texts: list[str], folder: pathlib.Path, a) -> str:
    """More MLM on the task's own training text, labels dropped: prepare it with the pre-trained folder's
    tokenizer, then pretrain.py --init. Done once; reused by every size and seed."""
    model_dir = folder / "model"
    # every setting that changes the TAPT model: a cached one made with other settings is redone, not reused
    settings = tapt_settings(pretrained, a)
    if (model_dir / "config.json").is_file() and (model_dir / "checkpoint.pt").is_file():
        done = saved_settings(model_dir / "tapt.json")
        if {k: done.get(k) for k in settings} == settings:
            return str(model_dir)
    text_dir = folder / "text"
    text_dir.mkdir(parents=True, exist_ok=True)
    per_doc = max(1, min(200, len(texts) // 50))   # sentences per document (>= 50 documents: some go to val)
    for k in range(0, len(texts), per_doc):
        (text_dir / f"part{k // per_doc:05d}.txt").write_text("\n".join(texts[k:k + per_doc]) + "\n", encoding="utf-8")
    python = sys.executable
    run_logged([python, str(ROOT / "data" / "prepare.py"), "--input", str(text_dir), "--out", str(folder / "shards"),
                "--tokenizer", pretrained, "--min-chars", "1", "--val-fraction", "0.02", "--workers", "1", "--quiet"],
               folder / "prepare", folder / "shards" / "meta.json")
    if model_dir.exists():
        shutil.rmtree(model_dir)
    t0 = time.time()
    run_logged([python, str(ROOT / "pretrain.py"), "--init", pretrained, "--data", str(folder / "shards"),
                "--seq-len", str(a.tapt_seq_len), "--batch-size", "32", "--max-steps", str(a.tapt_steps),
                "--lr", str(a.tapt_lr), "--warmup", "0.06", "--dropout", "0", "--mask-rate", str(a.tapt_mask_rate),
                "--eval-every", str(max(1, a.tapt_steps // 4)), "--eval-batches", "10", "--save-every", "0",
                "--no-progress", "--out", str(model_dir)], model_dir, model_dir / "config.json")
    write_json(model_dir / "tapt.json", {**settings, "seconds": round(time.time() - t0, 1)})
    return str(model_dir)


def random_copy(pretrained: str, seed: int, folder: pathlib.Path) -> str:
    """The pre-trained folder's architecture and tokenizer with fresh weights (init_weights, as pretrain.py
    starts), drawn with `seed`."""
    out = folder / f"random_seed{seed}"
    # a copy made for another architecture or tokenizer (another --pretrained, same --out) is drawn again
    if folder_identity(str(out), weights=False) != folder_identity(pretrained, weights=False):
        import torch
        from model import LanguageModel, from_hf_bert, save_hf_bert
        from tokenizer import load_tokenizer
        config = from_hf_bert(pretrained, head=None).config
        torch.manual_seed(seed)
        save_hf_bert(LanguageModel(config), str(out), load_tokenizer(pretrained))
    return str(out)


# -----------------------------------------------------------------------------------------------------
# the table and the picture


def summarise(results: dict, arms: list[str], sizes: list) -> dict:
    """{arm: {N: {"median", "min", "max", "runs", "lr", "steps", "layer_decay"}}} of dev accuracy (in %). With a
    sweep, each arm and N keep the (lr, steps, layer decay) whose median is best (the first of a tie) and every
    candidate's median."""
    table = {}
    for arm in arms:
        table[arm] = {}
        for n in sizes:
            by_recipe = {}
            for r in results.get(arm, {}).get(str(n), []):
                recipe = (r.get("lr"), r.get("steps"), r.get("layer_decay", 1.0))
                by_recipe.setdefault(recipe, []).append(100 * r["accuracy"])
            cells = [{"median": statistics.median(accs), "min": min(accs), "max": max(accs), "runs": accs,
                      "lr": lr, "steps": steps, "layer_decay": decay}
                     for (lr, steps, decay), accs in by_recipe.items()]
            if cells:
                best = max(cells, key=lambda c: c["median"])        # max keeps the first of equal medians
                if len(cells) > 1:
                    best = {**best, "candidates": [{k: c[k] for k in ("lr", "steps", "layer_decay", "median")}
                                                   for c in cells]}
                table[arm][str(n)] = best
    return table


def format_curve(table: dict, sizes: list, labels: dict) -> str:
    head = f"{'':20}" + "".join(f"{labels[n]:>21}" for n in sizes)
    lines = ["dev accuracy %, median of seeds [min-max]", head]
    for arm, row in table.items():
        cells = []
        for n in sizes:
            c = row.get(str(n))
            cells.append("-".rjust(21) if c is None else f"{c['median']:.2f} [{c['min']:.1f}-{c['max']:.1f}]".rjust(21)
                         if len(c["runs"]) > 1 else f"{c['median']:.2f}".rjust(21))
        lines.append(f"{arm:20}" + "".join(cells))
    if any("candidates" in c for row in table.values() for c in row.values()):
        decays = any(k.get("layer_decay", 1) != 1 for row in table.values() for c in row.values()
                     for k in c.get("candidates", []))
        lines += ["", "the fine-tuning each cell picked (best median on the dev set), lr / steps"
                  + (" / layer decay" if decays else "")]

        def picked(c):
            return (f"{c['lr']:g} / {c['steps']}" + (f" / {c.get('layer_decay', 1):g}" if decays else ""))
        for arm, row in table.items():
            cells = [("-" if row.get(str(n), {}).get("lr") is None else picked(row[str(n)]))
                     for n in sizes]           # bow: convex, nothing to pick
            lines.append(f"{arm:20}" + "".join(c.rjust(21) for c in cells))
    return "\n".join(lines)


def plot_curve(table: dict, counts: dict, path: pathlib.Path, title: str):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no curve.png written")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, row in table.items():
        ns = [n for n in row]
        x = [counts[n] for n in ns]
        med = [row[n]["median"] for n in ns]
        err = [[row[n]["median"] - row[n]["min"] for n in ns], [row[n]["max"] - row[n]["median"] for n in ns]]
        ax.errorbar(x, med, yerr=err, marker="o", capsize=3, label=arm, linestyle="--" if arm == "bow" else "-")
    ax.set_xscale("log")
    ticks = sorted({counts[n] for row in table.values() for n in row})
    ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("labelled training examples (log scale)")
    ax.set_ylabel("dev accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -----------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--train", required=True, help="labelled training file (TSV/CSV/JSONL with a header, or CoLA)")
    p.add_argument("--dev", required=True, nargs="+", help="dev file(s) the accuracy is measured on")
    p.add_argument("--task", choices=["binary", "multiclass"], default="binary")
    p.add_argument("--pretrained", help="a pretrain.py output: gives the random, pretrained and tapt rows")
    p.add_argument("--also", nargs="*", default=[], metavar="NAME=DIR", help="more BERT-layout folders to compare")
    p.add_argument("--arms", default="random,pretrained,tapt,also,bow",
                   help="which rows to run (of random,pretrained,tapt,prompt,also,bow)")
    p.add_argument("--sizes", nargs="+", default=["500", "1000", "4000", "16000", "all"])
    p.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per size (the median is reported)")
    p.add_argument("--shuffle-seed", type=int, default=0, help="the one shuffle the nested subsets are cut from")
    p.add_argument("--out", default="out/curve")
    p.add_argument("--jobs", type=int, default=1, help="fine-tunes run side by side, each its own process (a GPU "
                   "holds several small models at once; on a CPU each gets OMP_NUM_THREADS = cores / jobs unless it is set)")
    p.add_argument("--collect-only", action="store_true", help="run nothing: table, curve.json and curve.png "
                   "from the runs already finished under --out (e.g. arms run with different --seeds)")
    g = p.add_argument_group("fine-tuning recipe (the same for every arm; several --lr or --min-steps: a sweep, "
                             "each arm's best reported)")
    g.add_argument("--lr", type=float, nargs="+", default=[1e-4])
    g.add_argument("--also-lr", type=float, help="learning rate for the --also folders (default --lr)")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--epochs", type=float, default=3)
    g.add_argument("--min-steps", type=int, nargs="+", default=[300], help="at least this many updates")
    g.add_argument("--max-steps", type=int, default=1500, help="cap per run (the CPU budget)")
    g.add_argument("--warmup", type=float, default=0.1)
    g.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0: off); 1.0 in every row "
                   "of the README's curve, so it is fixed here rather than taken from finetune.py's default")
    g.add_argument("--dropout", type=float, default=0.1, help="fine-tuning dropout (pre-training may have used 0)")
    g.add_argument("--pooling", choices=["cls", "mean"], default="cls", help="the classifier's sentence vector")
    g.add_argument("--layer-decay", type=float, nargs="+", default=[1.0], metavar="XI",
                   help="finetune.py's layer-wise lr decay (1: off; several: part of the sweep)")
    g = p.add_argument_group("prompt-based fine-tuning (the prompt row)")
    add_prompt_args(g)
    g = p.add_argument_group("task-adaptive pre-training")
    g.add_argument("--tapt-steps", type=int, default=1000)
    g.add_argument("--tapt-lr", type=float, default=5e-4)
    g.add_argument("--tapt-seq-len", type=int, default=128)
    g.add_argument("--tapt-mask-rate", type=float, default=0.25)
    a = p.parse_args(argv)
    arms = a.arms.split(",")
    unknown = set(arms) - {"random", "pretrained", "tapt", "prompt", "also", "bow"}
    if unknown:
        p.error(f"--arms: unknown {', '.join(sorted(unknown))} (choose from random,pretrained,tapt,prompt,also,bow)")
    if {"random", "pretrained", "tapt", "prompt"} & set(arms) and not a.pretrained:
        p.error("--pretrained DIR is needed for the random, pretrained, tapt and prompt rows "
                "(or drop them from --arms)")
    if "prompt" in arms and template_problem(a.template):    # refused now, not when the first prompt run starts
        p.error(template_problem(a.template))
    if a.pretrained and not (pathlib.Path(a.pretrained) / "config.json").is_file():
        p.error(f"--pretrained {a.pretrained}: no config.json (expected a pretrain.py output folder)")
    for item in a.also:
        name, _, folder = item.partition("=")
        if not name or not (pathlib.Path(folder) / "config.json").is_file():
            p.error(f"--also {item}: expected NAME=DIR with DIR a BERT-layout folder holding config.json")
    if a.jobs < 1:
        p.error(f"--jobs {a.jobs}: must be at least 1")
    for m in a.min_steps:
        if m < 1:
            p.error(f"--min-steps {m}: must be at least 1")
    for lr in a.lr:
        if not lr > 0:
            p.error(f"--lr {lr}: must be positive")
    for xi in a.layer_decay:
        if not 0 < xi <= 1:
            p.error(f"--layer-decay {xi}: expected a factor in (0, 1] (1: no decay)")
    for s in a.sizes:
        if s != "all" and (not s.isdigit() or int(s) < 1):
            p.error(f"--sizes: {s!r} is neither a positive count nor 'all'")
    return a


def main(argv=None):
    a = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    a.threads = threads_per_job(a.jobs, os.environ, os.cpu_count())
    if a.threads is not None:
        print(f"--jobs {a.jobs} on {os.cpu_count()} cores: OMP_NUM_THREADS={a.threads} for each fine-tune")
    from data.tasks import TaskDataError, read_examples
    try:
        examples = read_examples([a.train])
        read_examples(a.dev)
    except (TaskDataError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    if "prompt" in a.arms.split(","):                  # refused now, not when the first prompt run starts
        from data.tasks import label_classes
        from finetuned import FinetuneError, cloze_ids
        from tokenizer import TokenizerError, load_tokenizer
        try:
            cloze_ids(load_tokenizer(a.pretrained), a.template, a.verbalizer.split(","),
                      label_classes("prompt", examples), a.train)
        except TokenizerError as e:
            sys.exit(f"error: --pretrained: {e}")
        except (FinetuneError, TaskDataError) as e:
            sys.exit(f"error: {e}")
    total = len(examples.texts)
    counts = {s: total if s == "all" else min(int(s), total) for s in a.sizes}
    out = pathlib.Path(a.out)
    subsets = write_subsets(examples, sorted(set(counts.values())), out / "data", a.shuffle_seed)
    arms = a.arms.split(",")

    # (arm, init folder or None, its lrs, what the starting weights are: part of a run's settings, by content)
    runs = []
    if "random" in arms:
        runs.append(("random", None, a.lr, "random weights on " + folder_identity(a.pretrained, weights=False)))
    if "pretrained" in arms:
        runs.append(("pretrained", a.pretrained, a.lr, folder_identity(a.pretrained)))
    if "tapt" in arms:
        if not a.collect_only:
            print(f"task-adaptive pre-training of {a.pretrained} on {total:,} training texts ({a.tapt_steps} steps)")
        tapt = str(out / "tapt" / "model") if a.collect_only else task_adaptive_pretraining(
            a.pretrained, examples.texts, out / "tapt", a)
        runs.append(("pretrained + TAPT", tapt, a.lr, folder_identity(tapt)))
    if "prompt" in arms:
        runs.append((PROMPT, a.pretrained, a.lr, folder_identity(a.pretrained)))
    if "also" in arms:
        runs += [(item.split("=", 1)[0], item.split("=", 1)[1], [a.also_lr] if a.also_lr else a.lr,
                  folder_identity(item.split("=", 1)[1]))
                 for item in a.also]

    results = {}        # rebuilt from the finished runs under out/runs, whatever invocation ran them
    order = [arm for arm, *_ in runs] + (["bow"] if "bow" in arms else [])

    def record(arm, size, metrics_, extra):
        key = lambda r: (r.get("lr") or 0, r.get("steps") or 0, r.get("layer_decay", 1.0), r["seed"])
        results.setdefault(arm, {}).setdefault(str(size), [])
        results[arm][str(size)] = [r for r in results[arm][str(size)] if key(r) != key(extra)]
        results[arm][str(size)].append({"accuracy": dev_metrics(metrics_)["accuracy"],
                                        **extra})
        results[arm][str(size)].sort(key=key)     # --jobs: runs end in any order
        save()

    def save():
        table = summarise(results, order, a.sizes)
        write_json(out / "curve.json", {"sizes": counts, "recipe": {k: v for k, v in vars(a).items()},
                                        "table": table, "runs": results})

    pending = []        # the fine-tunes not finished yet: (arm, size, seed, folder, start, recipe, settings)
    sweep = len(a.lr) * len(a.min_steps) * len(a.layer_decay) > 1
    for size in a.sizes:
        n = counts[size]
        if "bow" in arms:
            folder = out / "runs" / "bow" / f"n{n}"
            if not (folder / "metrics.json").is_file() and not a.collect_only:
                folder.mkdir(parents=True, exist_ok=True)
                run_logged([sys.executable, str(ROOT / "baseline.py"), "--train", str(subsets[n]), "--dev", *a.dev,
                            "--task", a.task, "--out", str(folder / "metrics.json")], folder, folder / "metrics.json")
            if (folder / "metrics.json").is_file():
                record("bow", size, json.loads((folder / "metrics.json").read_text()), {"seed": 0})
        # the step budgets this N gets (two --min-steps can give the same count: it runs once)
        budgets = sorted({fine_tune_steps(n, a.batch_size, a.epochs, m, a.max_steps) for m in a.min_steps})
        for seed in range(1, a.seeds + 1):
            for arm, init, lrs, weights in runs:
                for recipe in [(lr, steps, xi) for lr in lrs for steps in budgets for xi in a.layer_decay]:
                    lr, steps, xi = recipe
                    folder = run_folder(out, arm, n, seed, recipe if sweep else None)
                    settings = run_settings(weights, subsets[n], seed, steps, lr, a, prompt=arm == PROMPT,
                                            layer_decay=xi)
                    # a curve later widened into a sweep (or a sweep narrowed to one recipe) finds its runs in
                    # the other layout: reused when they match, so a sweep only runs the recipes it adds
                    other = run_folder(out, arm, n, seed, None if sweep else recipe)
                    found = next((f for f in (folder, other) if finished_with(f, settings)), None)
                    if found is not None:
                        m = json.loads((found / "metrics.json").read_text())
                        record(arm, size, m, run_record(seed, recipe, m))
                        continue
                    if (folder / "metrics.json").is_file():
                        made_with = saved_settings(folder / "run.json")
                        differ = sorted(("starting weights" if k == "init" else k)
                                        for k in settings if made_with.get(k) != settings[k])
                        why = (f"made with other fine-tuning settings ({', '.join(differ)})" if made_with
                               else "its settings (run.json) are missing or unreadable")
                        print(f"{folder}: {why}: " + ("left out" if a.collect_only else "run again"))
                    if not a.collect_only:
                        start = random_copy(a.pretrained, seed, out / "random") if arm == "random" else init
                        pending.append((arm, size, seed, folder, start, recipe, settings))

    def fine_tune_one(job):
        arm, size, seed, folder, start, (lr, steps, xi), settings = job
        if folder.exists():                 # a run of other settings: nothing of it is kept
            shutil.rmtree(folder)
        t0 = time.time()
        m = fine_tune(start, subsets[counts[size]], a.dev, seed, steps, lr, folder, a, prompt=arm == PROMPT,
                      layer_decay=xi)
        write_json(folder / "run.json", settings)
        print(f"{arm:20} N={counts[size]:<6} seed {seed}: {100 * dev_metrics(m)['accuracy']:.2f} % "
              f"({f'lr {lr:g}, ' if sweep else ''}{f'layer decay {xi:g}, ' if xi != 1 else ''}{steps} steps, "
              f"{time.time() - t0:.0f} s)", flush=True)
        for big in ("model.safetensors", "checkpoint.pt"):     # keep the numbers, not the weights
            (folder / big).unlink(missing_ok=True)
        return m

    # --jobs processes side by side, each run recorded as it ends. Only this thread hands out runs, so after a
    # failure no new run starts: the running ones finish (and are kept), then the curve stops with the failure.
    failure, queue, running = None, list(pending), {}
    with concurrent.futures.ThreadPoolExecutor(max_workers=a.jobs) as pool:
        while running or (queue and failure is None):
            while queue and failure is None and len(running) < a.jobs:
                job = queue.pop(0)
                running[pool.submit(fine_tune_one, job)] = job
            done, _ = concurrent.futures.wait(running, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                arm, size, seed, _, _, recipe, _ = running.pop(future)
                try:
                    m = future.result()
                except (SystemExit, Exception) as e:          # run_logged exits with the run's last lines
                    failure = failure or e
                    continue
                record(arm, size, m, run_record(seed, recipe, m))
    if failure is not None:
        raise failure
    table = summarise(results, order, a.sizes)
    labels = {s: (f"all ({counts[s]:,})" if s == "all" else f"{counts[s]:,}") for s in a.sizes}
    print(format_curve(table, a.sizes, labels))
    plot_curve(table, {s: counts[s] for s in a.sizes}, out / "curve.png",
               f"{pathlib.Path(a.train).name}: dev accuracy vs labelled examples")
    print(f"wrote {out / 'curve.json'} and {out / 'curve.png'}")
    return table


if __name__ == "__main__":
    main()
