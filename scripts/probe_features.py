"""Linear probes: how much of a task do an encoder's frozen features already hold?

Fine-tuning changes every weight, so it can hide what pre-training gave. A probe freezes the encoder and fits
only a logistic regression on its sentence features (nested subsets of the training file, the best of three
regularisation strengths on dev): pre-trained features that beat a random-weight copy of the same
architecture hold something about the task. Three features per folder: the mean of the input word
embeddings (what pre-training taught the vocabulary), the mean and the [CLS] vector of the last layer.

    python scripts/probe_features.py --train ../shared/data/sst2/train.tsv --dev ../shared/data/sst2/dev.tsv \\
        --folders pre-trained=out/pretrain-mini --random-copy out/pretrain-mini --sizes 500 1000 4000

Needs scikit-learn (requirements-dev.txt).
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sentence_features(folder: str, texts: list[str], random_weights: bool, max_tokens: int = 62) -> dict:
    """{"embeddings" | "mean" | "cls": (N, C) array} from the folder's encoder, frozen."""
    import torch
    from data.tasks import pad_batch
    from finetuned import encode
    from model import from_hf_bert, init_weights
    from tokenizer import load_tokenizer
    tokenizer, encoder = load_tokenizer(folder), from_hf_bert(folder, head=None).eval()
    if random_weights:                       # the same architecture and tokenizer, weights as pretrain.py starts
        torch.manual_seed(0)
        encoder.apply(init_weights)
    ids, types = encode(tokenizer, texts, None, max_length=max_tokens + 2)       # [CLS] text [SEP]
    feats = {"embeddings": [], "mean": [], "cls": []}
    for start in range(0, len(texts), 64):
        batch = pad_batch(ids[start:start + 64], types[start:start + 64], tokenizer.pad_id)
        real = batch["attention_mask"].unsqueeze(-1).float()                        # (B, T, 1)
        with torch.no_grad():
            hidden = encoder(batch["input_ids"], attention_mask=batch["attention_mask"])   # (B, T, C)
            words = encoder.embed.tok(batch["input_ids"])                            # (B, T, C)
        feats["embeddings"].append(((words * real).sum(1) / real.sum(1)).numpy())
        feats["mean"].append(((hidden * real).sum(1) / real.sum(1)).numpy())
        feats["cls"].append(hidden[:, 0].numpy())
    return {k: np.concatenate(v) for k, v in feats.items()}


def probe(train_x, train_y, dev_x, dev_y) -> float:
    """Dev accuracy of a logistic regression on standardised features, the best of C in {0.01, 0.1, 1}."""
    from sklearn.linear_model import LogisticRegression
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    train_x, dev_x = (train_x - mu) / sd, (dev_x - mu) / sd
    return max(LogisticRegression(C=c, max_iter=2000).fit(train_x, train_y).score(dev_x, dev_y) for c in (0.01, 0.1, 1.0))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--train", required=True)
    p.add_argument("--dev", required=True)
    p.add_argument("--folders", nargs="+", default=[], metavar="NAME=DIR")
    p.add_argument("--random-copy", metavar="DIR", help="also probe DIR's architecture with random weights")
    p.add_argument("--sizes", type=int, nargs="+", default=[500, 1000, 4000])
    p.add_argument("--shuffle-seed", type=int, default=0)
    a = p.parse_args(argv)
    from data.tasks import TaskDataError, read_examples
    try:
        train, dev = read_examples([a.train]), read_examples([a.dev])
    except (TaskDataError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    order = np.random.default_rng(a.shuffle_seed).permutation(len(train.texts))[:max(a.sizes)]
    train_texts = [train.texts[i] for i in order]
    train_y, dev_y = np.asarray(train.labels)[order], np.asarray(dev.labels)
    rows = [(item.split("=", 1)[0], item.split("=", 1)[1], False) for item in a.folders]
    if a.random_copy:
        rows.insert(0, ("random weights", a.random_copy, True))
    print(f"linear-probe dev accuracy %, N = {' / '.join(map(str, a.sizes))}")
    for name, folder, random_weights in rows:
        tr, dv = (sentence_features(folder, t, random_weights) for t in (train_texts, dev.texts))
        for kind in ("embeddings", "mean", "cls"):
            accs = [100 * probe(tr[kind][:n], train_y[:n], dv[kind], dev_y) for n in a.sizes]
            print(f"{name:24s} {kind:10s} " + " / ".join(f"{x:.1f}" for x in accs), flush=True)


if __name__ == "__main__":
    main()
