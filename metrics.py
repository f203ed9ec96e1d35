"""Evaluation metrics as plain numpy: classification, correlation, perplexity, BLEU/ROUGE, entity F1 (NER),
SQuAD's exact match and F1 (QA), and a printed table.

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
# generated text against references: BLEU (sacrebleu's corpus_bleu) and ROUGE (Google's rouge-score),
# written out here; tests/test_metrics.py checks both against those libraries to 1e-6


def ngrams(tokens, n) -> Counter:
    """Counts of the n-grams (tuples of n consecutive tokens) of a token list."""
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


_13A = [(re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),   # punctuation and symbols apart
        (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),                   # . and , apart unless after a digit
        (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),                   # ... or before one (3.5, 1,000 stay)
        (re.compile(r"([0-9])(-)"), r"\1 \2 ")]                         # a dash after a digit


def tokenize_13a(text: str) -> list[str]:
    """mteval-v13a's tokenization, the WMT standard and sacrebleu's default: split off punctuation."""
    text = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    for entity, char in (("&quot;", '"'), ("&amp;", "&"), ("&lt;", "<"), ("&gt;", ">")):
        text = text.replace(entity, char)
    text = f" {text} "
    for pattern, repl in _13A:
        text = pattern.sub(repl, text)
    return text.split()


BLEU_SMOOTHING = {"none": None, "floor": 0.1, "add-k": 1.0, "exp": None}   # default value of each


def corpus_bleu(hypotheses, references, smooth: str = "exp", smooth_value=None, tokenize: str = "13a",
                max_order: int = 4) -> dict:
    """Corpus BLEU (Papineni et al. 2002) as sacrebleu computes it, on a 0-100 scale.

    hypotheses: N strings; references: one list of N strings per reference set (sacrebleu's layout).
    Counts are summed over the whole corpus before any ratio is taken, so BLEU is not a mean of sentence
    scores. tokenize: "13a" (sacrebleu's default) or "none" (split on whitespace). smooth: what to do with
    an n-gram order that matched nothing (its log would be -inf): "none", "floor", "add-k", "exp"."""
    if smooth not in BLEU_SMOOTHING:
        raise ValueError(f"smooth must be one of {', '.join(BLEU_SMOOTHING)}, got {smooth!r}")
    split = {"13a": tokenize_13a, "none": str.split}[tokenize]
    for refs in references:
        _same_length(hypotheses, refs)
    k = BLEU_SMOOTHING[smooth] if smooth_value is None else smooth_value
    matches, totals, hyp_len, ref_len = [0] * max_order, [0] * max_order, 0, 0
    for i, hyp in enumerate(hypotheses):
        h, rs = split(hyp.rstrip()), [split(refs[i].rstrip()) for refs in references]
        hyp_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rs)[1]     # the closest reference; shorter on ties
        for n in range(1, max_order + 1):
            counts, most = ngrams(h, n), Counter()
            for r in rs:
                most |= ngrams(r, n)                                      # each n-gram's most in any reference
            # p_n = sum min(count_hyp(g), max_ref count_ref(g)) / sum count_hyp(g)  [eq:bleu-precision]
            matches[n - 1] += sum(min(c, most[g]) for g, c in counts.items())
            totals[n - 1] += sum(counts.values())
    # BP = 1 if c > r else exp(1 - r / c), c and r the hypothesis and reference lengths  [eq:brevity-penalty]
    bp = 1.0 if hyp_len >= ref_len else math.exp(1 - ref_len / hyp_len) if hyp_len else 0.0
    precisions, doubling = [], 1.0
    for n, (m, t) in enumerate(zip(matches, totals), start=1):
        # smoothing of an order with no match (Chen & Cherry 2014, sacrebleu's names)  [eq:bleu-smoothing]
        if smooth == "add-k" and n > 1:
            m, t = m + k, t + k                                           # add k to both counts, n >= 2
        if t == 0 or (m == 0 and smooth == "none"):
            p = 0.0
        elif m == 0 and smooth == "floor":
            p = k / t                                                     # a floor of k matches
        elif m == 0 and smooth == "exp":
            doubling *= 2
            p = 1 / (doubling * t)                                        # 1/2, 1/4, ... of a match (mteval)
        else:
            p = m / t
        precisions.append(p)
    # BLEU = BP * exp((1/N) sum_n log p_n), the geometric mean of the N precisions  [eq:bleu]
    bleu = bp * math.exp(sum(math.log(p) for p in precisions) / max_order) if any(matches) and all(precisions) else 0.0
    return {"bleu": 100 * bleu, "precisions": [100 * p for p in precisions], "bp": bp, "hyp_len": hyp_len,
            "ref_len": ref_len}


def rouge_tokenize(text: str, stem: bool = False) -> list[str]:
    """rouge-score's tokenizer: lower-case, anything not a-z0-9 is a space; optionally the Porter stem of
    each word longer than 3 letters (nltk's stemmer, which rouge-score itself uses)."""
    tokens = re.sub(r"[^a-z0-9]+", " ", text.lower()).split()
    if stem:
        from nltk.stem.porter import PorterStemmer
        stemmer = _STEMMER.setdefault("porter", PorterStemmer())
        tokens = [t for t in (stemmer.stem(t) if len(t) > 3 else t for t in tokens) if re.fullmatch("[a-z0-9]+", t)]
    return tokens


_STEMMER = {}


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r > 0 else 0.0


def rouge_n(hyp: list[str], ref: list[str], n: int) -> float:
    """ROUGE-N F1 of one token list against one reference: n-gram overlap over each side's n-gram count.
    P = |ngrams(h) & ngrams(r)| / |ngrams(h)|,  R = |ngrams(h) & ngrams(r)| / |ngrams(r)|,  F1 = 2PR/(P+R)
    (a multiset intersection; an empty side scores 0)  [eq:rouge-n]"""
    h, r = ngrams(hyp, n), ngrams(ref, n)
    overlap = sum((h & r).values())
    return _f1(overlap / max(sum(h.values()), 1), overlap / max(sum(r.values()), 1))


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence (in order, not necessarily adjacent), one DP row at a time."""
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag, row[0] = 0, 0
        for j, y in enumerate(b, start=1):
            prev_diag, row[j] = row[j], prev_diag + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(hyp: list[str], ref: list[str]) -> float:
    """ROUGE-L F1: P = LCS(h, r) / |h|, R = LCS(h, r) / |r|, F1 = 2PR/(P+R); 0 if either is empty.  [eq:rouge-l]"""
    if not hyp or not ref:
        return 0.0
    lcs = lcs_length(hyp, ref)
    return _f1(lcs / len(hyp), lcs / len(ref))


def rouge(hypotheses, references, stem: bool = False) -> dict:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F1 (0-1) over (hypothesis, reference) string pairs, as rouge-score's
    RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=stem) scores each pair."""
    _same_length(hypotheses, references)
    scores = {"rouge1": [], "rouge2": [], "rougeL": []}
    for hyp, ref in zip(hypotheses, references):
        h, r = rouge_tokenize(hyp, stem), rouge_tokenize(ref, stem)
        scores["rouge1"].append(rouge_n(h, r, 1))
        scores["rouge2"].append(rouge_n(h, r, 2))
        scores["rougeL"].append(rouge_l(h, r))
    return {k: float(np.mean(v)) if v else 0.0 for k, v in scores.items()}


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
