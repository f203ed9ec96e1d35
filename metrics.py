"""Evaluation metrics as plain numpy: classification, correlation, perplexity, entity F1 (NER), SQuAD's exact
match and F1 (QA), and a printed table.

No torch and no scikit-learn: every metric is a few lines of arithmetic on arrays, so it can be read
and checked by hand (tests/test_metrics.py does, and against scipy where it is installed).

    y_true, y_pred: class ids (ints), shape (N,)
    scores: a real number per example, higher = more "positive" (a probability or a logit)

Conventions for the undefined cases, chosen so that a metric is always a number a training loop can
compare: precision of no predicted positives = 0, MCC with an all-one-class row or column = 0,
correlation with a constant input = 0. ROC-AUC with a single class raises: it has no meaning there.
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter

import numpy as np

_PUNCTUATION = frozenset(string.punctuation)


def _ints(y):
    return np.asarray(y).astype(np.int64).reshape(-1)


def _floats(x):
    return np.asarray(x, dtype=np.float64).reshape(-1)


def _same_length(a, b):
    if len(a) != len(b):
        raise ValueError(f"metric inputs differ in length: {len(a)} and {len(b)}")


# -----------------------------------------------------------------------------------------------------
# classification


def accuracy(y_true, y_pred) -> float:
    t, p = _ints(y_true), _ints(y_pred)
    _same_length(t, p)
    return float((t == p).mean()) if len(t) else 0.0


def confusion_matrix(y_true, y_pred, num_classes: int | None = None) -> np.ndarray:
    """(K, K) counts: row = true class, column = predicted class."""
    t, p = _ints(y_true), _ints(y_pred)
    _same_length(t, p)
    k = num_classes or int(max(t.max(initial=-1), p.max(initial=-1))) + 1
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    return cm


def precision_recall_f1(y_true, y_pred, average: str = "binary", positive: int = 1, num_classes=None):
    """(precision, recall, F1). "binary": of the class `positive`; "macro": each class's own, averaged
    with equal weight per class (so rare classes count as much as common ones).

    precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2 P R / (P + R), each 0 when its
    denominator is 0."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    if average == "binary":
        cm = np.pad(cm, (0, max(0, positive + 1 - len(cm))))   # a class no row mentions
        classes = [positive]
    elif average == "macro":
        classes = range(len(cm))
    else:
        raise ValueError(f"average must be 'binary' or 'macro', got {average!r}")
    ps, rs, fs = [], [], []
    for c in classes:
        tp, predicted, actual = cm[c, c], cm[:, c].sum(), cm[c, :].sum()
        p = tp / predicted if predicted else 0.0
        r = tp / actual if actual else 0.0
        ps.append(p)
        rs.append(r)
        fs.append(2 * p * r / (p + r) if p + r else 0.0)
    return float(np.mean(ps)), float(np.mean(rs)), float(np.mean(fs))


def mcc(y_true, y_pred) -> float:
    """Matthews correlation from the confusion matrix C (Gorodkin's K-class form; for two classes it is
    (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))):

        MCC = (c s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2) (s^2 - sum_k t_k^2))

    with s examples, c correct, t_k true and p_k predicted counts of class k. 0 when undefined."""
    cm = confusion_matrix(y_true, y_pred).astype(np.float64)
    s, c = cm.sum(), np.trace(cm)
    t, p = cm.sum(axis=1), cm.sum(axis=0)
    denom = math.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - p @ t) / denom) if denom else 0.0


def rankdata(x) -> np.ndarray:
    """Ranks 1..N, ties sharing the mean of the ranks they span ([1, 2, 2, 3] -> [1, 2.5, 2.5, 4])."""
    x = _floats(x)
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    # runs of equal values: each run gets the mean of its positions (1-based)
    starts = np.r_[0, np.flatnonzero(sorted_x[1:] != sorted_x[:-1]) + 1]
    ends = np.r_[starts[1:], len(x)]
    mean_rank = (starts + ends + 1) / 2.0                     # mean of start+1 .. end
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def roc_auc(y_true, scores) -> float:
    """Area under the ROC curve = P(score of a random positive > score of a random negative), ties
    counting 1/2. From ranks (Mann-Whitney U): AUC = (R_pos - n_pos (n_pos + 1) / 2) / (n_pos n_neg),
    R_pos the sum of the positives' ranks among all scores."""
    t, s = _ints(y_true), _floats(scores)
    _same_length(t, s)
    n_pos, n_neg = int((t == 1).sum()), int((t != 1).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC-AUC needs both classes among the true labels")
    r_pos = rankdata(s)[t == 1].sum()
    return float((r_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


# -----------------------------------------------------------------------------------------------------
# correlation and regression


def pearson(x, y) -> float:
    """r = sum (x - mean x)(y - mean y) / sqrt(sum (x - mean x)^2 sum (y - mean y)^2); 0 if x or y is constant."""
    x, y = _floats(x), _floats(y)
    _same_length(x, y)
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt((dx @ dx) * (dy @ dy))
    return float(dx @ dy / denom) if denom else 0.0


def spearman(x, y) -> float:
    """Pearson correlation of the ranks (ties share their mean rank)."""
    return pearson(rankdata(x), rankdata(y))


def mse(y_true, y_pred) -> float:
    t, p = _floats(y_true), _floats(y_pred)
    _same_length(t, p)
    return float(((t - p) ** 2).mean()) if len(t) else 0.0


def perplexity(total_nll: float, num_tokens: int) -> float:
    """exp(mean negative log-likelihood per token), from a summed NLL (nats) and a token count."""
    if num_tokens <= 0:
        raise ValueError("perplexity needs at least one token")
    return float(math.exp(total_nll / num_tokens))


# -----------------------------------------------------------------------------------------------------
# entities (NER): chunks as conlleval finds them


def _split_tag(tag: str) -> tuple[str, str]:
    """"B-PER" -> ("B", "PER"); "O" -> ("O", ""). A tag without a prefix ("PER") counts as inside ("I")."""
    if tag == "O" or not tag:
        return "O", ""
    prefix, _, kind = tag.partition("-")
    return (prefix, kind) if kind and prefix in ("B", "I", "E", "S") else ("I", tag)


def entities(tags) -> list[tuple[str, int, int]]:
    """The chunks (type, first, last) of one tag sequence, by conlleval's rules, which read IOB1, IOB2 and
    IOBES alike: a chunk starts at B or S, at I or E after O, E or S, and wherever the type changes; it
    ends before B, O or S, after E or S, and where the type changes. So "I-PER I-PER" (IOB1) and
    "B-PER I-PER" (IOB2) are one chunk, "I-PER B-PER" two, and "B-PER I-LOC" two."""
    out, start, prev, prev_kind = [], None, "O", ""
    for i, tag in enumerate(list(tags) + ["O"]):          # a final O closes a chunk at the sentence end
        prefix, kind = _split_tag(tag)
        ends = (prev in ("E", "S") or (prev in ("B", "I") and prefix in ("B", "O", "S"))
                or (prev != "O" and prev_kind != kind))                   # conlleval's endOfChunk
        begins = (prefix in ("B", "S") or (prefix in ("I", "E") and prev in ("O", "E", "S"))
                  or (prefix != "O" and prev_kind != kind))               # conlleval's startOfChunk
        if start is not None and ends:
            out.append((prev_kind, start, i - 1))
            start = None
        if begins:
            start = i
        prev, prev_kind = prefix, kind
    return out


def entity_scores(gold_sentences, pred_sentences) -> dict:
    """Entity-level precision, recall and F1 over a corpus of tag sequences, as conlleval computes them:
    an entity counts as found only when the predicted chunk has the gold chunk's type, first and last
    token. In percent, as conlleval prints them, with per-type F1 ("f1_PER", ...). 0 when undefined."""
    if len(gold_sentences) != len(pred_sentences):
        raise ValueError(f"entity_scores: {len(gold_sentences)} gold sentences but {len(pred_sentences)} predicted")
    gold, pred = set(), set()
    for n, (g, p) in enumerate(zip(gold_sentences, pred_sentences)):
        if len(g) != len(p):
            raise ValueError(f"entity_scores: sentence {n} has {len(g)} gold tags but {len(p)} predicted")
        gold |= {(n, *e) for e in entities(g)}
        pred |= {(n, *e) for e in entities(p)}

    def prf(g, p):    # [eq:entity-f1]
        tp = len(g & p)
        precision, recall = (tp / len(p) if p else 0.0), (tp / len(g) if g else 0.0)
        return 100 * precision, 100 * recall, (200 * precision * recall / (precision + recall) if tp else 0.0)

    precision, recall, f1 = prf(gold, pred)
    out = {"f1": f1, "precision": precision, "recall": recall, "entities": len(gold)}
    for kind in sorted({e[1] for e in gold | pred}):
        out[f"f1_{kind}"] = prf({e for e in gold if e[1] == kind}, {e for e in pred if e[1] == kind})[2]
    return out


# -----------------------------------------------------------------------------------------------------
# extractive QA: SQuAD v1.1's exact match and token F1


def squad_normalize(text: str) -> str:
    """SQuAD v1.1's answer normalisation: lower case, drop punctuation (string.punctuation), drop the
    articles a/an/the as words, collapse whitespace."""
    text = "".join(c for c in text.lower() if c not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def squad_exact_match(prediction: str, gold: str) -> float:
    return float(squad_normalize(prediction) == squad_normalize(gold))     # [eq:squad-em]


def squad_f1(prediction: str, gold: str) -> float:
    """Harmonic mean of precision and recall of the normalised words, counted as a bag (multiset)."""
    p, g = squad_normalize(prediction).split(), squad_normalize(gold).split()
    common = sum((Counter(p) & Counter(g)).values())                      # [eq:squad-f1]
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: list[str], golds: list[list[str]]) -> dict:
    """Corpus EM and F1 in percent: each question takes its best score over its gold answers."""
    if len(predictions) != len(golds):
        raise ValueError(f"squad_scores: {len(predictions)} predictions but {len(golds)} questions")
    em = [max(squad_exact_match(p, g) for g in gs) for p, gs in zip(predictions, golds)]
    f1 = [max(squad_f1(p, g) for g in gs) for p, gs in zip(predictions, golds)]
    return {"exact_match": 100 * float(np.mean(em)) if em else 0.0, "f1": 100 * float(np.mean(f1)) if f1 else 0.0}


# -----------------------------------------------------------------------------------------------------
# bundles used by finetune.py


def classification_metrics(y_true, probs) -> dict:
    """Everything for a K-class problem from (N, K) probabilities: accuracy, MCC, and F1 — of class 1
    with precision, recall and ROC-AUC for K = 2, macro-averaged for K > 2."""
    probs = np.asarray(probs, dtype=np.float64)
    t, pred = _ints(y_true), probs.argmax(axis=1)
    k = probs.shape[1]
    out = {"accuracy": accuracy(t, pred), "mcc": mcc(t, pred)}
    if k == 2:
        out["precision"], out["recall"], out["f1"] = precision_recall_f1(t, pred, "binary", num_classes=2)
        if 0 < (t == 1).sum() < len(t):
            out["auc"] = roc_auc(t, probs[:, 1])
    else:
        out["macro_f1"] = precision_recall_f1(t, pred, "macro", num_classes=k)[2]
    return out


def regression_metrics(y_true, y_pred) -> dict:
    return {"pearson": pearson(y_true, y_pred), "spearman": spearman(y_true, y_pred), "mse": mse(y_true, y_pred)}


def format_table(metrics: dict, title: str | None = None) -> str:
    """A plain-text table. {name: value} gives two columns; {column: {name: value}} (e.g. dev and test)
    gives one row per name and one column per outer key. Floats print with 4 decimals."""
    if metrics and all(isinstance(v, dict) for v in metrics.values()):
        columns = list(metrics)
        names = list(dict.fromkeys(n for col in metrics.values() for n in col))
        rows = [[n] + [_cell(metrics[c].get(n)) for c in columns] for n in names]
        header = ["metric"] + columns
    else:
        rows = [[n, _cell(v)] for n, v in metrics.items()]
        header = ["metric", "value"]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    out = ([title] if title else []) + [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]
    return "\n".join(out)


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool) or isinstance(v, (int, np.integer)):
        return f"{int(v):,}" if not isinstance(v, bool) else str(v)
    if isinstance(v, (float, np.floating)):
        return f"{v:.4f}"
    return str(v)
