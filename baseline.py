"""A bag-of-words logistic-regression baseline: the number a Transformer has to beat to have learnt anything
beyond which words occur.

    python baseline.py --train ../shared/data/sst2/train.tsv --dev ../shared/data/sst2/dev.tsv

Features are lower-cased word unigrams and bigrams (counts clipped to 1), kept when seen at least
--min-count times in training. p(y=1|x) = sigmoid(w . x + b), trained on the binary cross-entropy of
losses.py with L2 regularisation, full-batch L-BFGS: a convex problem, so the optimum does not depend on
the seed. Classes beyond two use a softmax over one weight vector per class.
"""
from __future__ import annotations

import argparse
import re
import sys
from collections import Counter


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--train", required=True, nargs="+")
    p.add_argument("--dev", required=True, nargs="+")
    p.add_argument("--task", choices=["binary", "multiclass"], default="binary")
    p.add_argument("--min-count", type=int, default=2, help="keep features seen at least this often in training")
    p.add_argument("--l2", type=float, default=1.0, help="L2 strength (times the mean loss's 1/N)")
    p.add_argument("--out", help="write metrics.json here")
    return p


if __name__ == "__main__":       # --help and a bad flag are answered before the imports below load torch
    build_parser().parse_args()

# the heavy imports come after the command line, on purpose (E402)
import numpy as np
import torch

import losses
import metrics
from atomic import write_json
from data.tasks import TaskDataError, encode_labels, label_classes, read_examples

WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?|[^\sa-z0-9]")


def features(text: str) -> set[str]:
    words = WORD.findall(text.lower())
    return set(words) | {f"{a} {b}" for a, b in zip(words, words[1:])}


def to_sparse(feature_sets, vocab) -> torch.Tensor:
    """(N, |vocab|) sparse 0/1 matrix: row i has a 1 for each known feature of example i."""
    rows, cols = [], []
    for i, feats in enumerate(feature_sets):
        idx = [vocab[f] for f in feats if f in vocab]
        rows += [i] * len(idx)
        cols += idx
    values = torch.ones(len(rows))
    return torch.sparse_coo_tensor(torch.tensor([rows, cols]), values, (len(feature_sets), len(vocab)),
                                   check_invariants=True).coalesce()


def fit(x, y, num_classes, l2=1.0, max_iter=200):
    """Minimise mean loss + (l2 / N) * ||W||^2 / 2 with L-BFGS (no penalty on the bias)."""
    n, d = x.shape
    outputs = 1 if num_classes == 2 else num_classes
    w = torch.zeros(d, outputs, requires_grad=True)
    b = torch.zeros(outputs, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, line_search_fn="strong_wolfe")
    target = torch.tensor(y)

    def closure():
        opt.zero_grad()
        logits = torch.sparse.mm(x, w) + b
        if outputs == 1:
            loss = losses.binary_cross_entropy_with_logits(logits.squeeze(1), target.float())
        else:
            loss = losses.cross_entropy(logits, target.long())
        loss = loss + l2 / n * 0.5 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def predict_proba(x, w, b) -> np.ndarray:
    logits = torch.sparse.mm(x, w) + b
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits.squeeze(1))
        return torch.stack([1 - p, p], dim=1).numpy()
    return logits.softmax(-1).numpy()


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        train, dev = read_examples(args.train), read_examples(args.dev)
        classes = label_classes(args.task, train)
        y_train = [int(v) for v in encode_labels(args.task, train, classes)]
        y_dev = [int(v) for v in encode_labels(args.task, dev, classes)]
    except (TaskDataError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    train_feats = [features(t) for t in train.texts]
    counts = Counter(f for feats in train_feats for f in feats)
    vocab = {f: i for i, f in enumerate(sorted(f for f, c in counts.items() if c >= args.min_count))}
    w, b = fit(to_sparse(train_feats, vocab), y_train, len(classes), args.l2)
    probs = predict_proba(to_sparse([features(t) for t in dev.texts], vocab), w, b)
    result = metrics.classification_metrics(y_dev, probs)
    result.update(features=len(vocab), train_examples=len(train))
    print(metrics.format_table(result, title=f"bag-of-words logistic regression ({len(vocab):,} features)"))
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
