"""predict.py: a fine-tuned folder (or an ensemble) labels texts from arguments, stdin or a file, and gives
exactly what finetune.predict_proba gives.

`toy_model()` is the shared fixture of test_predict / test_export / test_serve: a tiny encoder fine-tuned
by finetune.py itself on the built-in template sample (data.tasks.sample_binary), so every folder these
tests use is a real finetune.py output, confidently right on its dev set.
"""
import io
import json
import re
import shutil
import sys

import numpy as np
import pytest
import torch

import predict
from finetuned import load_finetuned, predict_proba

_CACHE = {}


def toy_model(tmp_root) -> dict:
    """{"dir": fine-tuned folder, "dev": dev.tsv, "texts", "labels"}; built once per test session."""
    if "toy" in _CACHE:
        return _CACHE["toy"]
    import finetune
    from data.tasks import sample_binary
    from model import EncoderConfig, SequenceClassifier, save_hf_bert
    from tokenizer import WordPieceTokenizer
    root = tmp_root / "toy"
    root.mkdir()
    rows = sample_binary(760, seed=0)
    words = sorted({w for t, _ in rows for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    (root / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    for name, part in (("train", rows[:600]), ("dev", rows[600:])):
        (root / f"{name}.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in part))
    torch.manual_seed(0)
    cfg = EncoderConfig(vocab_size=len(words) + 5, hidden_size=32, num_layers=2, num_heads=4, max_position=64)
    save_hf_bert(SequenceClassifier(cfg, 1), str(root / "base"), WordPieceTokenizer(str(root / "vocab.txt")))
    finetune.run(["--task", "binary", "--init", str(root / "base"), "--train", str(root / "train.tsv"),
                  "--dev", str(root / "dev.tsv"), "--out", str(root / "ft"), "--max-steps", "80", "--batch-size", "32",
                  "--lr", "3e-3", "--max-length", "32", "--device", "cpu", "--no-progress", "--seed", "0"])
    _CACHE["toy"] = {"dir": str(root / "ft"), "dev": str(root / "dev.tsv"),
                     "texts": [t for t, _ in rows[600:]], "labels": [y for _, y in rows[600:]]}
    return _CACHE["toy"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    return toy_model(tmp_path_factory.getbasetemp())


def reference(folder, texts, pairs=None):
    model, tok, info = load_finetuned(folder)
    return predict_proba(model, tok, texts, pairs, info=info)


def run_cli(capsys, *argv):
    predict.main([str(a) for a in argv])
    return capsys.readouterr().out


def test_the_toy_model_has_learned_its_task(toy):
    probs = reference(toy["dir"], toy["texts"])
    assert (probs.argmax(1) == np.array(toy["labels"])).mean() > 0.9


def test_texts_from_arguments_give_predict_proba_exactly_as_tsv(toy, capsys):
    texts = toy["texts"][:5]
    out = run_cli(capsys, toy["dir"], *texts, "--format", "tsv").splitlines()
    assert out[0] == "label\tprob_0\tprob_1\ttext"
    probs = reference(toy["dir"], texts)
    for line, p, text in zip(out[1:], probs, texts):
        label, *cells, echoed = line.split("\t")
        assert label == str(p.argmax()) and echoed == text
        np.testing.assert_allclose([float(c) for c in cells], p, atol=1e-6)
    assert len(out) == 1 + len(texts)


def test_the_default_output_shows_each_text_with_its_label_name_and_probabilities(toy, capsys, tmp_path):
    named = tmp_path / "named"
    shutil.copytree(toy["dir"], named)
    info = json.loads((named / "labels.json").read_text())
    (named / "labels.json").write_text(json.dumps(info | {"labels": ["negative", "positive"]}))
    texts = toy["texts"][:4]
    lines = run_cli(capsys, named, *texts).splitlines()
    probs = reference(toy["dir"], texts)
    assert len(lines) == len(texts)
    for line, p, text in zip(lines, probs, texts):
        label = ["negative", "positive"][p.argmax()]
        assert line.startswith(f"{label} ") and line.endswith(text)
        assert f"{p.max():.3f}" in line and f"negative {p[0]:.3f}  positive {p[1]:.3f}" in line


def test_a_file_in_gives_one_jsonl_row_per_example_in_order(toy, capsys, tmp_path):
    out = tmp_path / "preds.jsonl"
    run_cli(capsys, toy["dir"], "--input", toy["dev"], "--format", "jsonl", "--output", out, "--batch-size", "16")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    probs = reference(toy["dir"], toy["texts"])
    assert len(rows) == len(toy["texts"])
    assert [r["label"] for r in rows] == [str(k) for k in probs.argmax(1)]
    assert [r["text"] for r in rows] == toy["texts"]
    np.testing.assert_allclose([[r["probs"]["0"], r["probs"]["1"]] for r in rows], probs, atol=1e-6)
    assert not (tmp_path / "preds.jsonl.tmp").exists()


def test_stdin_is_read_one_text_per_line(toy, capsys, monkeypatch):
    texts = toy["texts"][:3]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(texts) + "\n\n"))
    rows = [json.loads(x) for x in run_cli(capsys, toy["dir"], "--format", "jsonl").splitlines()]
    assert [r["label"] for r in rows] == [str(k) for k in reference(toy["dir"], texts).argmax(1)]


def test_an_ensemble_averages_its_members_probabilities(toy, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(toy["dir"], other)
    model, tok, info = load_finetuned(toy["dir"])
    with torch.no_grad():
        model.classifier.bias += 1.5                       # a different member: shifted towards class 1
    from model import save_hf_bert
    save_hf_bert(model, str(other), tok)
    texts = toy["texts"][:20]
    both = predict.Predictor([toy["dir"], str(other)])(texts)
    np.testing.assert_allclose(both, (reference(toy["dir"], texts) + reference(str(other), texts)) / 2, atol=1e-6)


def test_an_ensemble_of_different_tasks_is_refused(toy, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(toy["dir"], other)
    info = json.loads((other / "labels.json").read_text())
    (other / "labels.json").write_text(json.dumps(info | {"labels": ["neg", "pos"]}))
    with pytest.raises(predict.InputError, match="does not match"):
        predict.Predictor([toy["dir"], str(other)])


@pytest.mark.parametrize("argv, message", [
    (["--input", "missing.tsv"], "file not found"),
    (["--input", "DEV", "--text-col", "nope"], "unknown text column 'nope'"),
    (["some text", "--input", "DEV"], "not both"),
    (["text", "--batch-size", "0"], "--batch-size"),
])
def test_bad_input_is_a_one_line_error(toy, capsys, argv, message):
    argv = [toy["dev"] if a == "DEV" else a for a in argv]
    with pytest.raises(SystemExit) as e:
        predict.main([toy["dir"]] + argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and message in err and "Traceback" not in err


def test_a_folder_that_is_not_a_model_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        predict.main([str(tmp_path / "nowhere"), "text"])
    assert e.value.code == 2 and "not a folder" in capsys.readouterr().err


def test_a_model_fine_tuned_on_pairs_asks_for_the_second_text(toy, tmp_path):
    pair_model = tmp_path / "pairs"
    shutil.copytree(toy["dir"], pair_model)
    info = json.loads((pair_model / "labels.json").read_text())
    (pair_model / "labels.json").write_text(json.dumps(info | {"columns": info["columns"] | {"pair": "sentence2"}}))
    predictor = predict.Predictor([str(pair_model)])
    assert predictor.needs_pairs
    with pytest.raises(predict.InputError, match="second text"):
        predictor(["a film"])
    expected = predict_proba(*load_finetuned(str(pair_model))[:2], ["a film"], ["a plot"], info=info)
    np.testing.assert_allclose(predictor(["a film"], ["a plot"]), expected, atol=1e-9)
