"""Word vectors from co-occurrence counts: a first pre-training stage, minutes of CPU, that gives the
encoder's word-embedding table what masked-LM pre-training takes millions of tokens to reach.

Masked-LM pre-training at a small budget spends its first ~8 M tokens near the loss of predicting word
frequencies (README, the documented run): the word-embedding table is still nearly random when the budget
ends. Counting which words occur near which others, one pass over the shards, and factorising the counts
(positive pointwise mutual information, then a truncated SVD; Levy & Goldberg 2014 show word2vec's
skip-gram factorises the same matrix, shifted) gives every frequent word a vector whose neighbours are its
near-synonyms ("terrible": dreadful, horrible, awful). This script writes those vectors into the word
embeddings of a fresh model of the chosen shape, as a BERT-layout folder that `pretrain.py --init` continues
(masked LM from there) and `finetune.py --init` fine-tunes. Read beside docs/pretraining.md#word-vectors.

    python data/prepare.py --input ../shared/data/wiki/text ../shared/data/books --out data/wiki --vocab-size 8192
    python word_vectors.py --data data/wiki --model mini --norm pre --out out/word-vectors
    python pretrain.py --init out/word-vectors --data data/wiki ...      # masked LM from these embeddings

Several prepared folders (one tokenizer) add their counts, each times its --weights: the task's own unlabelled
text, a million tokens, can weigh like ten (task-adaptive word vectors; README, the learning curve).
"""
import argparse
import os
import sys

from atomic import write_json
from config import add_shape_args, check_shape_args, fail


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, nargs="+", metavar="DIR",
                   help="prepared folders (data/prepare.py: train.bin, meta.json, tokenizer), all with one tokenizer")
    p.add_argument("--weights", type=float, nargs="+", metavar="W",
                   help="one per --data folder: its counts are multiplied by W (default 1 each)")
    p.add_argument("--out", required=True, help="the BERT-layout folder to write (must not hold a model yet)")
    add_shape_args(p, model="mini", norm="pre")      # the vectors get the model's width
    p.add_argument("--window", type=int, default=5, help="context words on each side, weighted 1/distance")
    p.add_argument("--contexts", type=int, default=8192, help="the most frequent ids kept as context columns")
    p.add_argument("--max-tokens", type=float, default=0, help="read at most this many training tokens (0: all)")
    p.add_argument("--min-count", type=int, default=5, help="ids seen fewer times keep their random vector")
    p.add_argument("--seed", type=int, default=0)
    return p


def cooccurrence(tokens, vocab_size: int, columns, window: int = 5, chunk: int = 10_000_000):
    """X[w, k] = sum over occurrences of w of 1/d for every occurrence of context columns[k] at distance
    d = 1..window on either side (GloVe's weighting). (V, K) float64; ids outside `columns` are not counted
    as contexts.  [eq:cooccurrence]"""
    import numpy as np
    col_of = np.full(vocab_size, -1, dtype=np.int64)
    col_of[np.asarray(columns)] = np.arange(len(columns))
    K = len(columns)
    counts = np.zeros(vocab_size * K, dtype=np.float64)
    n = len(tokens)
    for d in range(1, window + 1):
        for start in range(0, n - d, chunk):
            left = np.asarray(tokens[start:min(start + chunk, n - d)], dtype=np.int64)
            right = np.asarray(tokens[start + d:start + d + len(left)], dtype=np.int64)
            for w, c in ((left, right), (right, left)):           # both directions: X is a symmetric count
                k = col_of[c]
                keep = k >= 0
                counts += np.bincount(w[keep] * K + k[keep], minlength=vocab_size * K) / d
    return counts.reshape(vocab_size, K)


def ppmi(counts, alpha: float = 0.75):
    """PPMI[w, c] = max(0, log P(w, c) / (P(w) P_alpha(c))), P_alpha(c) = #c^alpha / sum #c'^alpha: the
    context distribution smoothed (as word2vec's negative sampling), so rare contexts do not dominate.
    0 where a pair was never seen.  [eq:ppmi]"""
    import numpy as np
    total = counts.sum()
    p_w = counts.sum(1, keepdims=True) / total                        # (V, 1)
    c_alpha = counts.sum(0, keepdims=True) ** alpha
    p_c = c_alpha / c_alpha.sum()                                     # (1, K)
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log(counts / total) - np.log(p_w) - np.log(p_c)
    return np.where((counts > 0) & (pmi > 0), pmi, 0.0).astype(np.float32)


def factorise(matrix, dim: int, seed: int = 0):
    """Rows of U_d sqrt(S_d) from a truncated SVD of the (V, K) matrix, each scaled to length 1 (only the
    direction says which words are alike); (V, dim), zero-padded when the matrix has rank < dim.
    [eq:svd-vectors]"""
    import numpy as np
    import torch
    torch.manual_seed(seed)                                           # svd_lowrank's random projection
    q = min(dim, *matrix.shape)
    u, s, _ = torch.svd_lowrank(torch.from_numpy(matrix), q=q, niter=4)
    vectors = np.zeros((matrix.shape[0], dim), dtype=np.float32)
    vectors[:, :q] = (u * s.sqrt()).numpy()
    return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


def run(a) -> dict:
    import numpy as np
    import torch
    from model import EncoderConfig, LanguageModel, save_hf_bert
    from pretrain import read_meta
    from tokenizer import TokenizerError, load_tokenizer
    weights = a.weights or [1.0] * len(a.data)
    if len(weights) != len(a.data):
        raise ValueError(f"--weights: expected one per --data folder ({len(a.data)}), got {len(weights)}")
    if any(not (w > 0) for w in weights):
        raise ValueError(f"--weights: expected positive numbers, got {' '.join(map(str, weights))}")
    if os.path.exists(os.path.join(a.out, "config.json")):
        raise ValueError(f"--out {a.out} already holds a model (config.json); give another --out (nothing was overwritten)")
    for flag, v in (("--window", a.window), ("--contexts", a.contexts), ("--min-count", a.min_count)):
        if v < 1:
            raise ValueError(f"{flag}: expected a positive number, got {v}")
    streams, tok, tok_bytes = [], None, None
    for folder in a.data:
        meta_path = os.path.join(folder, "meta.json")
        if not os.path.isfile(meta_path):
            raise ValueError(f"--data {folder}: no meta.json (expected a folder written by data/prepare.py)")
        meta = read_meta(meta_path)
        tok_path = os.path.join(folder, meta.get("tokenizer", "tokenizer.model"))
        try:
            folder_tok = load_tokenizer(tok_path)
        except TokenizerError as e:
            raise ValueError(f"--data {folder}: {e}") from None
        with open(tok_path, "rb") as f:
            this_bytes = f.read()
        if tok is None:
            tok, tok_bytes, V = folder_tok, this_bytes, meta["vocab_size"]
        elif this_bytes != tok_bytes:       # the same id must mean the same piece in every folder
            raise ValueError(f"--data {folder}: its tokenizer differs from {a.data[0]}'s "
                             f"(prepare it with data/prepare.py --tokenizer {a.data[0]})")
        tokens = np.memmap(os.path.join(folder, "train.bin"), dtype=meta["dtype"], mode="r")
        if a.max_tokens:
            tokens = tokens[:int(a.max_tokens)]
        if len(tokens) < 2 * a.window + 1:
            raise ValueError(f"--data {folder}: train.bin holds {len(tokens)} tokens, too few for --window {a.window}")
        streams.append(tokens)
    specials = sorted({tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id})
    seen = [np.bincount(np.asarray(t, dtype=np.int64), minlength=V) for t in streams]
    freq = sum(w * n for w, n in zip(weights, seen))      # weighted: the contexts the counts below favour
    freq[specials] = 0                                   # a document separator is no word's context
    columns = np.argsort(-freq, kind="stable")[:min(a.contexts, int((freq > 0).sum()))]
    # X = sum over folders of w * X_folder (each stream counted on its own: no window spans two folders)
    counts = sum(w * cooccurrence(t, V, columns, a.window) for w, t in zip(weights, streams))
    counts[specials] = 0
    cfg = EncoderConfig.preset(a.model, vocab_size=V, norm=a.norm, embedding_norm=a.embedding_norm, pad_id=tok.pad_id)
    torch.manual_seed(a.seed)
    model = LanguageModel(cfg)
    vectors = factorise(ppmi(counts), cfg.hidden_size, a.seed)
    known = sum(seen) >= a.min_count                                 # seen this often, unweighted
    known[specials] = False                                          # specials keep their random rows
    with torch.no_grad():
        table = model.encoder.embed.tok.weight                        # (V, C), N(0, 0.02^2) from init_weights
        scale = table.norm(dim=1).mean()                              # the length a random row has: keep it
        table[torch.from_numpy(known)] = torch.from_numpy(vectors[known]).float() * scale
    save_hf_bert(model, a.out, tok)
    info = {"data": [os.path.abspath(d) for d in a.data], "weights": weights,
            "tokens": [len(t) for t in streams], "window": a.window, "contexts": len(columns),
            "min_count": a.min_count, "words_with_vectors": int(known.sum()), "vocab_size": V,
            "model": a.model, "norm": a.norm, "embedding_norm": cfg.embedding_norm, "dim": cfg.hidden_size}
    write_json(os.path.join(a.out, "word_vectors.json"), info)
    print(f"wrote {a.out}: {info['words_with_vectors']:,} of {V:,} ids got co-occurrence vectors "
          f"({sum(len(t) for t in streams):,} tokens, window {a.window}, {len(columns):,} contexts); the rest of the model is as "
          f"pretrain.py starts it. Next: python pretrain.py --init {a.out} --data {a.data[0]} ...")
    return info


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    check_shape_args(a)
    try:
        run(a)
    except ValueError as e:
        fail(str(e))
    return 0


if __name__ == "__main__":
    build_parser().parse_args()          # --help before the heavy imports
    sys.exit(main())
