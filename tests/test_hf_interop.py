"""A fine-tuned folder is also a Hugging Face model: transformers' pipeline("text-classification") and
AutoModelForSequenceClassification read it with our label names and give predict.py's probabilities."""
import json
import re

import numpy as np
import pytest
import torch

import finetune
import predict
from conftest import minilm_dir, require_data
from finetuned import load_finetuned, predict_proba

transformers = pytest.importorskip("transformers")


def hf_pipeline_probs(folder, texts) -> tuple[list[str], np.ndarray]:
    """(predicted label names, (N, K) probabilities in config.json's id2label order) from pipeline()."""
    clf = transformers.pipeline("text-classification", model=str(folder), top_k=None, device="cpu")
    id2label = transformers.AutoConfig.from_pretrained(str(folder)).id2label
    names = [id2label[i] for i in range(len(id2label))]
    rows = clf(list(texts), batch_size=16, truncation=True)
    probs = np.array([[{d["label"]: d["score"] for d in row}[n] for n in names] for row in rows])
    return [names[i] for i in probs.argmax(1)], probs


def test_a_minilm_sst2_fine_tune_gives_the_same_labels_and_probabilities_in_the_hf_pipeline(tmp_path):
    sst2 = require_data("sst2")
    out = tmp_path / "ft"
    finetune.run(["--task", "binary", "--init", str(minilm_dir()), "--train", str(sst2 / "train.tsv"),
                  "--max-train-examples", "256", "--max-steps", "40", "--batch-size", "16", "--lr", "1e-4",
                  "--out", str(out), "--device", "cpu", "--no-progress", "--save-every", "0", "--seed", "0"])
    dev = [line.split("\t") for line in (sst2 / "dev.tsv").read_text().splitlines()[1:65]]
    texts = [t.strip() for t, _ in dev]

    ours = predict.Predictor([str(out)])
    probs = ours(texts)                                          # (N, 2): [p(0), p(1)]
    labels, hf_probs = hf_pipeline_probs(out, texts)

    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "0", "1": "1"} and config["label2id"] == {"0": 0, "1": 1}
    assert config["problem_type"] == "single_label_classification" and config["num_labels"] == 2
    np.testing.assert_allclose(hf_probs, probs, atol=1e-5)
    assert labels == [row["label"] for row in ours.describe(probs)]
    assert min(labels.count("0"), labels.count("1")) >= 8    # it learned something: both classes occur, often
    # and the folder still loads in our own code as one logit
    model, _, info = load_finetuned(out)
    assert model.classifier.out_features == 1 and info["num_outputs"] == 1


def tiny_task(tmp_path, task, label_of):
    """A tiny WordPiece encoder fine-tuned by finetune.py on the template sample, relabelled by label_of."""
    from data.tasks import sample_binary
    from model import EncoderConfig, SequenceClassifier, save_hf_bert
    from tokenizer import WordPieceTokenizer
    rows = sample_binary(200, seed=1)
    words = sorted({w for t, _ in rows for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    (tmp_path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    (tmp_path / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{label_of(t, y)}\n" for t, y in rows))
    torch.manual_seed(0)
    cfg = EncoderConfig(vocab_size=len(words) + 5, hidden_size=32, num_layers=2, num_heads=4, max_position=64)
    save_hf_bert(SequenceClassifier(cfg, 1), str(tmp_path / "base"), WordPieceTokenizer(str(tmp_path / "vocab.txt")))
    finetune.run(["--task", task, "--init", str(tmp_path / "base"), "--train", str(tmp_path / "train.tsv"),
                  "--out", str(tmp_path / "ft"), "--max-steps", "10", "--lr", "3e-3", "--max-length", "32",
                  "--device", "cpu", "--no-progress", "--save-every", "0", "--seed", "0"])
    return tmp_path / "ft", [t for t, _ in rows[:40]]


def test_a_multiclass_folder_has_its_label_names_and_probabilities_in_hf(tmp_path, capsys):
    names = ("short", "medium", "long")
    folder, texts = tiny_task(tmp_path, "multiclass", lambda t, y: names[len(t.split()) % 3])
    printed = capsys.readouterr().out                     # finetune says what it started from and where it saved
    assert f"--init {tmp_path / 'base'}: 2 layers" in printed and f"saved the model to {folder}" in printed
    model, tok, info = load_finetuned(folder)
    ours = predict_proba(model, tok, texts, info=info)
    labels, hf_probs = hf_pipeline_probs(folder, texts)
    config = json.loads((folder / "config.json").read_text())
    assert config["problem_type"] == "single_label_classification"
    assert [config["id2label"][str(i)] for i in range(3)] == info["labels"] == sorted(names)
    np.testing.assert_allclose(hf_probs, ours, atol=1e-5)
    assert labels == [info["labels"][i] for i in ours.argmax(1)]


def test_a_regression_folder_is_read_by_hf_as_regression_with_our_scores(tmp_path):
    folder, texts = tiny_task(tmp_path, "regression", lambda t, y: len(t.split()) / 10)
    model, tok, info = load_finetuned(folder)
    ours = predict_proba(model, tok, texts, info=info)                    # (N,) scores
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    assert hf.config.problem_type == "regression" and hf.config.num_labels == 1
    enc = transformers.AutoTokenizer.from_pretrained(str(folder))(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        scores = hf(**enc).logits[:, 0].double().numpy()
    np.testing.assert_allclose(scores, ours, atol=1e-5)


def test_a_mean_pooled_head_is_not_advertised_with_label_names_transformers_would_misread():
    from finetuned import hf_fields
    # transformers' BertForSequenceClassification pools [CLS]: a mean-pooled folder would get other answers
    assert hf_fields({"task": "binary", "labels": ["neg", "pos"], "pooling": "mean"}) == {"plainbert_pooling": "mean"}
    assert hf_fields({"task": "binary", "labels": ["neg", "pos"], "pooling": "cls"})["id2label"] == {"0": "neg", "1": "pos"}
