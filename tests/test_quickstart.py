"""The Quickstart as a newcomer runs it: the built-in sample teaches a small model the sentiment of the two
README examples, which the sample does not contain. The examples are read from README.md itself, so the
README cannot promise sentences the test does not check. (.ci/fresh_clone.sh runs the whole Quickstart,
pretrain.py included, in a fresh clone; here the sample alone, on finetune.py's no-pretrain path.)"""
import pathlib
import re
import shlex

import finetune
import predict
from data.tasks import sample_binary

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_examples() -> list[str]:
    """The texts of the Quickstart's `python predict.py out/finetune "..." "..."` line."""
    line = next(line for line in (ROOT / "README.md").read_text().splitlines()
                if line.startswith("python predict.py out/finetune \""))
    return shlex.split(line.split("#")[0])[3:]


def words(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def test_the_readme_has_one_positive_and_one_negative_example():
    assert readme_examples() == ["a gripping, funny film", "dull and far too long"]


def test_the_sample_holds_neither_readme_example():
    # not even with other punctuation: the model must get them from the words it learned, not recall them
    seen = {words(t) for t, _ in sample_binary(800)}          # the train and dev rows write_sample_binary writes
    assert not {words(t) for t in readme_examples()} & seen


def test_a_model_fine_tuned_on_the_sample_labels_the_readme_examples_right(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(finetune, "SAMPLE_DIR", tmp_path / "sample")
    monkeypatch.setattr(finetune, "DEFAULT_INIT", tmp_path / "no_pretrain")     # the scratch model
    monkeypatch.setattr(finetune, "GLUE_DIR", tmp_path / "no_glue")
    out = tmp_path / "finetune"
    assert finetune.main(["--task", "binary", "--out", str(out), "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert f"saved the model to {out}" in said
    probs = predict.Predictor([str(out)])(readme_examples())             # (2, 2): p(negative), p(positive)
    assert probs[0, 1] > 0.8 and probs[1, 0] > 0.8, probs
