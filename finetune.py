"""Fine-tune a pre-trained encoder on a labelled task, or train a sentence encoder with SimCSE.

    python finetune.py --task binary                        # no data, no model: a built-in sample, see below
    python finetune.py --task binary --init out/pretrain --data data/glue/sst2
    python finetune.py --task binary --init $MINILM --data data/glue/sst2 --method lora
    python finetune.py --task regression --init $MINILM --data data/glue/stsb
    python finetune.py --task simcse --init $MINILM --train sentences.txt --dev data/glue/stsb/dev.tsv
    python finetune.py --task binary --ensemble out/a,out/b --dev data/glue/sst2/dev.tsv --out out/ens
    python finetune.py --init $MINILM --tasks sst2:binary:sst2/train.tsv:sst2/dev.tsv \
        stsb:regression:stsb/train.tsv:stsb/dev.tsv cola:binary:cola/in_domain_train.tsv:cola/in_domain_dev.tsv

Tasks: the head, the loss, the metric that picks the best checkpoint
    binary      one logit, binary cross-entropy          accuracy (MCC for CoLA)
    multiclass  K logits, softmax cross-entropy          accuracy
    pair        K logits over (text, text pair)          accuracy
    regression  one output, mean squared error           Spearman (STS-B)
    simcse      the encoder alone: InfoNCE between two dropout views of each sentence (Gao et al. 2021),
                judged by the Spearman correlation of cosine similarities with STS-B scores, before and after
Any task reads a second text column when the file has one (MRPC, RTE, QNLI, STS-B pairs).

--init is a pretrain.py output (default out/pretrain) or any BERT-layout folder (config.json, weights,
vocab.txt), e.g. all-MiniLM-L6-v2. With no --train and nothing prepared (data/glue/sst2 from
data/prepare_glue.py), --task binary writes a template sample to data/sample_binary; with no out/pretrain
either, it trains a small model from random initialisation with a SentencePiece tokenizer trained on that
sample, which learns the sample in about a minute on a CPU: the whole pipeline runs on a fresh clone.

Multi-task (--tasks NAME:KIND:TRAIN[:DEV] ..., files comma-separated): one encoder, one head per task,
each step one task's batch, drawn by --task-sampling (multitask.py). --out then holds one fine-tuned folder
per task (--out/NAME, what predict.py and serve.py load; the encoder is saved in each), multitask.json, the
root metrics.json (every task's dev metrics at each evaluation) and the checkpoint.

Written to --out: the model as a BERT-layout folder (config.json, model.safetensors, tokenizer; PEFT
methods add peft.json + peft.safetensors), labels.json (what load_finetuned needs), metrics.json,
predictions.tsv (dev; predictions_test.tsv for --test), and the trainer's checkpoint.pt / metrics.jsonl.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import pathlib
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import adversarial
import losses
from data.tasks import (Augmenter, TaskDataError, TaskDataset, encode_labels, eval_order, label_classes,
                        nearest_neighbours, read_examples, read_sentences, write_sample_binary)
from finetuned import (TASKS, FinetuneError, batch_of, build_model, encode, infer, load_finetuned, predict_proba,
                       save_finetuned, write_json)
from metrics import classification_metrics, format_table, regression_metrics, spearman, pearson
from model import CheckpointError, EncoderConfig, MultiTaskClassifier, SequenceClassifier, unwrap
from multitask import SAMPLING, MultiTaskData, TaskSampler, parse_tasks, sampling_probabilities
from peft import METHODS, PeftError, apply_peft, known_options, trainable_summary
from tokenizer import SentencePieceTokenizer, TokenizerError, load_tokenizer
from trainer import Dist, TrainConfig, add_training_args, train

ROOT = pathlib.Path(__file__).resolve().parent
DEFAULT_INIT = ROOT / "out" / "pretrain"
SAMPLE_DIR = ROOT / "data" / "sample_binary"
GLUE_DIR = ROOT / "data" / "glue"
PREPARED = {"binary": "sst2", "regression": "stsb"}      # used when --train is not given and it exists
SCRATCH_LR, SIMCSE_LR = 1e-3, 3e-5                      # a method's own peak lr: peft.METHODS
MIN_METRICS = ("loss", "mse")                            # smaller is better; every other metric: larger


class Capture:
    """Keeps a submodule's output during one forward (a forward hook), so the contrastive loss gets the
    pooled vector while the forward itself still runs through the DDP / compile wrapper."""

    def __init__(self, module):
        self.module, self.out = module, None

    def __enter__(self):
        self.handle = self.module.register_forward_hook(lambda m, i, o: setattr(self, "out", o))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# -----------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    g = p.add_argument_group("task and data")
    g.add_argument("--task", choices=list(TASKS), help="the task kind (default binary)")
    g.add_argument("--tasks", nargs="+", metavar="NAME:KIND:TRAIN[:DEV]", help="multi-task: one head per task on "
                   "one encoder, e.g. sst2:binary:sst2/train.tsv:sst2/dev.tsv stsb:regression:stsb/train.tsv")
    g.add_argument("--task-sampling", choices=SAMPLING, default="proportional",
                   help="multi-task: the chance of a task per step, by its size n (proportional) or n^(1/T)")
    g.add_argument("--sampling-temperature", type=float, default=2.0, metavar="T",
                   help="multi-task: T of --task-sampling temperature (1: proportional; large: uniform)")
    g.add_argument("--init", help="pretrain.py output or BERT-layout folder (default out/pretrain)")
    g.add_argument("--data", help="a folder with train.tsv, dev.tsv and optionally test.tsv (data/glue/<task>)")
    g.add_argument("--train", nargs="+", help="training file(s): TSV/CSV/JSONL with a header, or CoLA as it ships; "
                   "for simcse also plain text or WikiExtractor files/folders (one sentence per line)")
    g.add_argument("--dev", nargs="+", help="dev file(s), concatenated (e.g. CoLA in-domain + out-of-domain)")
    g.add_argument("--test", nargs="+", help="files to predict (labels optional)")
    g.add_argument("--text-col", help="text column (default: found by name: sentence, text, sentence1, question, ...)")
    g.add_argument("--text-pair-col", help="second text column (default: sentence2, hypothesis, ... when present)")
    g.add_argument("--label-col", help="label column (default: label, score, quality, ...)")
    g.add_argument("--max-length", type=int, help="tokens per example (default 128; simcse 32)")
    g.add_argument("--max-train-examples", type=int, help="use only the first N training examples")
    g.add_argument("--max-eval-examples", type=int, help="use only the first N dev/test examples")
    g.add_argument("--epochs", type=float, help="converted to --max-steps when that is not given (default 3)")
    g.add_argument("--metric", help="dev metric for early stopping and the best model "
                   "(default accuracy; mcc for CoLA; spearman for regression and simcse)")
    g.add_argument("--early-stopping", type=int, metavar="PATIENCE", help="stop after PATIENCE evaluations "
                   "without improvement and restore the best weights")
    g.add_argument("--ensemble", help="DIR1,DIR2,...: evaluate the mean of these fine-tuned models' probabilities")
    g = p.add_argument_group("method")
    g.add_argument("--method", choices=list(METHODS), default="full")
    for name, (default, kind, help) in known_options().items():        # --lora-r, --adapter-size, ...
        g.add_argument("--" + name.replace("_", "-"), type=kind, default=default, help=help)
    g.add_argument("--dropout", type=float, help="override the checkpoint's dropout (hidden and attention)")
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument("--rdrop", type=float, default=0.0, metavar="ALPHA", help="R-Drop: weight of the symmetric KL")
    g.add_argument("--contrastive-weight", type=float, default=0.0, help="add W x supervised contrastive loss")
    g.add_argument("--contrastive-temperature", type=float, default=0.1)
    g.add_argument("--adversarial", choices=["none", "fgm", "pgd", "freelb"], default="none")
    g.add_argument("--adv-eps", type=float, default=1.0, help="L2 radius of the perturbation, per example")
    g.add_argument("--adv-alpha", type=float, help="ascent step (default 2.5 eps / steps)")
    g.add_argument("--adv-steps", type=int, default=3)
    g.add_argument("--eval-attack-eps", type=float, help="also report dev accuracy under a PGD attack of this size")
    g.add_argument("--eval-attack-steps", type=int, default=10)
    g.add_argument("--augment", type=float, nargs="?", const=0.1, default=0.0, metavar="RATE",
                   help="token edits on the fly (swap/delete/insert/neighbour replace), RATE of tokens (0.1)")
    g.add_argument("--temperature", type=float, default=0.05, help="simcse: InfoNCE temperature")
    g.add_argument("--pooling", choices=["cls", "mean"], default="cls", help="sentence vector: the [CLS] state (BERT) or the mean of the real tokens' states (often "
                   "better for a model pre-trained with MLM alone, and simcse's choice)")
    add_training_args(p, out="out/finetune", max_steps=None, lr=None, batch_size=None, beta2=0.999, eval_every=None)
    return p


def check_args(a):
    if a.tasks:
        given = [f for f, on in (("--task", a.task), ("--data", a.data), ("--train", a.train), ("--dev", a.dev),
                                 ("--test", a.test), ("--ensemble", a.ensemble), ("--rdrop", a.rdrop),
                                 ("--contrastive-weight", a.contrastive_weight), ("--augment", a.augment),
                                 ("--adversarial", a.adversarial != "none"), ("--eval-attack-eps", a.eval_attack_eps),
                                 ("--fsdp", a.fsdp)) if on]
        if given:
            raise FinetuneError(f"--tasks: not combined with {', '.join(given)} (each task names its own files "
                                "in NAME:KIND:TRAIN[:DEV]; the rest is single-task only)")
    a.task = a.task or "binary"
    classify = TASKS[a.task].score_name is None           # the labels are classes
    if a.rdrop and not classify:
        raise FinetuneError(f"--rdrop: needs a classification task, not --task {a.task}")
    if a.contrastive_weight and not classify:
        raise FinetuneError(f"--contrastive-weight: needs a classification task, not --task {a.task}")
    if a.adversarial != "none" and (a.task == "simcse" or a.rdrop or a.contrastive_weight):
        raise FinetuneError("--adversarial: combine it with neither --rdrop, --contrastive-weight nor --task simcse")
    if a.eval_attack_eps and not classify:
        raise FinetuneError(f"--eval-attack-eps: needs a classification task, not --task {a.task}")
    if a.data and (a.train or a.dev):
        raise FinetuneError("--data: give either --data DIR or --train/--dev files, not both")
    if not 0 <= a.augment < 1:
        raise FinetuneError(f"--augment: expected a rate in [0, 1), got {a.augment}")
    if a.label_smoothing and not 0 <= a.label_smoothing < 1:
        raise FinetuneError(f"--label-smoothing: expected a value in [0, 1), got {a.label_smoothing}")


# -----------------------------------------------------------------------------------------------------
# the pre-trained model


def load_init(path, task, num_outputs, pooling="cls", dropout=None):
    """(model, tokenizer) from a BERT-layout folder; its tokenizer must have as many ids as its embedding table."""
    path = pathlib.Path(path)
    if not path.is_dir():
        raise FinetuneError(f"--init {path}: folder not found (expected a pretrain.py output or a BERT-layout "
                            "folder: config.json, model.safetensors, vocab.txt or tokenizer.model)")
    try:
        tokenizer = load_tokenizer(path)
        config = json.loads((path / "config.json").read_text())
    except (TokenizerError, OSError, json.JSONDecodeError) as e:
        raise FinetuneError(f"--init {path}: {e}") from None
    if config.get("vocab_size") != tokenizer.vocab_size:
        raise FinetuneError(f"--init {path}: mismatched vocab: the tokenizer has {tokenizer.vocab_size} tokens "
                            f"but config.json says vocab_size {config.get('vocab_size')}")
    overrides = {} if dropout is None else {"dropout": dropout, "attention_dropout": dropout}
    return build_model(path, task, num_outputs, pooling, **overrides), tokenizer


def scratch_init(texts, num_outputs, dropout=None):
    """A small randomly initialised classifier and a SentencePiece tokenizer trained on `texts` (the
    built-in sample: its ~100 distinct words allow at most ~110 pieces, so 100)."""
    tokenizer = SentencePieceTokenizer.train(iter(texts), SAMPLE_DIR / "tokenizer", vocab_size=100, num_threads=1)
    cfg = EncoderConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_layers=2, num_heads=2, max_position=128,
                        **({} if dropout is None else {"dropout": dropout, "attention_dropout": dropout}))
    return SequenceClassifier(cfg, num_outputs), tokenizer


# -----------------------------------------------------------------------------------------------------
# evaluation


def evaluate(model, task, dev, pad_id, batch_size=64) -> tuple[dict, np.ndarray]:
    """(metrics, predictions) on an encoded dev set: {"ids", "types", "gold"} (simcse: "a"/"b" sides)."""
    if task == "simcse":
        za, zb = (infer(model, dev[s + "_ids"], dev[s + "_types"], pad_id, batch_size) for s in ("a", "b"))
        cos = F.cosine_similarity(za, zb, dim=1).double().numpy()
        return {"spearman": spearman(dev["gold"], cos), "pearson": pearson(dev["gold"], cos)}, cos
    kind = TASKS[task]
    outputs = infer(model, dev["ids"], dev["types"], pad_id, batch_size)
    pred = kind.probabilities(outputs)
    if dev["gold"] is None:
        return {}, pred
    if kind.score_name:
        return regression_metrics(dev["gold"], pred), pred
    gold = torch.as_tensor(dev["gold"]).to(kind.label_dtype)
    loss = kind.loss(outputs, gold) / max(len(gold), 1)                # the mean over the dev set
    return {**classification_metrics(dev["gold"], pred), "loss": float(loss)}, pred


def robust_accuracy(model, task, dev, pad_id, eps, steps, alpha=None, batch_size=32) -> float:
    """Dev accuracy when each batch's embeddings are perturbed by a PGD attack with ||delta||_2 <= eps."""
    device, correct = next(model.parameters()).device, 0
    model.eval()
    for rows in eval_order([len(x) for x in dev["ids"]], batch_size):
        batch = batch_of(dev["ids"], dev["types"], rows, pad_id, device)
        labels = torch.as_tensor(np.asarray(dev["gold"])[rows], device=device)
        loss_of_logits = task_loss(task, labels)
        embeddings = adversarial.pgd_attack(model, batch, loss_of_logits, eps, alpha=alpha, steps=steps)
        with torch.no_grad():
            logits = model(**batch, embeddings=embeddings)
        correct += int((two_class(logits).argmax(1) == labels.long()).sum())   # binary: z > 0
    return correct / len(dev["ids"])


# -----------------------------------------------------------------------------------------------------
# losses


def task_loss(task, labels, label_smoothing=0.0):
    """logits -> the task's loss summed over the batch (the trainer divides by the number of examples)."""
    return lambda logits: TASKS[task].loss(logits, labels, label_smoothing)


def two_class(logits):
    """One logit z -> the logits (0, z) of a two-way softmax, whose probabilities are (1 - s(z), s(z))."""
    return torch.cat([torch.zeros_like(logits), logits], dim=1) if logits.shape[1] == 1 else logits


def make_loss_fn(a, raw_model):
    inputs = lambda b: {k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids")}

    def loss_fn(model, batch):
        x = inputs(batch)
        if a.task == "simcse":     # two dropout views: the same batch twice in one forward
            z1, z2 = model(**{k: torch.cat([v, v]) for k, v in x.items()}).chunk(2)
            return losses.info_nce(z1, z2, temperature=a.temperature, reduction="sum")
        loss_of_logits = task_loss(a.task, batch["labels"], a.label_smoothing)
        if a.adversarial != "none":
            return adversarial.adversarial_loss(model, batch, loss_of_logits, method=a.adversarial, eps=a.adv_eps,
                                           alpha=a.adv_alpha, steps=a.adv_steps)
        views = 2 if a.rdrop else 1
        if views == 2:
            x = {k: torch.cat([v, v]) for k, v in x.items()}
        with Capture(raw_model.pooler) if a.contrastive_weight else contextlib.nullcontext() as pooled:
            logits = model(**x)
        if views == 2:             # R-Drop: mean of the two passes' losses + alpha x their symmetric KL
            l1, l2 = logits.chunk(2)
            loss = 0.5 * (loss_of_logits(l1) + loss_of_logits(l2)) + a.rdrop * losses.symmetric_kl(
                two_class(l1), two_class(l2), reduction="sum")
        else:
            loss = loss_of_logits(logits)
        if a.contrastive_weight:   # on the pooled vectors tanh(W_p h_CLS + b_p), both views when R-Drop
            labels = batch["labels"].long().repeat(views)
            loss = loss + a.contrastive_weight * losses.supervised_contrastive(
                torch.tanh(pooled.out), labels, temperature=a.contrastive_temperature, reduction="sum") / views
        return loss
    return loss_fn


# -----------------------------------------------------------------------------------------------------
# data


def resolve_data(a):
    """(train paths, dev paths, test paths, sample?) from --data / --train / --dev / --test or the defaults."""
    if a.data:
        d = pathlib.Path(a.data)
        if not (d / "train.tsv").is_file():
            raise FinetuneError(f"--data {d}: no train.tsv there (expected train.tsv, dev.tsv, test.tsv)")
        pick = lambda name: [d / name] if (d / name).is_file() else None
        return [d / "train.tsv"], pick("dev.tsv"), a.test or pick("test.tsv"), False
    if a.train:
        return a.train, a.dev, a.test, False
    prepared = GLUE_DIR / PREPARED.get(a.task, "-")
    if (prepared / "train.tsv").is_file():
        print(f"using {prepared} (no --train given)")
        return [prepared / "train.tsv"], [prepared / "dev.tsv"], a.test, False
    if a.task == "binary":
        train_path, dev_path = write_sample_binary(SAMPLE_DIR)
        print(f"no --train given and nothing prepared: using the built-in sample {SAMPLE_DIR} "
              f"(for SST-2: python data/prepare_glue.py --task sst2)")
        return [train_path], a.dev or [dev_path], a.test, True
    raise FinetuneError(f"--train: required for --task {a.task} (or prepare GLUE data: python data/prepare_glue.py)")


def encode_split(tokenizer, task, ex, gold, max_length) -> dict:
    """An evaluation split, tokenized: "ids"/"types"; for simcse each side of the pair alone ("a_ids", "b_ids", ...)."""
    if task != "simcse":
        ids, types = encode(tokenizer, ex.texts, ex.pairs, max_length)
        return {"ids": ids, "types": types, "gold": gold, "examples": ex}
    (a_ids, a_types), (b_ids, b_types) = (encode(tokenizer, side, None, max_length) for side in (ex.texts, ex.pairs))
    return {"a_ids": a_ids, "a_types": a_types, "b_ids": b_ids, "b_types": b_types, "gold": gold, "examples": ex}


def default_metric(task, layout):
    known = TASKS[task].metrics
    return "mcc" if layout == "cola" and "mcc" in known else known[0]


def read_split(a, paths, task, classes, need_labels=True):
    ex = read_examples(paths, a.text_col, a.text_pair_col, a.label_col, need_labels=need_labels).head(a.max_eval_examples)
    if task == "pair" and ex.pairs is None:
        raise FinetuneError(f"--task pair: {paths[0]} has no second text column (name it with --text-pair-col)")
    gold = None if ex.labels is None else encode_labels("regression" if task == "simcse" else task, ex, classes)
    return ex, gold


# -----------------------------------------------------------------------------------------------------
# the run


def run(argv=None) -> dict:
    """Parse, fine-tune (or ensemble), write the outputs; returns {"metrics", "model", "tokenizer", "info"}."""
    a = build_parser().parse_args(argv)
    check_args(a)
    if a.tasks:
        return run_multitask(a)
    if a.ensemble:
        return run_ensemble(a)
    task, t0 = a.task, time.time()
    train_paths, dev_paths, test_paths, sample = resolve_data(a)

    # the training examples decide the classes, which decide the head
    if task == "simcse":
        sentences, classes, layout = read_sentences(train_paths, a.text_col, max_sentences=a.max_train_examples), None, "text"
        dev_paths = dev_paths or ([GLUE_DIR / "stsb" / "dev.tsv"] if (GLUE_DIR / "stsb" / "dev.tsv").is_file() else None)
    else:
        train_ex = read_examples(train_paths, a.text_col, a.text_pair_col, a.label_col).head(a.max_train_examples)
        if task == "pair" and train_ex.pairs is None:
            raise FinetuneError(f"--task pair: {train_paths[0]} has no second text column (name it with --text-pair-col)")
        classes, layout = label_classes(task, train_ex), train_ex.layout
    num_outputs = 1 if TASKS[task].one_output else len(classes)

    init = pathlib.Path(a.init) if a.init else DEFAULT_INIT
    torch.manual_seed(a.seed)            # a fresh head (and pooler) is the same in every run, not the RNG's leftovers
    if init.is_dir() or a.init:
        model, tokenizer = load_init(init, task, num_outputs, a.pooling, a.dropout)
        scratch = False
    elif sample:
        print(f"no --init given and {DEFAULT_INIT} does not exist (create it with: python pretrain.py): training a "
              "small model from random initialisation on the sample instead")
        model, tokenizer = scratch_init(train_ex.texts, num_outputs, a.dropout)
        scratch = True
    else:
        raise FinetuneError(f"--init: the default {DEFAULT_INIT} does not exist; create it with `python pretrain.py`, "
                            "or pass --init DIR (any BERT-layout folder, e.g. all-MiniLM-L6-v2)")
    max_length = min(a.max_length or (32 if task == "simcse" else 128), model.config.max_position)

    # encode once
    if task == "simcse":
        train_ids, train_types = encode(tokenizer, sentences, None, max_length)
        train_labels, n_train = None, len(sentences)
    else:
        train_ids, train_types = encode(tokenizer, train_ex.texts, train_ex.pairs, max_length)
        train_labels, n_train = encode_labels(task, train_ex, classes), len(train_ex)
    dev = test = None
    if dev_paths:
        dev_ex, gold = read_split(a, dev_paths, task, classes)
        if task == "simcse" and dev_ex.pairs is None:
            raise FinetuneError(f"--dev {dev_paths[0]}: simcse is judged on sentence pairs with scores (STS-B)")
        dev = encode_split(tokenizer, task, dev_ex, gold, max_length)
    if test_paths and task != "simcse":
        test = encode_split(tokenizer, task, *read_split(a, test_paths, task, classes, need_labels=False), max_length)

    metric = a.metric or default_metric(task, layout)
    known = TASKS[task].metrics
    if metric not in known:
        raise FinetuneError(f"--metric: {metric!r} is not a dev metric of --task {task}; choose one of {', '.join(known)}")
    if a.early_stopping and dev is None:
        raise FinetuneError("--early-stopping: needs a dev set (--dev)")

    # method, then the data pipeline and the schedule
    options = {name: getattr(a, name) for name in known_options()}
    apply_peft(model, a.method, **options)
    summary = trainable_summary(model)
    dist_env = Dist(a.device)
    batch_size = a.batch_size or (64 if task == "simcse" else 32)
    slots = dist_env.world_size * a.grad_accum
    steps_per_epoch = max(1, math.ceil(n_train / (batch_size * slots)))
    epochs = a.epochs if a.epochs is not None else (10 if scratch else 3)
    cfg = TrainConfig.from_args(   # the loop's flags, with the defaults that depend on the task and the data
        a, batch_size=batch_size, max_steps=a.max_steps or max(1, math.ceil(epochs * steps_per_epoch)),
        lr=a.lr or (SCRATCH_LR if scratch else SIMCSE_LR if task == "simcse" and a.method == "full" else METHODS[a.method].lr),
        eval_every=steps_per_epoch if a.eval_every is None else a.eval_every)
    augmenter = None
    if a.augment:
        table = nearest_neighbours(model.encoder.embed.tok.weight, tokenizer, {i for x in train_ids for i in x})
        augmenter = Augmenter(table, tokenizer.special_ids, rate=a.augment, max_length=max_length)
    data = TaskDataset(train_ids, train_types, train_labels, cfg.batch_size, slots, cfg.seed, tokenizer.pad_id,
                       label_dtype=TASKS[task].label_dtype, augmenter=augmenter)
    if dist_env.is_main:
        print(f"{task}: {n_train:,} training examples, {cfg.max_steps:,} steps of {cfg.batch_size * slots} "
              f"({cfg.max_steps / steps_per_epoch:.1f} epochs), lr {cfg.lr:g}, method {a.method}: "
              f"{summary['trainable']:,} of {summary['total']:,} parameters train ({summary['percent']:.2f}%)")

    eval_fn = (lambda m: evaluate(m, task, dev, tokenizer.pad_id)[0]) if dev else None
    before = None
    if task == "simcse" and dev:
        model.eval()
        before = evaluate(model.to(dist_env.device), task, dev, tokenizer.pad_id)[0]
        model.train()
        print(f"before training: STS spearman {before['spearman']:.4f}")
    monitor = (metric, "min" if metric in MIN_METRICS else "max", a.early_stopping) if a.early_stopping else None
    t_train = time.time()
    result = train(model, make_loss_fn(a, model), data, cfg, dist_env, eval_fn=eval_fn, monitor=monitor,
                   log_fields={"epoch_steps": steps_per_epoch})
    train_seconds = time.time() - t_train

    info = {"task": task, "labels": classes, "label_map": None if classes is None else {c: i for i, c in enumerate(classes)},
            "num_outputs": num_outputs, "columns": None if task == "simcse" else train_ex.columns, "layout": layout,
            "max_length": max_length, "method": a.method, "peft": options if a.method != "full" else None,
            "pooling": a.pooling, "metric": metric,
            "init": "scratch" if scratch else str(init)}
    out = {"metrics": None, "model": model, "tokenizer": tokenizer, "info": info}
    if dist_env.is_main:
        model.eval()
        report = {"dev": evaluate(model, task, dev, tokenizer.pad_id) if dev else None,
                  "test": evaluate(model, task, test, tokenizer.pad_id) if test else None}
        metrics = {k: v[0] for k, v in report.items() if v and v[0]}
        if a.eval_attack_eps and dev:
            metrics["dev"]["robust_accuracy"] = robust_accuracy(model, task, dev, tokenizer.pad_id, a.eval_attack_eps,
                                                                a.eval_attack_steps, a.adv_alpha)
        if before:
            metrics["dev_before"] = before
        print(format_table(metrics, title=f"{task} / {a.method}"))
        seen = examples_seen(data, result["step"])
        record = {**metrics, "task": task, "method": a.method, "metric": metric, "best": result["best"],
                  "trainable_params": summary["trainable"], "total_params": summary["total"],
                  "trainable_percent": summary["percent"], "encoder_trainable_percent": summary["encoder_percent"],
                  "steps": result["step"], "stopped_early": result["stopped_early"], "train_examples": n_train,
                  "examples_seen": seen, "seconds": time.time() - t0, "train_seconds": train_seconds,
                  "examples_per_s": seen / max(train_seconds, 1e-9)}
        save_finetuned(a.out, model, tokenizer, info)
        write_json(os.path.join(a.out, "metrics.json"), record)
        for name, key, split in (("predictions.tsv", "dev", dev), ("predictions_test.tsv", "test", test)):
            if split:
                write_predictions(os.path.join(a.out, name), task, split["examples"], report[key][1], classes)
        print(f"wrote {a.out}: model, labels.json, metrics.json, predictions")
        out["metrics"] = record
    dist_env.close()
    return out


# -----------------------------------------------------------------------------------------------------
# multi-task: the same loop, with multitask.MultiTaskData and one head per task


def run_multitask(a) -> dict:
    """--tasks: read and encode every task, train one MultiTaskClassifier with trainer.train, write one
    fine-tuned folder per task (--out/NAME) and the root metrics.json / multitask.json."""
    specs, t0 = parse_tasks(a.tasks), time.time()
    train_ex = {}
    for s in specs:
        ex = read_examples(s.train, a.text_col, a.text_pair_col, a.label_col).head(a.max_train_examples)
        if s.kind == "pair" and ex.pairs is None:
            raise FinetuneError(f"--tasks {s.name}: {s.train[0]} has no second text column (name it with --text-pair-col)")
        train_ex[s.name] = ex
    classes = {s.name: label_classes(s.kind, train_ex[s.name]) for s in specs}
    outputs = {s.name: 1 if TASKS[s.kind].one_output else len(classes[s.name]) for s in specs}
    init = pathlib.Path(a.init) if a.init else DEFAULT_INIT
    if not init.is_dir() and not a.init:
        raise FinetuneError(f"--init: the default {DEFAULT_INIT} does not exist; pass --init DIR (any BERT-layout folder)")
    torch.manual_seed(a.seed)            # fresh heads (and a pooler the checkpoint lacks): the same in every run
    base, tokenizer = load_init(init, "binary", 1, a.pooling, a.dropout)
    model = MultiTaskClassifier.around(base, outputs)
    max_length = min(a.max_length or 128, model.config.max_position)

    tasks = {}                     # name -> what training, evaluation and saving need of that task
    for s in specs:
        ex = train_ex[s.name]
        ids, types = encode(tokenizer, ex.texts, ex.pairs, max_length)
        dev = encode_split(tokenizer, s.kind, *read_split(a, s.dev, s.kind, classes[s.name]), max_length) if s.dev else None
        tasks[s.name] = {"kind": s.kind, "ids": ids, "types": types, "labels": encode_labels(s.kind, ex, classes[s.name]),
                         "dev": dev, "metric": default_metric(s.kind, ex.layout), "examples": ex}
    metric = a.metric or "average"
    known = ["average"] + [f"{n}/{m}" for n, t in tasks.items() for m in TASKS[t["kind"]].metrics]
    if metric not in known:
        raise FinetuneError(f"--metric: with --tasks, expected average or NAME/METRIC ({', '.join(known[:4])}, ...), got {metric!r}")
    if not any(t["dev"] for t in tasks.values()) and (a.early_stopping or a.metric):
        raise FinetuneError("--early-stopping/--metric: needs a dev set in at least one task (NAME:KIND:TRAIN:DEV)")

    options = {name: getattr(a, name) for name in known_options()}
    apply_peft(model, a.method, **options)
    summary = trainable_summary(model)
    dist_env = Dist(a.device)
    batch_size, slots = a.batch_size or 32, dist_env.world_size * a.grad_accum
    sizes = [len(tasks[s.name]["ids"]) for s in specs]
    steps_per_epoch = max(1, math.ceil(sum(sizes) / (batch_size * slots)))    # all tasks' batches, once
    cfg = TrainConfig.from_args(a, batch_size=batch_size, lr=a.lr or METHODS[a.method].lr,
                                max_steps=a.max_steps or max(1, math.ceil((a.epochs or 3) * steps_per_epoch)),
                                eval_every=steps_per_epoch if a.eval_every is None else a.eval_every)
    p = sampling_probabilities(sizes, a.task_sampling, a.sampling_temperature)
    data = MultiTaskData({n: TaskDataset(t["ids"], t["types"], t["labels"], cfg.batch_size, slots, cfg.seed,
                                         tokenizer.pad_id, label_dtype=TASKS[t["kind"]].label_dtype)
                          for n, t in tasks.items()}, TaskSampler(p, cfg.seed))
    if dist_env.is_main:
        print(f"{len(tasks)} tasks, {cfg.max_steps:,} steps of {cfg.batch_size * slots}, lr {cfg.lr:g}, method "
              f"{a.method}: {summary['trainable']:,} of {summary['total']:,} parameters train")
        for (n, t), n_t, p_t in zip(tasks.items(), sizes, p):
            print(f"  {n} ({t['kind']}): {n_t:,} examples, p = {p_t:.3f}, ~{p_t * cfg.max_steps:.0f} steps "
                  f"= {p_t * cfg.max_steps * cfg.batch_size * slots / n_t:.2f} epochs, judged by {t['metric']}")

    def loss_fn(model, batch):
        """The step's task's head and loss, summed over its examples (the loop divides by their number)."""
        logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}, task=batch["task"])
        return task_loss(tasks[batch["task"]]["kind"], batch["labels"], a.label_smoothing)(logits)

    eval_fn = (lambda m: evaluate_tasks(unwrap(m), tasks, tokenizer.pad_id)[0]) if any(t["dev"] for t in tasks.values()) else None
    monitor = (metric, "min" if metric.rsplit("/", 1)[-1] in MIN_METRICS else "max", a.early_stopping) if a.early_stopping else None
    t_train = time.time()
    result = train(model, loss_fn, data, cfg, dist_env, eval_fn=eval_fn, monitor=monitor,
                   log_fields={"epoch_steps": steps_per_epoch})
    train_seconds = time.time() - t_train
    out = {"metrics": None, "model": model, "tokenizer": tokenizer, "tasks": {}}
    if dist_env.is_main:
        model.eval()
        flat, preds = evaluate_tasks(model, tasks, tokenizer.pad_id) if eval_fn else ({}, {})
        steps = data.steps_per_task(result["step"])
        record = {"tasks": {}, "average": flat.get("average"), "metric": metric, "best": result["best"],
                  "steps": result["step"], "stopped_early": result["stopped_early"], "task_sampling": a.task_sampling,
                  "sampling_temperature": a.sampling_temperature if a.task_sampling == "temperature" else None,
                  "method": a.method, "trainable_params": summary["trainable"], "total_params": summary["total"],
                  "seconds": time.time() - t0, "train_seconds": train_seconds,
                  "evaluations": eval_history(os.path.join(a.out, "metrics.jsonl"))}
        for (n, t), s, p_t in zip(tasks.items(), specs, p):
            info = {"task": t["kind"], "labels": classes[n], "num_outputs": outputs[n],
                    "label_map": None if classes[n] is None else {c: i for i, c in enumerate(classes[n])},
                    "columns": t["examples"].columns, "layout": t["examples"].layout, "max_length": max_length,
                    "method": a.method, "peft": options if a.method != "full" else None, "pooling": a.pooling,
                    "metric": t["metric"], "init": str(init), "multitask": {"name": n, "tasks": list(tasks)}}
            dev_metrics = {k.split("/", 1)[1]: v for k, v in flat.items() if k.startswith(n + "/")}
            mine = {"task": t["kind"], "name": n, "dev": dev_metrics or None, "metric": t["metric"],
                    "train_examples": len(t["ids"]), "sampling_probability": float(p_t), "steps": steps[n],
                    "examples_seen": examples_seen(data.datasets[n], steps[n])}
            record["tasks"][n] = mine
            folder = os.path.join(a.out, n)
            save_finetuned(folder, model.task_model(n), tokenizer, info)
            write_json(os.path.join(folder, "metrics.json"), {**mine, "multitask": a.out})
            if t["dev"]:
                write_predictions(os.path.join(folder, "predictions.tsv"), t["kind"], t["dev"]["examples"], preds[n], classes[n])
            out["tasks"][n] = {"info": info, "folder": folder}
        print(format_table({n: r["dev"] for n, r in record["tasks"].items() if r["dev"]}, title=f"{len(tasks)} tasks / {a.method}"))
        write_json(os.path.join(a.out, "metrics.json"), record)
        write_json(os.path.join(a.out, "multitask.json"), {"tasks": {s.name: {"kind": s.kind, "folder": s.name,
                                                           "train": s.train, "dev": s.dev} for s in specs}})
        print(f"wrote {a.out}: one fine-tuned folder per task ({', '.join(tasks)}), metrics.json, multitask.json")
        out["metrics"] = record
    dist_env.close()
    return out


def evaluate_tasks(model, tasks, pad_id) -> tuple[dict, dict]:
    """({"NAME/METRIC": value, ..., "average": mean of each task's own metric}, {NAME: predictions}) over
    the tasks with a dev set; each task evaluated through its own head (MultiTaskClassifier.task_model)."""
    flat, preds, chosen = {}, {}, []
    for name, t in tasks.items():
        if t["dev"]:
            metrics, preds[name] = evaluate(model.task_model(name), t["kind"], t["dev"], pad_id)
            flat.update({f"{name}/{k}": v for k, v in metrics.items()})
            chosen.append(metrics[t["metric"]])
    flat["average"] = float(np.mean(chosen))
    return flat, preds


def eval_history(path) -> list[dict]:
    """The evaluations of the run as metrics.jsonl holds them (a resumed run's too): [{"step", "NAME/METRIC"...}]."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    return [{"step": r["step"], **{k[5:]: v for k, v in r.items() if k.startswith("eval/")}}
            for r in rows if any(k.startswith("eval/") for k in r)]


def examples_seen(data, steps) -> int:
    """Training examples read in `steps` optimizer steps (an epoch's last batch may be short)."""
    c = steps * data.slots
    full, rest = divmod(c, data.batches_per_epoch)
    return full * len(data) + sum(len(b) for b in data.epoch_batches(full)[:rest])


def run_ensemble(a) -> dict:
    """Average the probabilities (regression: the scores) of several fine-tuned models on --dev / --test."""
    dirs = [d for d in a.ensemble.split(",") if d]
    if len(dirs) < 2:
        raise FinetuneError(f"--ensemble: expected two or more comma-separated folders, got {a.ensemble!r}")
    members = [load_finetuned(d) for d in dirs]
    info = members[0][2]
    for d, (_, _, other) in zip(dirs[1:], members[1:]):
        if (other["task"], other["labels"]) != (info["task"], info["labels"]):
            raise FinetuneError(f"--ensemble: {d} is a {other['task']} model with labels {other['labels']}, "
                                f"{dirs[0]} a {info['task']} model with labels {info['labels']}")
    if info["task"] == "simcse":
        raise FinetuneError("--ensemble: averages classifier probabilities or regression scores, not simcse encoders")
    dev_paths = a.dev or ([pathlib.Path(a.data) / "dev.tsv"] if a.data else None)
    if not dev_paths:
        raise FinetuneError("--ensemble: needs --dev (or --data) to evaluate on")
    task, classes, metrics = info["task"], info["labels"], {}
    os.makedirs(a.out, exist_ok=True)
    for split, paths, name in (("dev", dev_paths, "predictions.tsv"), ("test", a.test, "predictions_test.tsv")):
        if not paths:
            continue
        ex, gold = read_split(a, paths, task, classes, need_labels=split == "dev")
        probs = np.mean([predict_proba(m, tok, ex.texts, ex.pairs, inf) for m, tok, inf in members], axis=0)
        if gold is not None:
            metrics[split] = (regression_metrics(gold, probs) if TASKS[task].score_name
                              else classification_metrics(gold, probs))
        write_predictions(os.path.join(a.out, name), task, ex, probs, classes)
    print(format_table(metrics, title=f"ensemble of {len(dirs)}"))
    write_json(os.path.join(a.out, "metrics.json"), {**metrics, "task": task, "ensemble": dirs})
    return {"metrics": metrics, "info": info}


def write_predictions(path, task, ex, pred, classes):
    """One row per example: text [pair] [gold] prediction, then p(class) per class or the score."""
    score = TASKS[task].score_name                           # one value per example, or classes
    head = ["text"] + (["pair"] if ex.pairs is not None else []) + (["gold"] if ex.labels is not None else [])
    head += [score] if score else ["prediction"] + [f"p_{c}" for c in classes]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\t".join(head) + "\n")
        for i, text in enumerate(ex.texts):
            row = [text] + ([ex.pairs[i]] if ex.pairs is not None else []) + ([ex.labels[i]] if ex.labels is not None else [])
            if score:
                row.append(f"{pred[i]:.6f}")
            else:
                row += [classes[int(pred[i].argmax())]] + [f"{p:.6f}" for p in pred[i]]
            f.write("\t".join(r.replace("\t", " ") for r in row) + "\n")


def main(argv=None) -> int:
    """The command line: 0, or 2 after printing `error: <flag/file>: <what was expected>` (no traceback)."""
    try:
        run(argv)
    except (FinetuneError, TaskDataError, CheckpointError, TokenizerError, PeftError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
