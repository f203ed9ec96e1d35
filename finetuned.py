"""A fine-tuned model folder, and inference with it: what finetune.py writes and predict.py, export.py and
serve.py read. Nothing here trains, so serving imports neither the training loop nor the fine-tuning script.

    save_finetuned(out, model, tokenizer, info)      config.json + model.safetensors (BERT layout, PEFT set
                                                     aside) + tokenizer + labels.json (info) [+ peft.json/.safetensors]
                                                     that transformers' pipeline("text-classification") reads too
    model, tokenizer, info = load_finetuned(out)     the same model, in eval mode on the CPU (a prompt model's
                                                     tokenizer set to its template: cloze_ids)
    predict_proba(model, tokenizer, texts, pairs, info)   (N, K) probabilities, (N,) scores or (N, C) vectors
    tagged_entities(model, tokenizer, texts, info)         NER: entities with character offsets, per text
    answer_spans(model, tokenizer, questions, info)        QA: the best answer span in each context, its score

`TASKS` is the one table of what a --task means: the head, how many outputs, the label dtype, the loss, the
probabilities of the raw outputs and the dev metrics that can judge it. finetune.py reads it too.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

import losses
from atomic import write_json
from data.tasks import eval_order, pad_batch
from model import CheckpointError, ClozeClassifier, SentenceEncoder, from_hf_bert, read_hf_weights, save_hf_bert
from peft import load_peft, save_peft, without_peft
from tokenizer import TokenizerError, load_tokenizer


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


def _token_ce(logits, labels, label_smoothing=0.0):
    """logits (B, T, K), labels (B, T) with IGNORE (-100) off the first sub-words: summed over labelled tokens."""
    return losses.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), label_smoothing=label_smoothing,
                                reduction="sum")


def _span_ce(logits, labels, label_smoothing=0.0):
    """logits (B, T, 2), labels (B, 2) the answer's first and last token: the mean of the two
    cross-entropies over positions, summed over the batch.   [eq:span-loss]"""
    start, end = logits.unbind(-1)                                             # (B, T) each
    return 0.5 * (losses.cross_entropy(start, labels[:, 0], label_smoothing=label_smoothing, reduction="sum")
                  + losses.cross_entropy(end, labels[:, 1], label_smoothing=label_smoothing, reduction="sum"))


def _token_softmax(outputs):
    return torch.softmax(outputs.double(), dim=-1).numpy()         # (..., T, K)


@dataclass(frozen=True)
class TaskKind:
    """What one --task is. loss(outputs, labels, label_smoothing) -> the loss summed over the batch (None:
    the task brings its own, simcse's InfoNCE); probabilities(outputs (N, K) on the CPU) -> numpy."""
    head: str | None               # from_hf_bert's head: "classifier", "token", "span", None (the encoder alone,
                                   # pooled), or "cloze": the masked LM's scores of the class words (ClozeClassifier)
    one_output: bool               # one output per example (a logit, a score, a vector), else one per class
    label_dtype: torch.dtype
    loss: Callable | None
    probabilities: Callable
    metrics: tuple[str, ...]       # dev metrics that can judge it; the first is the default
    score_name: str | None = None  # the one value written per example ("score", "cosine"); None: classes


CLASSIFICATION = ("accuracy", "mcc", "f1", "precision", "recall", "auc", "macro_f1", "loss")
TASKS = {                          # keyed by config.TASK_KINDS (the --task choices, torch-free)
    "binary": TaskKind("classifier", True, torch.float32, _bce, _sigmoid_pair, CLASSIFICATION),
    "multiclass": TaskKind("classifier", False, torch.long, _ce, _softmax, CLASSIFICATION),
    "pair": TaskKind("classifier", False, torch.long, _ce, _softmax, CLASSIFICATION),
    "regression": TaskKind("classifier", True, torch.float32, _mse, _score, ("spearman", "pearson", "mse"), "score"),
    "simcse": TaskKind(None, True, torch.float32, None, _vectors, ("spearman", "pearson"), "cosine"),
    # per token: probabilities of each tag at each token; judged by conlleval's entity F1
    "token": TaskKind("token", False, torch.long, _token_ce, _token_softmax, ("f1", "precision", "recall")),
    # per token: a start and an end logit; judged by SQuAD's token F1 and exact match
    "qa": TaskKind("span", True, torch.long, _span_ce, _vectors, ("f1", "exact_match")),
    # classes asked as a cloze: the LM head's scores of one word per class at the template's [MASK]
    "prompt": TaskKind("cloze", False, torch.long, _ce, _softmax, CLASSIFICATION),
}
SPAN_TASKS = ("token", "qa")       # one output per token, not per example: their own inference below


def build_model(path, task: str, num_outputs: int, pooling: str = "cls", strict: bool = False, cloze=None,
                **config_overrides):
    """The task's model from a BERT-layout folder: a SequenceClassifier, TokenClassifier or SpanExtractor,
    for simcse a SentenceEncoder, for prompt a ClozeClassifier (cloze: (the [MASK] id, one word id per class),
    cloze_ids gives them); `pooling` ("cls" or "mean") says which sentence vector a SequenceClassifier or
    SentenceEncoder reads (the per-token heads pool nothing). strict: a fine-tuned folder, every tensor
    present (model.from_hf_bert); else a pre-trained encoder whose missing or other-sized head starts afresh."""
    if pooling not in ("cls", "mean"):
        raise FinetuneError(f"pooling must be 'cls' or 'mean', got {pooling!r}")
    if TASKS[task].head == "cloze":
        try:
            lm = from_hf_bert(str(path), head="mlm", strict=strict, **config_overrides)
        except CheckpointError as e:
            if "no MLM head" not in str(e):
                raise
            raise FinetuneError(f"{path}: --task prompt scores words with a masked-LM head, and this folder has "
                                "none (a pretrain.py output has one; all-MiniLM-L6-v2 does not)") from None
        model = ClozeClassifier(lm.config, *cloze)
        model.load_state_dict(lm.state_dict())
        return model
    if TASKS[task].head is None:
        return SentenceEncoder(from_hf_bert(str(path), head=None, strict=strict, **config_overrides), pooling)
    # a binary head stored as two logits (ours as save_finetuned writes it, or a transformers classifier):
    # read as two, then folded into our one logit z = l1 - l0, the same probabilities
    two_logits = task == "binary" and num_outputs == 1 and stored_head_rows(path) == 2
    model = from_hf_bert(str(path), head=TASKS[task].head, num_labels=2 if two_logits else num_outputs, strict=strict,
                         **config_overrides)
    if two_logits:
        _one_logit_head(model)
    if TASKS[task].head == "classifier":
        model.pooling = pooling             # [CLS] (BERT) or the mean of the real tokens: a head setting
    return model


def cloze_ids(tokenizer, template: str, verbalizer: list[str], classes: list[str], where: str) -> tuple[int, list[int]]:
    """--task prompt: the tokenizer set to put each text into `template`, and (its [MASK] id, one vocabulary
    id per class) for ClozeClassifier. Each class word must be one token (a split word has no single score),
    one per class of `where` (the training file, or a folder's labels.json)."""
    try:
        tokenizer.set_template(template)
    except TokenizerError as e:
        raise FinetuneError(f"--template: {e}") from None
    if len(verbalizer) != len(classes):
        raise FinetuneError(f"--verbalizer {','.join(verbalizer)!r} has {len(verbalizer)} words, {where} has "
                            f"{len(classes)} classes ({', '.join(map(str, classes))}); one word per class, in sorted "
                            "label order")
    ids = []
    for word in verbalizer:
        pieces = tokenizer.encode(word)
        if len(pieces) != 1:
            raise FinetuneError(f"--verbalizer word {word!r} is {len(pieces)} tokens "
                                f"({' '.join(tokenizer.id_to_token(i) for i in pieces)}); each word must be one token")
        ids.append(pieces[0])
    return tokenizer.mask_id, ids


def stored_head_rows(path) -> int | None:
    """Outputs of the classifier a BERT-layout folder holds (None: it holds none), from the weights file's
    header when it is safetensors (nothing loaded), else from the weights themselves."""
    st = pathlib.Path(path) / "model.safetensors"
    if st.is_file():
        from safetensors import safe_open
        try:
            with safe_open(str(st), framework="pt") as f:
                return f.get_slice("classifier.weight").get_shape()[0] if "classifier.weight" in f.keys() else None
        except Exception:           # a damaged file: from_hf_bert reports it, naming the file
            return None
    weight = read_hf_weights(str(path)).get("classifier.weight")
    return None if weight is None else weight.shape[0]


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
# inference per token: entities and answer spans


@torch.no_grad()
def infer_tokens(model, ids, types, pad_id, batch_size=64) -> list[torch.Tensor]:
    """The model's outputs at every real token of every example, in input order: [(T_i, K)]."""
    device = next(model.parameters()).device
    out = [None] * len(ids)
    for which in eval_order([len(x) for x in ids], batch_size):
        y = model(**batch_of(ids, types, which, pad_id, device)).float().cpu()     # (B, T, K)
        for r, i in enumerate(which):
            out[i] = y[r, :len(ids[i])]
    return out


def word_tags(logits, first, classes) -> list[str]:
    """The tag of each word: the argmax at its first sub-word; "O" for a word the length limit cut off."""
    best = logits.argmax(-1).tolist()
    return ["O" if pos is None else classes[best[pos]] for pos in first]


def best_span(start_logits, end_logits, lo: int, hi: int, max_answer_length: int) -> tuple[float, int, int]:
    """(score, i, j) maximising s_i + e_j over lo <= i <= j < hi with j - i + 1 <= max_answer_length
    (the context tokens of one window). start/end_logits: (T,)."""
    s, e = start_logits[lo:hi].double(), end_logits[lo:hi].double()
    n = len(s)
    scores = s[:, None] + e[None, :]                                                 # (n, n)  [eq:span-score]
    i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
    scores = scores.masked_fill((j < i) | (j - i >= max_answer_length), float("-inf"))
    k = int(scores.argmax())
    return float(scores.view(-1)[k]), lo + k // n, lo + k % n


def answer_spans(model, tokenizer, questions, info, batch_size=32) -> list[dict]:
    """The best answer to each question (data.spans.Question, or anything with .question and .context):
    {"answer", "start", "end" (characters in the context), "score" (s_i + e_j; None for an empty context)},
    the best over all windows."""
    from data.spans import qa_features
    feats = qa_features(tokenizer, questions, info["max_length"], info["doc_stride"], info["max_query_length"])
    was_training = model.training
    model.eval()
    outputs = infer_tokens(model, feats["ids"], feats["types"], tokenizer.pad_id, batch_size)
    model.train(was_training)
    best = [None] * len(questions)
    for f, logits in enumerate(outputs):
        n, lo = feats["question"][f], feats["offset"][f]
        if len(logits) - 1 <= lo:                                   # an empty context
            continue
        score, i, j = best_span(logits[:, 0], logits[:, 1], lo, len(logits) - 1, info["max_answer_length"])
        if best[n] is None or score > best[n][0]:
            ctx, shift = feats["contexts"][n], feats["start"][f] - lo     # token position -> context token
            best[n] = (score, ctx.spans[ctx.word_of[i + shift]][1], ctx.spans[ctx.word_of[j + shift]][2])
    out = []
    for q, b in zip(questions, best):
        score, a, z = b if b is not None else (None, 0, 0)         # an empty context: no span, no score
        out.append({"answer": q.context[a:z], "start": a, "end": z, "score": score})
    return out


def tagged_entities(model, tokenizer, texts, info, batch_size=32) -> list[list[dict]]:
    """The entities of each raw text: [{"type", "text", "start", "end" (characters), "score"}], score the mean
    over the entity's words of the probability of the tag predicted for each."""
    from data.spans import encode_words, word_spans
    from metrics import entities
    spans = [word_spans(t) for t in texts]
    enc = [encode_words(tokenizer, [w for w, _, _ in s], info["max_length"]) for s in spans]
    was_training = model.training
    model.eval()
    outputs = infer_tokens(model, [e[0] for e in enc], [e[1] for e in enc], tokenizer.pad_id, batch_size)
    model.train(was_training)
    out = []
    for text, s, (_, _, first), logits in zip(texts, spans, enc, outputs):
        p = torch.softmax(logits.double(), -1)                                       # (T, K)
        tags = word_tags(logits, first, info["labels"])
        conf = [1.0 if pos is None else float(p[pos].max()) for pos in first]
        out.append([{"type": kind, "text": text[s[a][1]:s[b][2]], "start": s[a][1], "end": s[b][2],
                     "score": float(np.mean(conf[a:b + 1]))} for kind, a, b in entities(tags)])
    return out


# -----------------------------------------------------------------------------------------------------
# the folder


def save_finetuned(out_dir, model, tokenizer, info):
    """What load_finetuned reads back: the base model + head in the BERT layout (PEFT modules set aside),
    the PEFT parameters beside it (peft.json, peft.safetensors), the tokenizer and labels.json (info).

    The folder is also a Hugging Face BertForSequenceClassification: config.json names the labels
    (id2label / label2id from info["labels"]) and the problem_type, and a binary head's one logit z is
    written as the two logits [0, z], whose softmax is exactly our [1 - sigmoid(z), sigmoid(z)]. So
    transformers.pipeline("text-classification", model=out_dir) gives predict.py's labels and probabilities
    (for full, top and bitfit; LoRA after export.py --merge-lora; adapters and prefixes have no BERT-layout
    form). load_finetuned folds [0, z] back into one logit. A --task prompt folder is a BertForMaskedLM; its
    template and class words are in labels.json."""
    os.makedirs(out_dir, exist_ok=True)
    with without_peft(model), _two_logit_head(model, info["task"]):
        save_hf_bert(model.encoder if TASKS[info["task"]].head is None else model, out_dir, tokenizer,
                     extra_config=hf_fields(info))
    if info["method"] != "full":
        save_peft(model, out_dir, info["method"], info["peft"])
    tok_config = os.path.join(out_dir, "tokenizer_config.json")      # WordPiece: truncate where we do
    if os.path.isfile(tok_config):
        with open(tok_config) as f:
            write_json(tok_config, {**json.load(f), "model_max_length": info["max_length"]})
    write_json(os.path.join(out_dir, "labels.json"), info)


def hf_fields(info) -> dict:
    """config.json fields that make transformers read the head as we do: the label names and the loss."""
    task = info["task"]
    if TASKS[task].head in (None, "cloze"):         # an encoder, or a masked LM (BertForMaskedLM): no labels
        return {}
    if info.get("pooling") == "mean":               # transformers' BERT pools [CLS] only: it would answer otherwise
        return {"plainbert_pooling": "mean"}
    if TASKS[task].score_name:                       # one output, a score: transformers' regression
        return {"problem_type": "regression", "id2label": {"0": TASKS[task].score_name},
                "label2id": {TASKS[task].score_name: 0}}
    if not info.get("labels"):                      # QA: start/end scores, no label names
        return {}
    labels = [str(c) for c in info["labels"]]
    names = {"id2label": {str(i): c for i, c in enumerate(labels)}, "label2id": {c: i for i, c in enumerate(labels)}}
    return names if task == "token" else {"problem_type": "single_label_classification", **names}


@contextlib.contextmanager
def _two_logit_head(model, task):
    """While saving a binary model, its classifier (1 output: z) stands in as (2 outputs: [0, z])."""
    if task != "binary" or model.classifier.out_features != 1:
        yield model
        return
    one = model.classifier
    two = nn.Linear(one.in_features, 2).to(one.weight.device, one.weight.dtype)
    with torch.no_grad():
        two.weight.copy_(torch.cat([torch.zeros_like(one.weight), one.weight]))      # (2, C)
        two.bias.copy_(torch.cat([torch.zeros_like(one.bias), one.bias]))            # (2,)
    model.classifier, model.num_labels = two, 2
    try:
        yield model
    finally:
        model.classifier, model.num_labels = one, 1


def _one_logit_head(model):
    """[l0, l1] -> z = l1 - l0: the one logit with sigmoid(z) = softmax([l0, l1])[1] (exact for l0 = 0)."""
    two = model.classifier
    one = nn.Linear(two.in_features, 1)
    with torch.no_grad():
        one.weight.copy_(two.weight[1:] - two.weight[:1])                          # (1, C)
        one.bias.copy_(two.bias[1:] - two.bias[:1])                                # (1,)
    model.classifier, model.num_labels = one, 1
    return model


def load_finetuned(path):
    """(model in eval mode on the CPU, tokenizer, info) from a finetune.py output folder. Strict: a tensor
    missing, left over, shaped or typed wrong, or not finite is a CheckpointError naming the folder and the
    tensor; a fine-tuned head is never made up (random answers that differ on every start)."""
    path = pathlib.Path(path)
    info = read_info(path)
    task, n = info["task"], info["num_outputs"]
    tokenizer = load_tokenizer(path)                 # a prompt model's: set to its template by cloze_ids
    cloze = cloze_ids(tokenizer, info["template"], info["verbalizer"], info["labels"], path / "labels.json") \
        if task == "prompt" else None
    # a binary head is written as [0, z] for transformers (older folders: z); build_model folds it back
    model = build_model(path, task, n, info.get("pooling") or "cls", strict=True, cloze=cloze)
    if (path / "peft.json").is_file():
        load_peft(model, str(path))         # re-applies the method, then loads its parameters
        for name, p in model.named_parameters():
            if not torch.isfinite(p).all():
                raise CheckpointError(f"{path / 'peft.safetensors'}: {name} holds non-finite values (NaN or inf)")
    return model.eval(), tokenizer, info


def folder_tokenizer(path, info: dict):
    """A fine-tuned folder's tokenizer as its model reads text: for --task prompt, set to the template (so
    predict.py, serve.py, export.py and onnxruntime all encode what the model was trained on)."""
    tokenizer = load_tokenizer(path)
    return tokenizer.set_template(info["template"]) if info["task"] == "prompt" else tokenizer


def read_info(path) -> dict:
    """A folder's labels.json: the task, the labels, max_length, ... Checked: a known task and a positive
    num_outputs, else a FinetuneError naming the file."""
    path = pathlib.Path(path)
    if (path / "multitask.json").is_file() and not (path / "labels.json").is_file():
        folders = sorted(p.name for p in path.iterdir() if (p / "labels.json").is_file())
        raise FinetuneError(f"{path}: a multi-task output; give one task's folder: "
                            + ", ".join(str(path / f) for f in folders))
    try:
        info = json.loads((path / "labels.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FinetuneError(f"{path}: not a finetune.py output (labels.json: {e})") from None
    task, n = info.get("task") if isinstance(info, dict) else None, info.get("num_outputs") if isinstance(info, dict) else None
    if task not in TASKS or not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise FinetuneError(f"{path / 'labels.json'}: expected a 'task' (one of {', '.join(TASKS)}) and a positive "
                            f"'num_outputs', got {task!r:.40} and {n!r:.20}")
    if task == "prompt" and not (isinstance(info.get("template"), str) and isinstance(info.get("verbalizer"), list)
                                 and isinstance(info.get("labels"), list)):
        raise FinetuneError(f"{path / 'labels.json'}: a prompt model needs its 'template', 'verbalizer' and 'labels'")
    return info
