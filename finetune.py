"""Fine-tune a pre-trained encoder on a labelled task, or train a sentence encoder with SimCSE.

    python finetune.py --task binary                        # no data, no model: a built-in sample, see below
    python finetune.py --task binary --init out/pretrain --data data/glue/sst2
    python finetune.py --task binary --init $MINILM --data data/glue/sst2 --method lora
    python finetune.py --task regression --init $MINILM --data data/glue/stsb
    python finetune.py --task simcse --init $MINILM --train sentences.txt --dev data/glue/stsb/dev.tsv
    python finetune.py --task prompt --init out/pretrain --data data/glue/sst2 --verbalizer terrible,great
    python finetune.py --task binary --ensemble out/a,out/b --dev data/glue/sst2/dev.tsv --out out/ens
    python finetune.py --init $MINILM --tasks sst2:binary:sst2/train.tsv:sst2/dev.tsv \\
        stsb:regression:stsb/train.tsv:stsb/dev.tsv cola:binary:cola/in_domain_train.tsv:cola/in_domain_dev.tsv

Tasks: the head, the loss, the metric that picks the best checkpoint
    binary      one logit, binary cross-entropy          accuracy (MCC for CoLA)
    multiclass  K logits, softmax cross-entropy          accuracy
    pair        K logits over (text, text pair)          accuracy
    regression  one output, mean squared error           Spearman (STS-B)
    simcse      the encoder alone: InfoNCE between two dropout views of each sentence (Gao et al. 2021),
                judged by the Spearman correlation of cosine similarities with STS-B scores, before and after
    token       K logits per word (its first sub-word)     entity-level F1 (conlleval), from CoNLL files
    qa          start and end logits over the context      SQuAD F1 and exact match, from SQuAD JSON
    prompt      classes asked as a cloze (PET, LM-BFF): each text put into --template ("{text} It was [MASK] ."),
                the masked-LM head's scores of one --verbalizer word per class at its [MASK], softmax
                cross-entropy; nothing starts at random (needs an --init with an MLM head)     accuracy
Any sentence task reads a second text column when the file has one (MRPC, RTE, QNLI, STS-B pairs).

--init is a pretrain.py output (default out/pretrain) or any BERT-layout folder (config.json, weights,
vocab.txt), e.g. all-MiniLM-L6-v2, or a fine-tuned one: a head with this task's outputs is kept (a binary
folder's two logits [0, z] folded back into z), so fine-tuning goes on from it; any other starts afresh. With no --train and nothing prepared (data/glue/sst2 from
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

from config import (PEFT_OPTIONS, SAMPLING, TASK_KINDS, TEMPLATE, VERBALIZER, add_prompt_args, add_training_args,
                    known_options, template_problem)

ROOT = pathlib.Path(__file__).resolve().parent
DEFAULT_INIT = ROOT / "out" / "pretrain"
SAMPLE_DIR = ROOT / "data" / "sample_binary"
GLUE_DIR = ROOT / "data" / "glue"
PREPARED = {"binary": "sst2", "regression": "stsb"}      # used when --train is not given and it exists
SCRATCH_LR, SIMCSE_LR = 1e-3, 3e-5                      # a method's own peak lr: peft.METHODS
# The default recipe (resolve_recipe). A full fine-tune of a pre-trained model: narrower models take larger
# steps (MiniLM-L6 at 384 wide: 1e-4, the plain transformers loop of issue #16; BERT-base: 2e-5..5e-5,
# Devlin et al.; large: 1e-5..2e-5). Random weights need 3e-4 (the tiny sample model 1e-3) to leave one class.
# The narrowest (BERT-Tiny's 128, Mini's 256; Turc et al. 2019 chose among 3e-4..3e-5) take 3e-4. SST-2's first
# 1,000, dev MCC at the median of 3 seeds, 1e-4 -> 3e-4: a 2 x 128 pre-trained here 0.12 -> 0.34, a 4 x 256 0.32
# -> 0.41 (README, #16).
PRETRAINED_LR = ((256, 3e-4), (384, 1e-4), (768, 5e-5), (math.inf, 2e-5))     # (up to this hidden size, peak lr)
SCRATCH_LR_BY_WIDTH = ((128, SCRATCH_LR), (math.inf, 3e-4))
# A long schedule of a pre-trained model takes smaller steps: past LONG_RUN[0] optimizer steps the table's
# lr shrinks as sqrt(LONG_RUN[0] / steps), never below LONG_RUN[1] of it (reached at 4x). SST-2 in full
# (6,315 steps) then fine-tunes MiniLM-L6 at 5e-5: +0.58, +0.58, +2.07 on seeds 1-3 against 1e-4 (README, #16),
# while the 2k and 8k comparisons with the plain loop (126-750 steps) keep the table's lr.
LONG_RUN = (1500, 0.5)
# A small set trains in batches of 16 (BERT's fine-tuning grid is {16, 32}): at a fixed epoch count it takes
# twice the optimizer steps. SST-2's first 2,000, 2 epochs, seeds 1-3: 83.60 median at 16 against 81.88 at 32
# (the plain loop at 32: 83.83; README, #16). The 8,000-example comparison (86.93 at 32) keeps 32.
SMALL_SET = (4000, 16)                 # fewer training examples than this: this batch size, else 32
MIN_STEPS = {True: 300, False: 600}    # pre-trained?: optimizer steps even a small set gets (random: more)
EPOCHS = (3, 20)                       # the default epoch count: at least 3, at most 20 (for MIN_STEPS)
HELDOUT = (0.1, 100, 1000)             # with no dev set: this fraction of train picks the checkpoint, clamped
FINETUNE_DROPOUT = 0.1                 # when the checkpoint was pre-trained without dropout (ours: 0)
SPAN_CLIP = 1.0                        # gradient-norm clip of token/QA/multi-task runs (classification: none)
# binary trains one logit z with BCE; transformers' BertForSequenceClassification two, z1 - z0 = (w1 - w0).h,
# with softmax cross-entropy. Their gradients on w1 and w0 are equal and opposite, so Adam moves each by
# the same lr-sized step and the margin's weights w1 - w0 by twice lr: the one-logit head at 2x lr takes
# exactly those steps (tests/test_recipe.py checks the two heads step for step).  [eq:binary-head-lr]
HEAD_LR_SCALE = {"binary": 2.0}        # task -> the head's lr / the encoder's; every other task: 1
NEVER = 10 ** 9                        # "patience" of plain best-checkpoint selection: it never stops early
MIN_METRICS = ("loss", "mse")                            # smaller is better; every other metric: larger


# -----------------------------------------------------------------------------------------------------
# command line


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """--help: the module docstring as written (once), and each flag's default where it has one."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default not in (None, False, argparse.SUPPRESS) and "default" not in text:
            text += (" " if text else "") + "(default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter, allow_abbrev=False)
    g = p.add_argument_group("task and data")
    g.add_argument("--task", choices=TASK_KINDS, help="what the labels are: see Tasks above (default: binary; not with --tasks)")
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
    g.add_argument("--length-bucket", type=int, metavar="N", help="sort examples by length within chunks of N "
                   "batches before cutting batches (less padding, faster; batches of one length can cost accuracy "
                   "where length goes with the label). Default 1: random batches")
    g.add_argument("--max-train-examples", type=int, help="use only the first N training examples")
    g.add_argument("--max-eval-examples", type=int, help="use only the first N dev/test examples")
    g.add_argument("--epochs", type=float, help="converted to --max-steps when that is not given (default: "
                   f"enough for {MIN_STEPS[True]} steps ({MIN_STEPS[False]} from random weights), {EPOCHS[0]} to {EPOCHS[1]})")
    g.add_argument("--select", choices=["auto", "dev", "heldout", "last"], default="auto",
                   help="which weights to keep: the best on dev, the best on a held-out part of train (then dev "
                   "is judged fairly), or the last (auto: dev when there is one, else heldout)")
    g.add_argument("--head-lr-scale", type=float, help="the classifier head's lr as a multiple of --lr (default: 2 "
                   "for binary's one logit, which then steps as a two-logit softmax head does; else 1)")
    g.add_argument("--layer-decay", type=float, default=1.0, metavar="XI", help="layer-wise lr decay: the top "
                   "encoder layer trains at --lr, each layer below at XI times the one above, the embeddings "
                   "below the first layer; the head and pooler at --lr (default 1: every layer alike)")
    g.add_argument("--seeds", type=int, default=1, help="run N seeds (--seed, --seed+1, ...) into --out/seedK "
                   "and report the median and the spread")
    g.add_argument("--metric", help="dev metric for early stopping and the best model "
                   "(default accuracy; mcc for CoLA; spearman for regression and simcse)")
    g.add_argument("--early-stopping", type=int, metavar="PATIENCE", help="stop after PATIENCE evaluations "
                   "without improvement and restore the best weights")
    g.add_argument("--ensemble", help="DIR1,DIR2,...: evaluate the mean of these fine-tuned models' probabilities")
    g = p.add_argument_group("method")
    g.add_argument("--method", choices=list(PEFT_OPTIONS), default="full", help="what trains: every weight, or a PEFT method")
    for name, (default, kind, help) in known_options().items():        # --lora-r, --adapter-size, ...
        g.add_argument("--" + name.replace("_", "-"), type=kind, default=default, help=help)
    g.add_argument("--dropout", type=float, help="override the checkpoint's dropout (hidden and attention)")
    g.add_argument("--label-smoothing", type=float, default=0.0, help="target eps/K on every class (binary: eps/2)")
    g.add_argument("--rdrop", type=float, default=0.0, metavar="ALPHA", help="R-Drop: weight of the symmetric KL")
    g.add_argument("--contrastive-weight", type=float, default=0.0, help="add W x supervised contrastive loss")
    g.add_argument("--contrastive-temperature", type=float, default=0.1, help="its temperature tau")
    g.add_argument("--adversarial", choices=["none", "fgm", "pgd", "freelb"], default="none",
                   help="train on perturbed embeddings too (adversarial.py)")
    g.add_argument("--adv-eps", type=float, default=1.0, help="L2 radius of the perturbation, per example")
    g.add_argument("--adv-alpha", type=float, help="ascent step (default 2.5 eps / steps)")
    g.add_argument("--adv-steps", type=int, default=3, help="ascent steps of pgd / freelb")
    g.add_argument("--eval-attack-eps", type=float, help="also report dev accuracy under a PGD attack of this size")
    g.add_argument("--eval-attack-steps", type=int, default=10, help="steps of that attack")
    g.add_argument("--augment", choices=["none", "eda", "backtranslate"], default="none",
                   help="edit training texts on the fly (augment.py): EDA on words with WordNet synonyms, or "
                   "back-translation paraphrases")
    g.add_argument("--augment-rate", type=float, default=0.1, help="eda: fraction of words one edit changes (0.1)")
    g.add_argument("--wordnet", help="eda: a WordNet 3.0 dict folder (default $WORDNET_DIR or /usr/share/wordnet)")
    g.add_argument("--translator", help="backtranslate: a translation model folder, English -> another language")
    g.add_argument("--translator-back", help="backtranslate: the folder translating back into English")
    g.add_argument("--translation-cache", help="backtranslate: JSON cache of paraphrases (default OUT/../"
                   "backtranslations.json, shared by runs)")
    g.add_argument("--temperature", type=float, default=0.05, help="simcse: InfoNCE temperature")
    g.add_argument("--pooling", choices=["cls", "mean"], default="cls", help="sentence vector: the [CLS] state (BERT) or the mean of the real tokens' states (often "
                   "better for a model pre-trained with MLM alone, and simcse's choice)")
    g = p.add_argument_group("prompt-based fine-tuning (--task prompt)")
    add_prompt_args(g, defaults=False)
    g = p.add_argument_group("token classification and question answering (--task token / qa)")
    g.add_argument("--doc-stride", type=int, default=128, help="qa: context tokens between the starts of "
                   "overlapping windows over a long context (default 128)")
    g.add_argument("--max-answer-length", type=int, default=30, help="qa: longest answer, in tokens (default 30)")
    g.add_argument("--max-query-length", type=int, default=64, help="qa: question tokens kept (default 64)")
    g.add_argument("--train-articles", metavar="START:END", help="qa: only these articles of the --train file "
                   "(e.g. 0:24), so one SQuAD file can give train and dev by article")
    g.add_argument("--dev-articles", metavar="START:END", help="qa: only these articles of the --dev file (e.g. 24:)")
    add_training_args(p, out="out/finetune", max_steps=None, lr=None, batch_size=None, beta2=0.999, eval_every=None,
                      clip=None)
    return p


if __name__ == "__main__":       # --help and a bad flag are answered before the imports below load torch
    build_parser().parse_args()

# the heavy imports come after the command line, on purpose (E402)
import numpy as np
import torch
import torch.nn.functional as F

import adversarial
import losses
from atomic import write_json
from augment import AugmentError, build_augmenter
from data.tasks import (TaskDataError, TaskDataset, encode_labels, eval_order, label_classes, read_examples,
                        read_sentences, write_sample_binary)
from data.spans import (encode_sentences, parse_articles, qa_features, read_conll, read_squad, span_labels,
                        tag_classes, TokenDataset)
from finetuned import (SPAN_TASKS, TASKS, FinetuneError, answer_spans, batch_of, build_model, cloze_ids, encode, infer,
                       infer_tokens, load_finetuned, predict_proba, save_finetuned, stored_head_rows, word_tags)
from metrics import (classification_metrics, entity_scores, format_table, regression_metrics, spearman, pearson,
                     squad_scores)
from model import CheckpointError, EncoderConfig, MultiTaskClassifier, SequenceClassifier, unwrap
from multitask import MultiTaskData, TaskSampler, parse_tasks, sampling_probabilities
from plots import plot_metrics
from peft import METHODS, PeftError, apply_peft, trainable_summary
from tokenizer import SentencePieceTokenizer, TokenizerError, load_tokenizer
from trainer import EX_TEMPFAIL, Dist, RunError, TrainConfig, file_fingerprint, train


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


def check_args(a):
    if not 0 < a.layer_decay <= 1:
        raise FinetuneError(f"--layer-decay: expected a factor in (0, 1] (1: no decay), got {a.layer_decay}")
    if a.length_bucket is not None and a.length_bucket < 1:
        raise FinetuneError(f"--length-bucket: expected a number of batches >= 1 (1: random batches), got {a.length_bucket}")
    if a.tasks:
        given = [f for f, on in (("--task", a.task), ("--data", a.data), ("--train", a.train), ("--dev", a.dev),
                                 ("--test", a.test), ("--ensemble", a.ensemble), ("--rdrop", a.rdrop),
                                 ("--contrastive-weight", a.contrastive_weight), ("--augment", a.augment != "none"),
                                 ("--adversarial", a.adversarial != "none"), ("--eval-attack-eps", a.eval_attack_eps),
                                 ("--fsdp", a.fsdp)) if on]
        if given:
            raise FinetuneError(f"--tasks: not combined with {', '.join(given)} (each task names its own files "
                                "in NAME:KIND:TRAIN[:DEV]; the rest is single-task only)")
    if a.fsdp:     # rank 0 alone evaluates and exports the trained model, which FSDP would hold in shards
        raise FinetuneError("--fsdp: finetune.py does not shard (a BERT-size model fits each device): run it "
                            "under torchrun without --fsdp for data parallelism; pretrain.py takes --fsdp")
    a.task = a.task or "binary"
    if a.task == "prompt":
        used = [flag for flag, on in (("--pooling mean", a.pooling != "cls"),
                                      ("--contrastive-weight", a.contrastive_weight)) if on]
        if used:       # the class scores come from the [MASK]'s state: no pooled sentence vector
            raise FinetuneError(f"{used[0]}: --task prompt reads the [MASK]'s state, no pooled vector")
        a.template, a.verbalizer = a.template or TEMPLATE, a.verbalizer or VERBALIZER
        if template_problem(a.template):
            raise FinetuneError(template_problem(a.template))
    elif a.template or a.verbalizer:
        raise FinetuneError(f"--template/--verbalizer: only with --task prompt, not --task {a.task}")
    if a.task in SPAN_TASKS:
        used = [flag for flag, on in (("--rdrop", a.rdrop), ("--contrastive-weight", a.contrastive_weight),
                                      ("--adversarial", a.adversarial != "none"), ("--augment", a.augment != "none"),
                                      ("--eval-attack-eps", a.eval_attack_eps), ("--ensemble", a.ensemble),
                                      ("--pooling mean", a.pooling != "cls")) if on]
        if used:
            raise FinetuneError(f"{used[0]}: works on one label per example, not with --task {a.task}")
        for flag, v in (("--doc-stride", a.doc_stride), ("--max-answer-length", a.max_answer_length),
                        ("--max-query-length", a.max_query_length)):
            if v < 1:
                raise FinetuneError(f"{flag}: expected a positive number of tokens, got {v}")
    elif a.train_articles or a.dev_articles:
        raise FinetuneError(f"--train-articles/--dev-articles: only for --task qa, not --task {a.task}")
    classify = TASKS[a.task].score_name is None           # the labels are classes
    if a.rdrop and not classify:
        raise FinetuneError(f"--rdrop: needs a classification task, not --task {a.task}")
    if a.contrastive_weight and not classify:
        raise FinetuneError(f"--contrastive-weight: needs a classification task, not --task {a.task}")
    if a.adversarial != "none" and (a.task == "simcse" or a.rdrop or a.contrastive_weight):
        raise FinetuneError("--adversarial: combine it with neither --rdrop, --contrastive-weight nor --task simcse")
    if a.eval_attack_eps and not classify:
        raise FinetuneError(f"--eval-attack-eps: needs a classification task, not --task {a.task}")
    if a.init and not pathlib.Path(a.init).is_dir():     # before anything is written (the sample, --out)
        raise FinetuneError(f"--init {a.init}: folder not found (expected a pretrain.py output or a BERT-layout "
                            "folder: config.json, model.safetensors, vocab.txt or tokenizer.model)")
    if a.data and (a.train or a.dev):
        raise FinetuneError("--data: give either --data DIR or --train/--dev files, not both")
    if not 0 < a.augment_rate < 1:
        raise FinetuneError(f"--augment-rate: expected a fraction in (0, 1), got {a.augment_rate}")
    if a.augment != "none" and a.task == "simcse":
        raise FinetuneError("--augment: simcse makes its own views (dropout); augment a labelled task")
    if a.augment != "backtranslate" and (a.translator or a.translator_back):
        raise FinetuneError("--translator/--translator-back: only with --augment backtranslate")
    if a.label_smoothing and not 0 <= a.label_smoothing < 1:
        raise FinetuneError(f"--label-smoothing: expected a value in [0, 1), got {a.label_smoothing}")


# -----------------------------------------------------------------------------------------------------
# the pre-trained model


def load_init(path, task, num_outputs, pooling="cls", dropout=None, prompt=None):
    """(model, tokenizer) from a BERT-layout folder; its tokenizer must have as many ids as its embedding table.
    prompt (--task prompt): (template, verbalizer words, classes, the training file), which set the tokenizer
    to the template and pick the class words' ids (finetuned.cloze_ids)."""
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
    cloze = cloze_ids(tokenizer, *prompt) if prompt else None
    return build_model(path, task, num_outputs, pooling, cloze=cloze, **overrides), tokenizer


def scratch_init(texts, num_outputs, dropout=None):
    """A small randomly initialised classifier and a SentencePiece tokenizer trained on `texts` (the
    built-in sample: its ~100 distinct words allow at most ~110 pieces, so 100)."""
    tokenizer = SentencePieceTokenizer.train(iter(texts), SAMPLE_DIR / "tokenizer", vocab_size=100, num_threads=1)
    cfg = EncoderConfig(vocab_size=tokenizer.vocab_size, hidden_size=64, num_layers=2, num_heads=2, max_position=128,
                        **({} if dropout is None else {"dropout": dropout, "attention_dropout": dropout}))
    return SequenceClassifier(cfg, num_outputs), tokenizer


# -----------------------------------------------------------------------------------------------------
# the default recipe: from the data, the model and the method


def is_pretrained(model) -> bool:
    """Fresh weights have every LayerNorm gain exactly 1 (init_weights, as pretrain.py starts); training moves them."""
    return any(not bool(torch.all(m.weight == 1)) for m in model.modules() if isinstance(m, torch.nn.LayerNorm))


def recipe_lr(a, task, model, steps: int) -> tuple[float, str]:
    """(lr, why): --lr, else the PEFT method's, else simcse's, else by the model's width and whether it is
    pre-trained, smaller for a pre-trained model's long schedule of `steps` (resolve_recipe; run_multitask
    uses it alone)."""
    width, pretrained = model.config.hidden_size, is_pretrained(model)
    if a.lr:
        return a.lr, "--lr"
    if a.method != "full":
        return METHODS[a.method].lr, f"--method {a.method} (peft.METHODS)"
    if task == "simcse":
        return SIMCSE_LR, "simcse on a pre-trained encoder (Gao et al. 2021)"
    table = PRETRAINED_LR if pretrained else SCRATCH_LR_BY_WIDTH
    lr = next(lr for up_to, lr in table if width <= up_to)
    why = f"full fine-tune, {'pre-trained' if pretrained else 'random weights'}, hidden size {width}"
    if pretrained and steps > LONG_RUN[0]:
        scale = max(math.sqrt(LONG_RUN[0] / steps), LONG_RUN[1])                     # [eq:long-run-lr]
        lr, why = lr * scale, (f"{why}; x {scale:.2f} for a long run of {steps:,} steps "
                               f"(sqrt({LONG_RUN[0]:,} / steps), at least {LONG_RUN[1]:g})")
    return lr, why


def resolve_recipe(a, task, n_train, model, has_dev, slots=1, head_from_init=False) -> tuple[dict, dict]:
    """(recipe, why): what this run trains with and the reason for each choice. A flag given wins; the rest
    follows from the training set's size, the model (its width; pre-trained or random weights; a head of
    its own: head_from_init) and the method."""
    r, why = {}, {}

    def choose(name, value, reason):
        r[name], why[name] = value, reason

    pretrained = is_pretrained(model)
    choose("pretrained", pretrained, "LayerNorm gains moved from 1" if pretrained else "every LayerNorm gain is 1: random weights")

    # selection: a checkpoint picked on dev makes the dev score it reports optimistic; a held-out part of
    # train costs training examples but leaves dev a fair judge
    too_few = n_train < 2 * HELDOUT[1]
    select = a.select if a.select != "auto" else "dev" if has_dev else "last" if task == "simcse" or too_few else "heldout"
    if select == "dev" and not has_dev:
        raise FinetuneError("--select dev: needs a dev set (--dev or --data)")
    if select == "heldout" and task == "simcse":
        raise FinetuneError("--select heldout: simcse's training sentences have no labels to judge on")
    held = min(max(round(HELDOUT[0] * n_train), HELDOUT[1]), HELDOUT[2]) if select == "heldout" else 0
    if held and n_train - held < held:
        raise FinetuneError(f"--select heldout: {n_train} training examples are too few to hold out {held}")
    choose("select", select, {"dev": "the best dev score (optimistic: the same dev picks and reports; --select heldout is fair)",
                              "heldout": f"the best on {held} training examples held out (no dev set given)" if not has_dev
                              else f"the best on {held} held-out training examples; dev judges fairly",
                              "last": "the last weights" + (f" (no dev set, and {n_train} training examples are too "
                                                            "few to hold some out)" if a.select == "auto" else "")}[select])
    choose("heldout", held, f"{HELDOUT[0]:.0%} of train, {HELDOUT[1]} to {HELDOUT[2]}" if held else "none")

    n_fit = n_train - held
    if a.batch_size:
        choose("batch_size", a.batch_size, "--batch-size")
    elif task == "simcse":
        choose("batch_size", 64, "SimCSE's: each sentence's negatives are the batch's other sentences")
    elif n_fit < SMALL_SET[0]:
        choose("batch_size", SMALL_SET[1], f"fewer than {SMALL_SET[0]:,} training examples: twice the steps of 32 an epoch")
    else:
        choose("batch_size", 32, "as transformers' loop")
    batch_size = r["batch_size"]          # per micro-batch; --grad-accum and ranks multiply it (slots)
    steps_per_epoch = max(1, math.ceil(n_fit / (batch_size * slots)))
    min_steps = MIN_STEPS[pretrained]
    if a.max_steps:
        choose("max_steps", a.max_steps, "--max-steps")
    elif a.epochs is not None:
        choose("max_steps", max(1, math.ceil(a.epochs * steps_per_epoch)), f"--epochs {a.epochs:g}")
    else:
        epochs = min(max(math.ceil(min_steps / steps_per_epoch), EPOCHS[0]), EPOCHS[1])
        choose("max_steps", epochs * steps_per_epoch, f"{epochs} epochs of {steps_per_epoch} steps: at least "
               f"{min_steps} steps ({'pre-trained' if pretrained else 'random weights'}) within {EPOCHS[0]}-{EPOCHS[1]} epochs")
    choose("epochs", round(r["max_steps"] / steps_per_epoch, 2), f"{steps_per_epoch} steps an epoch")
    choose("lr", *recipe_lr(a, task, model, r["max_steps"]))
    choose("warmup", a.warmup, "linear warm-up then linear decay to 0 (--warmup, --schedule)")
    choose("eval_every", a.eval_every if a.eval_every is not None else max(steps_per_epoch, math.ceil(r["max_steps"] / 20)),
           "--eval-every" if a.eval_every is not None else "every epoch, at most 20 evaluations")
    dropout = model.config.dropout
    if a.dropout is not None:
        choose("dropout", a.dropout, "--dropout")
    elif dropout == 0 and task != "simcse":
        choose("dropout", FINETUNE_DROPOUT, "the checkpoint was trained without dropout; fine-tuning regularises")
    else:
        choose("dropout", dropout, "the checkpoint's")
    if TASKS[task].head == "cloze":
        choose("head", "the pre-trained masked-LM head", "a cloze: its scores of the --verbalizer words at the "
               "template's [MASK]; nothing starts at random")
    elif head_from_init:
        choose("head", "from --init", "its classifier has this task's outputs (a two-logit binary head folded "
               "into one logit, z = l1 - l0): fine-tuning goes on from it")
    else:
        choose("head", "normal(0, 0.02), bias 0", "as transformers' BertForSequenceClassification")
    # Batches: examples drawn at random, as transformers' loop draws them. Sorting by length first (padding
    # saved, ~2x faster here) makes batches of one length, and in STS-B length goes with genre and score:
    # 2k pairs, 3 seeds, median 81.53 random against 80.73 sorted (README, issue #16).
    if a.length_bucket is not None:
        choose("length_bucket", a.length_bucket, "--length-bucket")
    else:
        choose("length_bucket", 1, "random batches, as transformers' (--length-bucket N sorts within N batches: faster)")
    choose("head_lr_scale", *head_lr_scale(a, task))
    choose("layer_decay", a.layer_decay, "--layer-decay" if a.layer_decay != 1 else
           "every encoder layer at the same lr, as transformers' loop")
    # 7 seeds on 2k-example sets, against the plain loop: SST-2 -0.34 clipped, -0.23 not; STS-B -0.67, -0.27
    choose("clip", clip_or(a, 0.0), "--clip" if a.clip is not None else
           "no gradient clipping, as the plain transformers loop (clipping at 1 cost 0.1-0.4 points, README)")
    return r, why


def clip_or(a, default: float = SPAN_CLIP) -> float:
    """--clip when given, else `default`: token tagging, QA and multi-task clip at 1.0, as transformers' Trainer
    (max_grad_norm) does in the recipes they follow; resolve_recipe passes sentence classification's 0."""
    return default if a.clip is None else a.clip


def head_lr_scale(a, task) -> tuple[float, str]:
    """(the head's lr / the encoder's, why) for a task kind: single-task and multi-task heads alike."""
    if a.head_lr_scale is not None:
        return a.head_lr_scale, "--head-lr-scale"
    if task in HEAD_LR_SCALE:
        return HEAD_LR_SCALE[task], "one logit with BCE steps as a two-logit softmax head (transformers') does at 1x"
    return 1.0, "the encoder's lr, as transformers'"


def layer_lr_scales(model, decay: float) -> dict[str, float]:
    """{parameter-name prefix: lr multiplier} for layer-wise lr decay (Howard & Ruder 2018; Sun et al. 2019;
    ELECTRA): the top of L encoder blocks trains at the scheduled lr, block l at decay^(L-1-l) of it, the
    embeddings at decay^L. Lower layers hold the general features pre-training found, the top ones move most.
    Empty for decay 1; the head's and pooler's prefixes are not here (they keep their own scale)."""
    if decay == 1:
        return {}
    n = len(model.encoder.blocks)
    scales = {f"encoder.blocks.{l}.": decay ** (n - 1 - l) for l in range(n)}          # [eq:layer-decay]
    return {**scales, "encoder.embed.": decay ** n}


def layer_decay_fingerprint(a) -> dict:
    """What --resume must match of --layer-decay: nothing when it is off, so runs from before the flag resume."""
    return {"layer_decay": a.layer_decay} if a.layer_decay != 1 else {}


def set_dropout(model, p: float):
    """Every dropout of the model (modules, and attention's functional dropout_p) to p."""
    model.config.dropout = model.config.attention_dropout = p
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = p
        elif hasattr(m, "dropout") and isinstance(m.dropout, float):
            m.dropout = p


def print_recipe(recipe: dict, why: dict):
    print("recipe:")
    for name, value in recipe.items():
        print(f"  {name:<13} {value!s:<12} {why[name]}")


def heldout_split(n: int, held: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train rows, held-out rows): one fixed shuffle (the same for every --seed, so seeds differ in training only)."""
    order = np.random.default_rng(seed).permutation(n).tolist()
    return sorted(order[held:]), sorted(order[:held])


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


def prompt_fields(a) -> dict:
    """--task prompt's template and class words: in labels.json (load_finetuned rebuilds the cloze from them)
    and in what --resume must match."""
    return {"template": a.template, "verbalizer": a.verbalizer.split(",")} if a.task == "prompt" else {}


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
    if a.task in SPAN_TASKS:
        return run_spans(a)
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
        if task == "prompt" and train_ex.pairs is not None:
            raise FinetuneError(f"--task prompt: {train_paths[0]} has a second text column; the template holds one "
                                "text (name the one to use with --text-col and leave out --text-pair-col)")
        classes, layout = label_classes(task, train_ex), train_ex.layout
    num_outputs = 1 if TASKS[task].one_output else len(classes)

    init = pathlib.Path(a.init) if a.init else DEFAULT_INIT
    torch.manual_seed(a.seed)         # a fresh head (or a scratch model) is the same on every start with this --seed
    if task == "prompt" and not (init.is_dir() or a.init):
        raise FinetuneError(f"--task prompt: needs --init, a folder with a masked-LM head (a pretrain.py output); "
                            f"the default {DEFAULT_INIT} does not exist")
    if init.is_dir() or a.init:
        prompt = (a.template, a.verbalizer.split(","), classes, train_paths[0]) if task == "prompt" else None
        model, tokenizer = load_init(init, task, num_outputs, a.pooling, a.dropout, prompt)
        scratch = False
        print(f"--init {init}{'' if a.init else ' (the default)'}: {model.config.num_layers} layers, "
              f"hidden {model.config.hidden_size}, vocabulary {tokenizer.vocab_size:,}")
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
    # the recipe, then the method, the data pipeline and the schedule
    dist_env = Dist(a.device, a.dist_timeout)
    slots = dist_env.world_size * a.grad_accum
    rows = None if scratch or TASKS[task].head not in ("classifier", "token") else stored_head_rows(init)
    head_from_init = rows is not None and rows in ((num_outputs, 2) if task == "binary" else (num_outputs,))
    recipe, why = resolve_recipe(a, task, n_train, model, dev is not None, slots, head_from_init)
    batch_size = recipe["batch_size"]
    if recipe["dropout"] != model.config.dropout:
        set_dropout(model, recipe["dropout"])
    if a.early_stopping and recipe["select"] == "last":
        raise FinetuneError("--early-stopping: needs a dev set (--dev) or --select heldout")
    judge = dev                       # the split that picks the checkpoint (and early stopping)
    aug_texts = None if task == "simcse" else train_ex.texts           # augmentation reads example i's words
    aug_pairs = None if task == "simcse" else train_ex.pairs
    if recipe["heldout"]:
        keep, held = heldout_split(n_train, recipe["heldout"])
        if aug_texts is not None:
            aug_texts = [aug_texts[i] for i in keep]
            aug_pairs = None if aug_pairs is None else [aug_pairs[i] for i in keep]
        judge = {"ids": [train_ids[i] for i in held], "types": [train_types[i] for i in held],
                 "gold": [train_labels[i] for i in held]}
        train_ids, train_types = [train_ids[i] for i in keep], [train_types[i] for i in keep]
        train_labels, n_train = [train_labels[i] for i in keep], len(keep)
        print(f"no dev set given: {len(held):,} training examples held out to pick the checkpoint"
              if dev is None else f"{len(held):,} training examples held out to pick the checkpoint; dev judges it")
    options = {name: getattr(a, name) for name in known_options()}
    apply_peft(model, a.method, **options)
    summary = trainable_summary(model)
    steps_per_epoch = max(1, math.ceil(n_train / (batch_size * slots)))
    cfg = TrainConfig.from_args(   # the loop's flags, with the recipe's defaults
        a, batch_size=batch_size, max_steps=recipe["max_steps"], lr=recipe["lr"], eval_every=recipe["eval_every"],
        clip=recipe["clip"])
    augmenter = None if task == "simcse" else build_augmenter(
        a.augment, tokenizer, aug_texts, aug_pairs, max_length, rate=a.augment_rate, wordnet=a.wordnet,
        translator=a.translator, translator_back=a.translator_back,
        cache=a.translation_cache or os.path.join(os.path.dirname(os.path.abspath(a.out)), "backtranslations.json"))
    data = TaskDataset(train_ids, train_types, train_labels, cfg.batch_size, slots, cfg.seed, tokenizer.pad_id,
                       bucket=recipe["length_bucket"],
                       label_dtype=TASKS[task].label_dtype, augmenter=augmenter)
    if dist_env.is_main:
        print(f"{task}: {n_train:,} training examples, {cfg.max_steps:,} steps of {cfg.batch_size * slots} "
              f"({cfg.max_steps / steps_per_epoch:.1f} epochs), lr {cfg.lr:g}, method {a.method}: "
              f"{summary['trainable']:,} of {summary['total']:,} parameters train ({summary['percent']:.2f}%)")

    if dist_env.is_main:
        print_recipe(recipe, why)
    eval_fn = (lambda m: evaluate(m, task, judge, tokenizer.pad_id)[0]) if judge else None
    before = None
    if task in ("simcse", "prompt") and dev:     # the sentence vectors, or the cloze, as pre-training left them
        model.eval()
        before = evaluate(model.to(dist_env.device), task, dev, tokenizer.pad_id)[0]
        model.train()
        print(f"before training: STS spearman {before['spearman']:.4f}" if task == "simcse" else
              f"before training (zero-shot cloze): dev accuracy {before['accuracy']:.4f}")
    mode = "min" if metric in MIN_METRICS else "max"
    monitor = ((metric, mode, a.early_stopping or NEVER) if recipe["select"] != "last"
               else (metric, mode, a.early_stopping) if a.early_stopping else None)
    t_train = time.time()
    # what else must match for --resume to continue this run (the loop adds its own settings)
    fingerprint = {"task": task, "method": a.method, "init": "scratch" if scratch else str(init.resolve()),
                   "train_data": [data_fingerprint(p) for p in train_paths], "max_length": max_length,
                   "pooling": a.pooling, "head_lr_scale": recipe["head_lr_scale"], **prompt_fields(a),
                   "length_bucket": recipe["length_bucket"], **layer_decay_fingerprint(a)}
    result = train(model, make_loss_fn(a, model), data, cfg, dist_env, eval_fn=eval_fn, monitor=monitor,
                   log_fields={"epoch_steps": steps_per_epoch}, fingerprint=fingerprint,
                   lr_scales={"classifier.": recipe["head_lr_scale"], **layer_lr_scales(model, a.layer_decay)})
    train_seconds = time.time() - t_train
    if result["preempted"]:      # an unfinished model: no export, no final metrics; --resume finishes it
        dist_env.close()
        return {"metrics": None, "model": model, "tokenizer": tokenizer, "info": None, "preempted": True}

    info = {"task": task, "labels": classes, "label_map": None if classes is None else {c: i for i, c in enumerate(classes)},
            "num_outputs": num_outputs, "columns": None if task == "simcse" else train_ex.columns, "layout": layout,
            "max_length": max_length, "method": a.method, "peft": options if a.method != "full" else None,
            "pooling": a.pooling, "metric": metric, **prompt_fields(a),
            "init": "scratch" if scratch else str(init)}
    out = {"metrics": None, "model": model, "tokenizer": tokenizer, "info": info, "preempted": False}
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
        if recipe["select"] == "dev" and result["last_eval"]:
            metrics["dev_last"] = result["last_eval"]      # the last weights' dev score: not picked by dev
        if recipe["heldout"] and result["last_eval"] is not None:
            metrics["heldout_best"] = {metric: result["best"]}
        print(format_table(metrics, title=f"{task} / {a.method}"))
        seen = examples_seen(data, result["step"])
        record = {**metrics, "task": task, "method": a.method, "metric": metric, "best": result["best"],
                  "trainable_params": summary["trainable"], "total_params": summary["total"],
                  "trainable_percent": summary["percent"], "encoder_trainable_percent": summary["encoder_percent"],
                  "steps": result["step"], "stopped_early": result["stopped_early"], "train_examples": n_train,
                  "examples_seen": seen, "seconds": time.time() - t0, "train_seconds": train_seconds,
                  "examples_per_s": seen / max(train_seconds, 1e-9), "recipe": recipe, "recipe_why": why}
        with writing(a.out):
            save_finetuned(a.out, model, tokenizer, info)
            write_json(os.path.join(a.out, "metrics.json"), record)
            for name, key, split in (("predictions.tsv", "dev", dev), ("predictions_test.tsv", "test", test)):
                if split:
                    write_predictions(os.path.join(a.out, name), task, split["examples"], report[key][1], classes)
        plot_metrics(a.out, title=f"{task} / {a.method}")
        print(f"saved the model to {os.path.abspath(a.out)} (labels.json, metrics.json, predictions); try: "
              f"python predict.py {a.out} \"some text\"")
        out["metrics"] = record
    dist_env.close()
    return out


# -----------------------------------------------------------------------------------------------------
# token classification (NER) and extractive QA: one label per token, or a span of tokens


SPAN_FILES = {"token": (("train.txt", "eng.train"), ("valid.txt", "dev.txt", "eng.testa"), ("test.txt", "eng.testb")),
              "qa": (("train-v1.1.json",), ("dev-v1.1.json",), ())}


def resolve_span_data(a):
    """(train, dev, test) paths: --train/--dev/--test, or the files of --data DIR as CoNLL-2003 / SQuAD ship them."""
    if not a.data:
        if not a.train:
            raise FinetuneError(f"--train: required for --task {a.task} (a CoNLL file for token, SQuAD JSON for qa)")
        return a.train, a.dev, a.test
    d = pathlib.Path(a.data)
    found = []
    for names in SPAN_FILES[a.task]:
        hits = [d / (n + ext) for n in names for ext in ("", ".xz", ".gz", ".bz2") if (d / (n + ext)).is_file()]
        found.append(hits[:1] or None)
    if not found[0]:
        raise FinetuneError(f"--data {d}: no {' or '.join(SPAN_FILES[a.task][0])} there (optionally .xz/.gz/.bz2)")
    return found[0], found[1], a.test or found[2]


def read_span_split(a, paths, articles=None, limit=None):
    """CoNLL sentences (token) or SQuAD questions (qa) of the files `paths`, the first `limit` of them."""
    out = []
    for path in paths:
        out += read_conll(path) if a.task == "token" else read_squad(path, articles)
    return out[:limit] if limit else out


def evaluate_tokens(model, split, classes, pad_id, batch_size=64) -> tuple[dict, list]:
    """(conlleval's entity P/R/F1 in percent, predicted IOB2 tags per sentence) on encoded CoNLL sentences."""
    outputs = infer_tokens(model, split["ids"], split["types"], pad_id, batch_size)
    pred = [word_tags(y, first, classes) for y, first in zip(outputs, split["first"])]
    return entity_scores(split["tags"], pred), pred


def evaluate_answers(model, tokenizer, questions, info) -> tuple[dict, list]:
    """(SQuAD EM and F1 in percent, the best span per question) over every window of each context."""
    spans = answer_spans(model, tokenizer, questions, info)
    return squad_scores([s["answer"] for s in spans], [q.answers or [""] for q in questions]), spans


def run_spans(a) -> dict:
    """--task token / qa: the same model loading, PEFT, training loop and folder as the other tasks; the data,
    the evaluation and the predictions files are per token (CoNLL) or per span (SQuAD)."""
    task, t0 = a.task, time.time()
    train_paths, dev_paths, test_paths = resolve_span_data(a)
    train_articles, dev_articles = (parse_articles(f, v) for f, v in (("--train-articles", a.train_articles),
                                                                        ("--dev-articles", a.dev_articles)))
    train_items = read_span_split(a, train_paths, train_articles, a.max_train_examples)
    classes = tag_classes(train_items) if task == "token" else None
    num_outputs = len(classes) if task == "token" else 2
    model, tokenizer = load_init(pathlib.Path(a.init) if a.init else DEFAULT_INIT, task, num_outputs, dropout=a.dropout)
    max_length = min(a.max_length or (256 if task == "token" else 384), model.config.max_position)
    info = {"task": task, "labels": classes, "label_map": None if classes is None else {c: i for i, c in enumerate(classes)},
            "num_outputs": num_outputs, "columns": None, "layout": "conll" if task == "token" else "squad",
            "max_length": max_length, "method": a.method, "pooling": None, "init": str(a.init or DEFAULT_INIT)}
    if task == "qa":
        info.update(doc_stride=a.doc_stride, max_answer_length=a.max_answer_length, max_query_length=a.max_query_length)

    def encode_split(items):
        if task == "token":
            return encode_sentences(tokenizer, items, classes, max_length)
        return qa_features(tokenizer, items, max_length, a.doc_stride, a.max_query_length, train=True)

    train_enc = encode_split(train_items)
    if not train_enc["ids"]:
        raise FinetuneError(f"--train {train_paths[0]}: no answer of any question lies in its context")
    dev_items = read_span_split(a, dev_paths, dev_articles, a.max_eval_examples) if dev_paths else None
    test_items = read_span_split(a, test_paths, None, a.max_eval_examples) if test_paths else None
    encoded = {"dev": dev_items and (encode_sentences(tokenizer, dev_items, classes, max_length) if task == "token" else dev_items),
               "test": test_items and (encode_sentences(tokenizer, test_items, classes, max_length) if task == "token" else test_items)}

    def evaluate_split(m, split):
        if task == "token":
            return evaluate_tokens(m, encoded[split], classes, tokenizer.pad_id)
        return evaluate_answers(m, tokenizer, encoded[split], info)

    metric = a.metric or TASKS[task].metrics[0]
    if metric not in TASKS[task].metrics:
        raise FinetuneError(f"--metric: {metric!r} is not a dev metric of --task {task}; choose one of "
                            f"{', '.join(TASKS[task].metrics)}")
    if a.early_stopping and not dev_items:
        raise FinetuneError("--early-stopping: needs a dev set (--dev)")

    options = {name: getattr(a, name) for name in known_options()}
    apply_peft(model, a.method, **options)
    summary = trainable_summary(model)
    info["peft"] = options if a.method != "full" else None
    dist_env = Dist(a.device, a.dist_timeout)
    n_train, batch_size, slots = len(train_enc["ids"]), a.batch_size or 32, dist_env.world_size * a.grad_accum
    steps_per_epoch = max(1, math.ceil(n_train / (batch_size * slots)))
    cfg = TrainConfig.from_args(
        a, batch_size=batch_size, max_steps=a.max_steps or max(1, math.ceil((a.epochs or 3) * steps_per_epoch)),
        lr=a.lr or METHODS[a.method].lr, eval_every=steps_per_epoch if a.eval_every is None else a.eval_every,
        clip=clip_or(a))
    common = (cfg.batch_size, slots, cfg.seed, tokenizer.pad_id)
    data = (TokenDataset(train_enc["ids"], train_enc["types"], train_enc["labels"], *common) if task == "token" else
            TaskDataset(train_enc["ids"], train_enc["types"], span_labels(train_enc), *common, label_dtype=torch.long))
    if dist_env.is_main:
        unit = "sentences" if task == "token" else f"windows of {len(train_items):,} questions"
        print(f"{task}: {n_train:,} training {unit}, {cfg.max_steps:,} steps of {cfg.batch_size * slots} "
              f"({cfg.max_steps / steps_per_epoch:.2f} epochs), lr {cfg.lr:g}, method {a.method}: "
              f"{summary['trainable']:,} of {summary['total']:,} parameters train ({summary['percent']:.2f}%)")
    last = {}               # the last dev evaluation: the final one is the report's, unless early stopping restores

    def eval_fn(m):
        last["dev"] = evaluate_split(m, "dev")
        return last["dev"][0]

    monitor = (metric, "max", a.early_stopping) if a.early_stopping else None
    t_train = time.time()
    fingerprint = {"task": task, "method": a.method, "init": str(pathlib.Path(a.init or DEFAULT_INIT).resolve()),
                   "train_data": [data_fingerprint(p) for p in train_paths], "max_length": max_length,
                   **layer_decay_fingerprint(a)}
    result = train(model, make_loss_fn(a, model), data, cfg, dist_env, eval_fn=eval_fn if dev_items else None,
                   monitor=monitor, log_fields={"epoch_steps": steps_per_epoch}, fingerprint=fingerprint,
                   lr_scales=layer_lr_scales(model, a.layer_decay))
    train_seconds = time.time() - t_train
    if result["preempted"]:      # an unfinished model: no export, no final metrics; --resume finishes it
        dist_env.close()
        return {"metrics": None, "model": model, "tokenizer": tokenizer, "info": None, "preempted": True}
    out = {"metrics": None, "model": model, "tokenizer": tokenizer, "info": info, "preempted": False}
    if dist_env.is_main:
        model.eval()
        report = {k: last[k] if k in last and not a.early_stopping else evaluate_split(model, k)
                  for k in ("dev", "test") if encoded[k]}
        metrics = {k: v[0] for k, v in report.items()}
        print(format_table(metrics, title=f"{task} / {a.method}"))
        seen = examples_seen(data, result["step"])
        record = {**metrics, "task": task, "method": a.method, "metric": metric, "best": result["best"],
                  "trainable_params": summary["trainable"], "total_params": summary["total"],
                  "trainable_percent": summary["percent"], "steps": result["step"],
                  "stopped_early": result["stopped_early"], "train_examples": len(train_items),
                  "train_features": n_train, "examples_seen": seen, "seconds": time.time() - t0,
                  "train_seconds": train_seconds, "examples_per_s": seen / max(train_seconds, 1e-9)}
        with writing(a.out):
            save_finetuned(a.out, model, tokenizer, info)
            write_json(os.path.join(a.out, "metrics.json"), record)
            for split, (_, pred) in report.items():
                name = "predictions" + ("" if split == "dev" else "_test")
                if task == "token":    # conlleval's input: word gold predicted, a blank line between sentences
                    with open(os.path.join(a.out, name + ".txt"), "w", encoding="utf-8") as f:
                        for (words, gold), tags in zip(dev_items if split == "dev" else test_items, pred):
                            f.write("".join(f"{w} {g} {p}\n" for w, g, p in zip(words, gold, tags)) + "\n")
                else:                  # what the official evaluate-v1.1.py reads: {question id: answer}
                    write_json(os.path.join(a.out, name + ".json"), {q.id: s["answer"] for q, s in
                                                                     zip(dev_items if split == "dev" else test_items, pred)})
        print(f"wrote {a.out}: model, labels.json, metrics.json, predictions")
        out["metrics"] = record
    dist_env.close()
    return out


@contextlib.contextmanager
def writing(out):
    """The final writes into --out: an OSError (a full disk, a read-only folder) becomes one FinetuneError line."""
    try:
        yield
    except OSError as e:
        raise FinetuneError(f"cannot write the model to --out {out} (disk full?): {e.strerror or e}") from None


def data_fingerprint(path) -> str:
    """A training file's size and SHA-256; a folder (simcse's WikiExtractor output): its files' names and sizes."""
    path = pathlib.Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return f"folder of {len(files)} files, {sum(p.stat().st_size for p in files)} bytes"
    return file_fingerprint(path)


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
    dist_env = Dist(a.device, a.dist_timeout)
    batch_size, slots = a.batch_size or 32, dist_env.world_size * a.grad_accum
    sizes = [len(tasks[s.name]["ids"]) for s in specs]
    steps_per_epoch = max(1, math.ceil(sum(sizes) / (batch_size * slots)))    # all tasks' batches, once
    max_steps = a.max_steps or max(1, math.ceil((a.epochs or 3) * steps_per_epoch))
    cfg = TrainConfig.from_args(a, batch_size=batch_size, lr=recipe_lr(a, "binary", model, max_steps)[0],   # the recipe's lr
                                max_steps=max_steps,
                                eval_every=steps_per_epoch if a.eval_every is None else a.eval_every,
                                clip=clip_or(a))
    p = sampling_probabilities(sizes, a.task_sampling, a.sampling_temperature)
    data = MultiTaskData({n: TaskDataset(t["ids"], t["types"], t["labels"], cfg.batch_size, slots, cfg.seed,
                                         tokenizer.pad_id, label_dtype=TASKS[t["kind"]].label_dtype,
                                         bucket=a.length_bucket or 1)    # random batches, as single-task's default
                          for n, t in tasks.items()}, TaskSampler(p, cfg.seed))
    head_lr = {f"heads.{n}.": head_lr_scale(a, t["kind"])[0] for n, t in tasks.items()}   # as single-task heads
    if dist_env.is_main:
        print(f"{len(tasks)} tasks, {cfg.max_steps:,} steps of {cfg.batch_size * slots}, lr {cfg.lr:g}, method "
              f"{a.method}: {summary['trainable']:,} of {summary['total']:,} parameters train")
        for (n, t), n_t, p_t in zip(tasks.items(), sizes, p):
            print(f"  {n} ({t['kind']}): {n_t:,} examples, p = {p_t:.3f}, ~{p_t * cfg.max_steps:.0f} steps "
                  f"= {p_t * cfg.max_steps * cfg.batch_size * slots / n_t:.2f} epochs, judged by {t['metric']}, "
                  f"head at {head_lr[f'heads.{n}.']:g}x the lr")

    def loss_fn(model, batch):
        """The step's task's head and loss, summed over its examples (the loop divides by their number)."""
        logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids")}, task=batch["task"])
        return task_loss(tasks[batch["task"]]["kind"], batch["labels"], a.label_smoothing)(logits)

    eval_fn = (lambda m: evaluate_tasks(unwrap(m), tasks, tokenizer.pad_id)[0]) if any(t["dev"] for t in tasks.values()) else None
    monitor = (metric, "min" if metric.rsplit("/", 1)[-1] in MIN_METRICS else "max", a.early_stopping) if a.early_stopping else None
    t_train = time.time()
    fingerprint = {"tasks": [[s.name, s.kind, [data_fingerprint(f) for f in s.train]] for s in specs],
                   "method": a.method, "init": str(init.resolve()), "max_length": max_length,
                   "task_sampling": a.task_sampling, "sampling_temperature": a.sampling_temperature,
                   "head_lr_scales": head_lr, **layer_decay_fingerprint(a)}
    result = train(model, loss_fn, data, cfg, dist_env, eval_fn=eval_fn, monitor=monitor,
                   log_fields={"epoch_steps": steps_per_epoch}, fingerprint=fingerprint,
                   lr_scales={**head_lr, **layer_lr_scales(model, a.layer_decay)})
    train_seconds = time.time() - t_train
    if result["preempted"]:      # an unfinished model: no export, no final metrics; --resume finishes it
        dist_env.close()
        return {"metrics": None, "model": model, "tokenizer": tokenizer, "tasks": {}, "preempted": True}
    out = {"metrics": None, "model": model, "tokenizer": tokenizer, "tasks": {}, "preempted": False}
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
        with writing(a.out):
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


def run_seeds(argv, a) -> dict:
    """--seeds N: N runs with --seed, --seed+1, ... into --out/seed<K>; their dev scores, median and spread."""
    if a.seeds < 1:
        raise FinetuneError(f"--seeds: expected 1 or more, got {a.seeds}")
    runs = {}
    for seed in range(a.seed, a.seed + a.seeds):
        out = run(argv + ["--seeds", "1", "--seed", str(seed), "--out", os.path.join(a.out, f"seed{seed}")])
        if out.get("preempted"):        # this seed's run stopped with a checkpoint: --resume continues it
            return out
        record = out["metrics"]
        runs[seed] = record and record.get("dev")
    if not all(runs.values()):
        raise FinetuneError("--seeds: needs a labelled dev set to compare the seeds on")
    metric = record["metric"]
    values = [r[metric] for r in runs.values()]
    summary = {"metric": metric, "median": float(np.median(values)), "min": min(values), "max": max(values),
               "runs": {str(s): r[metric] for s, r in runs.items()}}
    print(f"{a.seeds} seeds, dev {metric}: median {summary['median']:.4f} [{summary['min']:.4f}, {summary['max']:.4f}]: "
          + " ".join(f"{v:.4f}" for v in values))
    write_json(os.path.join(a.out, "seeds.json"), summary)
    return summary


def main(argv=None) -> int:
    """The command line: 0 when finished; 75 (EX_TEMPFAIL) when pre-empted (nothing exported, --resume
    finishes it); 2 after printing `error: <flag/file>: <what was expected>` (no traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        a = build_parser().parse_args(argv)
        out = run_seeds(argv, a) if a.seeds != 1 else run(argv)
    except (FinetuneError, TaskDataError, CheckpointError, TokenizerError, PeftError, AugmentError, RunError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return EX_TEMPFAIL if out.get("preempted") else 0


if __name__ == "__main__":
    sys.exit(main())
