"""baseline.py: the bag-of-words logistic regression that fine-tuned encoders are compared with."""
import pytest
import torch

import baseline


def write(path, rows):
    path.write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))


def test_bow_logistic_regression_learns_word_polarity(tmp_path):
    good, bad = ["great", "lovely", "superb", "fine"], ["awful", "dull", "boring", "bad"]
    rows = [(f"the film was {w} and {v}", int(w in good)) for w in good + bad for v in ["long", "short", "odd"]]
    write(tmp_path / "train.tsv", rows * 3)
    write(tmp_path / "dev.tsv", [("a great ride", 1), ("so dull", 0), ("superb , fine", 1), ("boring and bad", 0)])
    result = baseline.main(["--train", str(tmp_path / "train.tsv"), "--dev", str(tmp_path / "dev.tsv"),
                            "--min-count", "1", "--out", str(tmp_path / "m.json")])
    assert result["accuracy"] == 1.0 and (tmp_path / "m.json").exists()


def test_fit_reaches_the_regularised_optimum():
    """At the optimum the gradient of mean BCE + l2/N |w|^2 / 2 vanishes: check it on random data."""
    torch.manual_seed(0)
    feats = [set(map(str, torch.randint(0, 30, (5,)).tolist())) for _ in range(200)]
    y = [int("1" in f or "2" in f) for f in feats]
    vocab = {str(i): i for i in range(30)}
    x = baseline.to_sparse(feats, vocab)
    w, b = baseline.fit(x, y, 2, l2=1.0)
    w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
    logits = (torch.sparse.mm(x, w) + b).squeeze(1)
    loss = baseline.losses.binary_cross_entropy_with_logits(logits, torch.tensor(y).float()) + 0.5 / 200 * (w ** 2).sum()
    loss.backward()
    assert w.grad.abs().max() < 1e-4 and b.grad.abs().max() < 1e-4


def test_bad_label_file_is_one_clear_error(tmp_path, capsys):
    write(tmp_path / "train.tsv", [("a", 0), ("b", 1), ("c", 2)])
    with pytest.raises(SystemExit) as e:
        baseline.main(["--train", str(tmp_path / "train.tsv"), "--dev", str(tmp_path / "train.tsv")])
    assert e.value.code == 2 and "third class" in capsys.readouterr().err
