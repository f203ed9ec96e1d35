"""A fine-tuned model folder, and inference with it: what finetune.py writes and predict.py, export.py and
serve.py read. Nothing here trains, so serving imports neither the training loop nor the fine-tuning script.

    save_finetuned(out, model, tokenizer, info)      config.json + model.safetensors (BERT layout, PEFT set
                                                     aside) + tokenizer + labels.json (info) [+ peft.json/.safetensors]
    model, tokenizer, info = load_finetuned(out)     the same model, in eval mode on the CPU
    predict_proba(model, tokenizer, texts, pairs, info)   (N, K) probabilities, (N,) scores or (N, C) vectors

`TASKS` is the one table of what a --task means: the head, how many outputs, the label dtype, the loss, the
probabilities of the raw outputs and the dev metrics that can judge it. finetune.py reads it too.
"""
from __future__ import annotations

import json
import os
import pathlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

import losses
from atomic import atomic_write
from data.tasks import eval_order, pad_batch
from model import SentenceEncoder, from_hf_bert, save_hf_bert
from peft import load_peft, save_peft, without_peft
from tokenizer import load_tokenizer


class FinetuneError(ValueError):
    """A bad flag or folder: the message names it and says what was expected."""


# -----------------------------------------------------------------------------------------------------
# the task kinds


def _sigmoid_pair(outputs):
    p = torch.sigmoid(outputs[:, 0].double())                      # one logit -> [1 - p, p]: (N, 2)
    return torch.stack([1 - p, p], dim=1).numpy()


def _softmax(outputs):
    return torch.softmax(outputs.double(), dim=1).numpy()          # (N, K)


def _score(outputs):
    return outputs[:, 0].double().numpy()                          # (N,)


def _vectors(outputs):
    return outputs.double().numpy()                                # (N, C)


def _bce(logits, labels, label_smoothing=0.0):
    y = labels * (1 - label_smoothing) + label_smoothing / 2       # smoothing for one logit: eps/2, 1 - eps/2
    return losses.binary_cross_entropy_with_logits(logits[:, 0], y, reduction="sum")


def _ce(logits, labels, label_smoothing=0.0):
    return losses.cross_entropy(logits, labels, label_smoothing=label_smoothing, reduction="sum")


def _mse(logits, labels, label_smoothing=0.0):
    return losses.mse(logits[:, 0], labels, reduction="sum")


@dataclass(frozen=True)
class TaskKind:
    """What one --task is. loss(outputs, labels, label_smoothing) -> the loss summed over the batch (None:
    the task brings its own, simcse's InfoNCE); probabilities(outputs (N, K) on the CPU) -> numpy."""
    head: str | None               # from_hf_bert's head: "classifier", or None (the encoder alone, pooled)
    one_output: bool               # one output per example (a logit, a score, a vector), else one per class
    label_dtype: torch.dtype
    loss: Callable | None
    probabilities: Callable
    metrics: tuple[str, ...]       # dev metrics that can judge it; the first is the default
    score_name: str | None = None  # the one value written per example ("score", "cosine"); None: classes


CLASSIFICATION = ("accuracy", "mcc", "f1", "precision", "recall", "auc", "macro_f1", "loss")
TASKS = {
    "binary": TaskKind("classifier", True, torch.float32, _bce, _sigmoid_pair, CLASSIFICATION),
    "multiclass": TaskKind("classifier", False, torch.long, _ce, _softmax, CLASSIFICATION),
    "pair": TaskKind("classifier", False, torch.long, _ce, _softmax, CLASSIFICATION),
    "regression": TaskKind("classifier", True, torch.float32, _mse, _score, ("spearman", "pearson", "mse"), "score"),
    "simcse": TaskKind(None, True, torch.float32, None, _vectors, ("spearman", "pearson"), "cosine"),
}


def build_model(path, task: str, num_outputs: int, pooling: str = "cls", **config_overrides):
    """The task's model from a BERT-layout folder: a SequenceClassifier, or for simcse a SentenceEncoder;
    `pooling` ("cls" or "mean") says which sentence vector either one reads."""
    if pooling not in ("cls", "mean"):
        raise FinetuneError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
    if TASKS[task].head is None:
        return SentenceEncoder(from_hf_bert(str(path), head=None, **config_overrides), pooling)
    model = from_hf_bert(str(path), head="classifier", num_labels=num_outputs, **config_overrides)
    model.pooling = pooling                 # [CLS] (BERT) or the mean of the real tokens: a head setting
    return model


# -----------------------------------------------------------------------------------------------------
# inference


def encode(tokenizer, texts, pairs, max_length):
    """Tokenize once, unpadded: (input_ids lists, token_type_ids lists); batches pad themselves."""
    enc = tokenizer(texts, pairs, max_length=max_length, padding=False, return_tensors=None)
    return enc["input_ids"], enc["token_type_ids"]


def batch_of(ids, types, which, pad_id, device) -> dict:
    """The examples `which` (indices) as one padded batch on `device`."""
    return {k: v.to(device) for k, v in pad_batch([ids[i] for i in which], [types[i] for i in which], pad_id).items()}


@torch.no_grad()
def infer(model, ids, types, pad_id, batch_size=64) -> torch.Tensor:
    """The model's raw outputs (logits, scores or sentence vectors) for every example, in input order."""
    device = next(model.parameters()).device
    out = None
    for which in eval_order([len(x) for x in ids], batch_size):
        y = model(**batch_of(ids, types, which, pad_id, device)).float().cpu()
        out = y.new_empty(len(ids), *y.shape[1:]) if out is None else out
        out[torch.as_tensor(which)] = y
    return out


def probabilities(task, outputs: torch.Tensor) -> np.ndarray:
    """(N, K) class probabilities; binary gives [1 - p, p] from its one logit; regression the (N,) scores."""
    return TASKS[task].probabilities(outputs)


def predict_proba(model, tokenizer, texts, pairs=None, info=None, batch_size=32) -> np.ndarray:
    """Probabilities per class (N, K) in the order of info["labels"] ([1 - p, p] for binary), the score
    (N,) for regression, the sentence vectors (N, C) for simcse. info: load_finetuned's third value."""
    if info is None:
        raise FinetuneError("predict_proba needs info (the labels.json dict that load_finetuned returns)")
    ids, types = encode(tokenizer, list(texts), None if pairs is None else list(pairs), info["max_length"])
    was_training = model.training
    model.eval()
    outputs = infer(model, ids, types, tokenizer.pad_id, batch_size)
    model.train(was_training)
    return probabilities(info["task"], outputs)


# -----------------------------------------------------------------------------------------------------
# the folder


def save_finetuned(out_dir, model, tokenizer, info):
    """What load_finetuned reads back: the base model + head in the BERT layout (PEFT modules set aside),
    the PEFT parameters beside it (peft.json, peft.safetensors), the tokenizer and labels.json (info)."""
    os.makedirs(out_dir, exist_ok=True)
    with without_peft(model):
        save_hf_bert(model.encoder if TASKS[info["task"]].head is None else model, out_dir, tokenizer)
    if info["method"] != "full":
        save_peft(model, out_dir, info["method"], info["peft"])
    write_json(os.path.join(out_dir, "labels.json"), info)


def load_finetuned(path):
    """(model in eval mode on the CPU, tokenizer, info) from a finetune.py output folder."""
    path = pathlib.Path(path)
    if (path / "multitask.json").is_file() and not (path / "labels.json").is_file():
        folders = sorted(p.name for p in path.iterdir() if (p / "labels.json").is_file())
        raise FinetuneError(f"{path}: a multi-task output; give one task's folder: "
                            + ", ".join(str(path / f) for f in folders))
    try:
        info = json.loads((path / "labels.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise FinetuneError(f"{path}: not a finetune.py output (labels.json: {e})") from None
    tokenizer = load_tokenizer(path)
    model = build_model(path, info["task"], info["num_outputs"], info.get("pooling") or "cls")
    if (path / "peft.json").is_file():
        load_peft(model, str(path))         # re-applies the method, then loads its parameters
    return model.eval(), tokenizer, info


def write_json(path, obj):
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
