"""word_vectors.py: co-occurrence counts, PPMI and the SVD, each against a direct computation, and the
folder it writes continued by pretrain.py."""
import json
import math

import numpy as np
import pytest
import torch

import word_vectors as W


def brute_force_counts(tokens, vocab_size, columns, window):
    out = np.zeros((vocab_size, len(columns)))
    col = {c: k for k, c in enumerate(columns)}
    for i, w in enumerate(tokens):
        for j in range(max(0, i - window), min(len(tokens), i + window + 1)):
            if j != i and tokens[j] in col:
                out[w, col[tokens[j]]] += 1 / abs(i - j)
    return out


def test_cooccurrence_counts_every_pair_within_the_window_weighted_by_one_over_distance():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 9, size=200).astype(np.uint16)
    columns = [0, 3, 4, 7, 8]                            # ids 1, 2, 5, 6 are no one's context
    got = W.cooccurrence(tokens, 9, columns, window=3, chunk=17)       # chunks smaller than the stream
    np.testing.assert_allclose(got, brute_force_counts(tokens.tolist(), 9, columns, 3), rtol=1e-12)


def test_ppmi_is_the_positive_part_of_pointwise_mutual_information_with_smoothed_contexts():
    rng = np.random.default_rng(1)
    counts = rng.integers(0, 6, size=(7, 5)).astype(np.float64)
    total, alpha = counts.sum(), 0.75
    c_alpha = counts.sum(0) ** alpha
    want = np.zeros_like(counts)
    for w in range(7):
        for c in range(5):
            if counts[w, c]:
                pmi = math.log((counts[w, c] / total) / ((counts[w].sum() / total) * (c_alpha[c] / c_alpha.sum())))
                want[w, c] = max(0.0, pmi)
    got = W.ppmi(counts, alpha)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert (got >= 0).all() and (got[counts == 0] == 0).all()


def test_words_used_in_the_same_contexts_get_nearly_the_same_direction():
    """ids 10 and 11 fill the same slots of the same sentences, 12 and 13 others: 10's nearest is 11."""
    rng = np.random.default_rng(2)
    stream = []
    for _ in range(3000):
        a, b = rng.integers(20, 30, size=2), rng.integers(30, 40, size=2)
        stream += [a[0], rng.choice([10, 11]), a[1]] if rng.random() < 0.5 else [b[0], rng.choice([12, 13]), b[1]]
    counts = W.cooccurrence(np.array(stream), 40, list(range(20, 40)), window=1)
    vectors = W.factorise(W.ppmi(counts), dim=4)
    cos = vectors @ vectors.T
    assert np.allclose(np.linalg.norm(vectors[10:14], axis=1), 1.0, atol=1e-6)
    assert cos[10, 11] > 0.95 and cos[12, 13] > 0.95
    assert cos[10, 12] < cos[10, 11] - 0.5


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from data.prepare import prepare
    from data.tasks import sample_binary
    root = tmp_path_factory.mktemp("wv")
    (root / "text").mkdir()
    for k in range(60):                                   # one document a file
        (root / "text" / f"r{k}.txt").write_text(" ".join(t for t, _ in sample_binary(40, seed=k)))
    prepare([str(root / "text")], str(root / "data"), vocab_size=120, val_fraction=0.1, quiet=True, workers=1, min_chars=50)
    return root


def test_the_folder_holds_the_vectors_and_pretrain_init_continues_it(prepared, tmp_path):
    import pretrain
    from model import from_hf_bert
    out = tmp_path / "wv"
    info = W.run(W.build_parser().parse_args(["--data", str(prepared / "data"), "--out", str(out), "--model", "tiny",
                                              "--window", "2", "--min-count", "3"]))
    assert info["words_with_vectors"] > 50 and info["dim"] == 128
    table = from_hf_bert(str(out), head=None).embed.tok.weight.detach()
    meta = json.loads((prepared / "data" / "meta.json").read_text())
    tokens = np.fromfile(prepared / "data" / "train.bin", dtype=meta["dtype"])
    freq = np.bincount(tokens, minlength=meta["vocab_size"])
    frequent = [i for i in np.argsort(-freq)[:20] if i > 4]
    lengths = table[frequent].norm(dim=1)
    assert torch.allclose(lengths, lengths.mean(), rtol=1e-4), "every vector has a random row's length"
    # special ids, and ids seen fewer than --min-count times, keep the row a fresh model of this seed starts with
    from model import EncoderConfig, LanguageModel
    torch.manual_seed(0)
    fresh = LanguageModel(EncoderConfig.preset("tiny", vocab_size=meta["vocab_size"], norm="pre")).encoder.embed.tok.weight
    freq[:5] = 0                                         # [PAD] [UNK] [CLS] [SEP] [MASK]: no word's vector
    rare, seen = torch.from_numpy(freq < 3), torch.from_numpy(freq >= 3)
    assert rare.any() and torch.equal(table[rare], fresh[rare].detach())
    assert not torch.isclose(table[seen], fresh[seen].detach()).all(dim=1).any()
    pretrain.main(["--init", str(out), "--data", str(prepared / "data"), "--out", str(tmp_path / "mlm"),
                   "--max-steps", "3", "--batch-size", "4", "--seq-len", "32", "--eval-every", "0", "--save-every", "0",
                   "--no-progress", "--log-every", "1"])
    losses = [json.loads(line)["loss"] for line in (tmp_path / "mlm" / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)


@pytest.fixture(scope="module")
def second(prepared):
    """Other text prepared with the first folder's tokenizer (as task text is: data/prepare.py --tokenizer),
    and the same text with a tokenizer of its own."""
    from data.prepare import prepare
    from data.tasks import sample_binary
    (prepared / "text2").mkdir()
    for k in range(30):
        (prepared / "text2" / f"s{k}.txt").write_text(" ".join(t for t, _ in sample_binary(40, seed=100 + k)))
    prepare([str(prepared / "text2")], str(prepared / "same_tok"), tokenizer=str(prepared / "data"),
            val_fraction=0.1, quiet=True, workers=1, min_chars=50)
    prepare([str(prepared / "text2")], str(prepared / "own_tok"), vocab_size=100, val_fraction=0.1, quiet=True,
            workers=1, min_chars=50)
    return prepared / "same_tok"


def test_several_folders_add_their_counts_each_times_its_weight(prepared, second, tmp_path):
    from model import from_hf_bert
    folders = [prepared / "data", second]
    info = W.run(W.build_parser().parse_args(["--data", *map(str, folders), "--weights", "1", "3", "--out",
                                              str(tmp_path / "wv"), "--model", "tiny", "--window", "2"]))
    assert info["weights"] == [1.0, 3.0] and len(info["tokens"]) == 2
    meta = json.loads((prepared / "data" / "meta.json").read_text())
    V = meta["vocab_size"]
    streams = [np.fromfile(f / "train.bin", dtype=meta["dtype"]) for f in folders]
    # the sum, written out by hand: each stream counted on its own (no window across the seam), the second 3x
    freq = np.bincount(streams[0], minlength=V) + 3 * np.bincount(streams[1], minlength=V)
    freq[:5] = 0
    columns = np.argsort(-freq, kind="stable")[:int((freq > 0).sum())]
    counts = (brute_force_counts(streams[0].tolist(), V, columns.tolist(), 2)
              + 3 * brute_force_counts(streams[1].tolist(), V, columns.tolist(), 2))
    counts[:5] = 0
    want = W.factorise(W.ppmi(counts), 128)
    table = from_hf_bert(str(tmp_path / "wv"), head=None).embed.tok.weight.detach().numpy()
    frequent = [i for i in np.argsort(-freq)[:30] if i > 4]
    got = table[frequent] / np.linalg.norm(table[frequent], axis=1, keepdims=True)
    np.testing.assert_allclose(got, want[frequent], atol=1e-4)
    # and the weight matters: counted once each, the vectors differ
    W.run(W.build_parser().parse_args(["--data", *map(str, folders), "--out", str(tmp_path / "once"),
                                       "--model", "tiny", "--window", "2"]))
    once = from_hf_bert(str(tmp_path / "once"), head=None).embed.tok.weight.detach().numpy()[frequent]
    assert not np.allclose(once / np.linalg.norm(once, axis=1, keepdims=True), got, atol=1e-2)


@pytest.mark.parametrize("args, expected", [
    (["--data", "{tmp}"], "no meta.json"),
    (["--data", "{data}", "{data}/../own_tok"], "own_tok: its tokenizer differs from"),
    (["--data", "{data}", "{data}/../same_tok", "--weights", "1"], "--weights: expected one per --data folder (2)"),
    (["--data", "{data}", "--weights", "-1"], "--weights: expected positive numbers"),
    (["--data", "{data}", "--window", "0"], "--window: expected a positive number"),
    (["--data", "{data}", "--out", "{data}/../taken"], "already holds a model"),
])
def test_bad_input_gives_one_clear_error_and_writes_nothing(prepared, second, tmp_path, capsys, args, expected):
    taken = prepared / "taken"
    taken.mkdir(exist_ok=True)
    (taken / "config.json").write_text("{}")
    args = [a.format(tmp=tmp_path, data=prepared / "data") for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as e:
        W.main(args)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and expected in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists() and (taken / "config.json").read_text() == "{}"
