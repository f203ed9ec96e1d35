"""finetune.py end to end on tiny models and tiny data written here, a few steps each."""
import json

import numpy as np
import pytest
import torch

import finetune
from conftest import minilm_dir, require_data
from data.tasks import read_examples, sample_binary, write_sample_binary
from model import EncoderConfig, LanguageModel, save_hf_bert
from tokenizer import WordPieceTokenizer

FAST = ["--no-progress", "--log-every", "1", "--save-every", "0", "--batch-size", "8"]


@pytest.fixture
def binary_data(tmp_path):
    return write_sample_binary(tmp_path / "data", n_train=64, n_dev=24)


def finetune_run(init, out, *args):
    return finetune.run(["--init", str(init), "--out", str(out), *FAST, *args])


def read_tsv(path):
    lines = path.read_text().splitlines()
    return lines[0].split("\t"), [line.split("\t") for line in lines[1:]]


def probs_of(path):
    head, rows = read_tsv(path)
    cols = [i for i, h in enumerate(head) if h.startswith("p_")]
    return np.array([[float(r[i]) for i in cols] for r in rows])


# -----------------------------------------------------------------------------------------------------
# each task end to end


def test_binary_writes_model_labels_metrics_and_predictions(tiny_init, binary_data, tmp_path):
    train, dev = binary_data
    out = tmp_path / "out"
    res = finetune_run(tiny_init, out, "--task", "binary", "--train", str(train), "--dev", str(dev), "--max-steps", "4")
    assert res["model"].num_labels == 1                    # one logit, trained with BCE
    for name in ("config.json", "model.safetensors", "vocab.txt", "labels.json", "metrics.json", "predictions.tsv"):
        assert (out / name).is_file(), name
    labels = json.loads((out / "labels.json").read_text())
    assert labels["task"] == "binary" and labels["labels"] == ["0", "1"] and labels["method"] == "full"
    assert labels["columns"] == {"text": "sentence", "pair": None, "label": "label"} and labels["max_length"] == 64
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4 and metrics["trainable_percent"] == 100.0
    assert metrics["trainable_params"] == metrics["total_params"] > 0 and metrics["examples_seen"] == 32
    head, rows = read_tsv(out / "predictions.tsv")
    assert head == ["text", "gold", "prediction", "p_0", "p_1"] and len(rows) == 24
    assert np.allclose(probs_of(out / "predictions.tsv").sum(1), 1, atol=1e-5)
    # the reported accuracy is the share of rows whose prediction is the gold label
    assert metrics["dev"]["accuracy"] == pytest.approx(np.mean([r[2] == r[1] for r in rows]))


def test_multiclass_softmax_over_named_labels_with_label_smoothing(tiny_init, tmp_path):
    rows = [(t, ["neg", "pos"][y]) for t, y in sample_binary(60)] + [("the movie was a film .", "neutral")] * 6
    (tmp_path / "t.tsv").write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))
    out = tmp_path / "out"
    res = finetune_run(tiny_init, out, "--task", "multiclass", "--train", str(tmp_path / "t.tsv"), "--dev",
                       str(tmp_path / "t.tsv"), "--max-steps", "3", "--label-smoothing", "0.1", "--max-eval-examples", "20")
    assert res["model"].num_labels == 3 and res["info"]["label_map"] == {"neg": 0, "neutral": 1, "pos": 2}
    assert "macro_f1" in res["metrics"]["dev"]
    assert read_tsv(out / "predictions.tsv")[0][-3:] == ["p_neg", "p_neutral", "p_pos"]


def test_pair_task_encodes_both_segments(tiny_init, tmp_path):
    texts = [t for t, _ in sample_binary(40)]
    rows = "".join(f"{i}\t{a}\t{b}\t{'entailment' if i % 2 else 'not_entailment'}\n"
                   for i, (a, b) in enumerate(zip(texts, texts[1:] + texts[:1])))
    (tmp_path / "rte.tsv").write_text("index\tsentence1\tsentence2\tlabel\n" + rows)
    out = tmp_path / "out"
    res = finetune_run(tiny_init, out, "--task", "pair", "--train", str(tmp_path / "rte.tsv"), "--dev",
                       str(tmp_path / "rte.tsv"), "--max-steps", "2", "--rdrop", "1.0")
    assert res["info"]["columns"]["pair"] == "sentence2" and res["model"].num_labels == 2
    assert read_tsv(out / "predictions.tsv")[0][:4] == ["text", "pair", "gold", "prediction"]


def test_regression_on_sts_pairs_reports_spearman(tiny_init, tmp_path):
    texts = [t for t, _ in sample_binary(40)]
    rows = "".join(f"{a}\t{b}\t{i % 6}.0\n" for i, (a, b) in enumerate(zip(texts, reversed(texts))))
    (tmp_path / "sts.tsv").write_text("sentence1\tsentence2\tscore\n" + rows)
    out = tmp_path / "out"
    res = finetune_run(tiny_init, out, "--task", "regression", "--train", str(tmp_path / "sts.tsv"), "--dev",
                       str(tmp_path / "sts.tsv"), "--max-steps", "2")
    assert res["info"]["metric"] == "spearman" and set(res["metrics"]["dev"]) == {"pearson", "spearman", "mse"}
    assert read_tsv(out / "predictions.tsv")[0] == ["text", "pair", "gold", "score"]


def test_simcse_is_judged_by_sts_spearman_before_and_after(tiny_init, tmp_path):
    (tmp_path / "sentences.txt").write_text("\n".join(t for t, _ in sample_binary(64)) + "\n")
    texts = [t for t, _ in sample_binary(20, seed=1)]
    (tmp_path / "sts.tsv").write_text("sentence1\tsentence2\tscore\n" + "".join(
        f"{a}\t{b}\t{i % 5}\n" for i, (a, b) in enumerate(zip(texts, texts[::-1]))))
    out = tmp_path / "out"
    res = finetune_run(tiny_init, out, "--task", "simcse", "--train", str(tmp_path / "sentences.txt"),
                       "--dev", str(tmp_path / "sts.tsv"), "--max-steps", "2", "--pooling", "mean")
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"spearman", "pearson"} <= set(metrics["dev_before"]) and -1 <= metrics["dev"]["spearman"] <= 1
    model, tok, info = finetune.load_finetuned(out)
    vectors = finetune.predict_proba(model, tok, ["the movie was dull ."], info=info)
    assert vectors.shape == (1, 32) and info["pooling"] == "mean"


def test_no_arguments_writes_a_sample_and_trains_a_fresh_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(finetune, "SAMPLE_DIR", tmp_path / "sample")
    monkeypatch.setattr(finetune, "DEFAULT_INIT", tmp_path / "no_pretrain")
    monkeypatch.setattr(finetune, "GLUE_DIR", tmp_path / "no_glue")
    assert finetune.main(["--out", str(tmp_path / "out"), *FAST, "--max-steps", "3"]) == 0
    said = capsys.readouterr().out
    assert "built-in sample" in said and "python pretrain.py" in said
    assert (tmp_path / "sample" / "train.tsv").is_file() and (tmp_path / "out" / "tokenizer.model").is_file()
    assert json.loads((tmp_path / "out" / "labels.json").read_text())["init"] == "scratch"


# -----------------------------------------------------------------------------------------------------
# early stopping, ensembles, round trips


def test_early_stopping_restores_the_best_weights(tiny_init, binary_data, tmp_path):
    train, dev = binary_data
    flipped = tmp_path / "flipped.tsv"          # dev labels inverted: the better it learns, the worse dev gets
    head, rows = read_tsv(dev)
    flipped.write_text("sentence\tlabel\n" + "".join(f"{t}\t{1 - int(y)}\n" for t, y in rows))
    out = tmp_path / "out"
    res = finetune_run(tiny_init, out, "--train", str(train), "--dev", str(flipped), "--max-steps", "60",
                       "--lr", "3e-3", "--eval-every", "2", "--early-stopping", "2", "--metric", "loss")
    m = res["metrics"]
    assert m["stopped_early"] and m["steps"] < 60
    assert m["dev"]["loss"] == pytest.approx(m["best"], abs=1e-6)      # the final model is the best one
    evals = [r["eval/loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "eval/loss" in r]
    assert evals[-1] > m["best"] == min(evals)                         # ... not the last one evaluated
    best = torch.load(out / "best_model.pt", weights_only=True)
    saved = finetune.load_finetuned(out)[0].state_dict()
    assert best.keys() == saved.keys() and all(torch.equal(best[k], saved[k]) for k in best)


def test_ensemble_averages_the_members_probabilities(tiny_init, binary_data, tmp_path):
    train, dev = binary_data
    dirs = [tmp_path / "a", tmp_path / "b"]
    for seed, d in zip(("1", "2"), dirs):
        finetune_run(tiny_init, d, "--train", str(train), "--dev", str(dev), "--max-steps", "3", "--seed", seed, "--lr", "1e-3")
    out = tmp_path / "ens"
    assert finetune.main(["--ensemble", f"{dirs[0]},{dirs[1]}", "--dev", str(dev), "--out", str(out)]) == 0
    texts = read_examples([dev]).texts
    members = [finetune.predict_proba(*finetune.load_finetuned(d)[:2], texts, info=finetune.load_finetuned(d)[2])
               for d in dirs]
    assert not np.allclose(members[0], members[1])
    assert np.allclose(probs_of(out / "predictions.tsv"), (members[0] + members[1]) / 2, atol=1e-6)
    assert "accuracy" in json.loads((out / "metrics.json").read_text())["dev"]


@pytest.mark.parametrize("method", ["full", "lora", "prefix"])
def test_load_finetuned_reproduces_the_trained_models_predictions_exactly(tiny_init, binary_data, tmp_path, method):
    train, dev = binary_data
    out = tmp_path / method
    res = finetune_run(tiny_init, out, "--train", str(train), "--dev", str(dev), "--max-steps", "3",
                       "--method", method, "--lr", "1e-2")
    texts = read_examples([dev]).texts
    trained = finetune.predict_proba(res["model"].cpu(), res["tokenizer"], texts, info=res["info"])
    model, tok, info = finetune.load_finetuned(out)
    assert np.array_equal(finetune.predict_proba(model, tok, texts, info=info), trained)
    assert (out / "peft.json").is_file() == (method != "full")
    assert res["metrics"]["trainable_percent"] < 100 or method == "full"


def test_fine_tuning_from_a_fine_tuned_binary_folder_goes_on_from_its_head(tiny_init, binary_data, tmp_path):
    # the folder stores the one logit z as two, [0, z] (so transformers reads it); --init folds them back
    # into z, and the second run starts where the first ended rather than from a fresh head
    train, dev = binary_data
    # (lr 3e-2 moves the head far in 40 steps; clipped, as unclipped steps that large can stall the tiny model)
    first = finetune_run(tiny_init, tmp_path / "a", "--train", str(train), "--dev", str(dev), "--max-steps", "40",
                         "--lr", "3e-2", "--clip", "1")
    second = finetune_run(tmp_path / "a", tmp_path / "b", "--train", str(train), "--dev", str(dev), "--max-steps", "1",
                          "--lr", "1e-12", "--select", "last")
    assert second["metrics"]["recipe"]["head"] == "from --init"
    trained = probs_of(tmp_path / "a" / "predictions.tsv")
    assert np.abs(trained[:, 1] - 0.5).min() > 0.02     # the trained head is off a fresh head's p of ~0.5
    np.testing.assert_allclose(probs_of(tmp_path / "b" / "predictions.tsv"), trained, atol=1e-5)
    assert first["model"].num_labels == second["model"].num_labels == 1


def test_mean_pooling_classifier_averages_real_tokens_and_reloads_exactly(tiny_init, binary_data, tmp_path):
    """--pooling mean: the head reads tanh(W mean_t h_t + b) over the real tokens (padding never counts), and
    the saved folder reloads to the same predictions."""
    import model as M
    torch.manual_seed(0)
    clf = M.SequenceClassifier(M.EncoderConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2,
                                               intermediate_size=32, max_position=16), 2, pooling="mean").eval()
    ids = torch.randint(5, 50, (2, 6))
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    with torch.no_grad():
        h = clf.encoder(ids, mask)
        expected = clf.classifier(torch.tanh(clf.pooler(torch.stack([h[0].mean(0), h[1, :3].mean(0)]))))
        assert torch.allclose(clf(ids, mask), expected, atol=1e-6)
        short = clf(ids[1:, :3], mask[1:, :3])
    assert torch.allclose(clf(ids, mask)[1:], short, atol=1e-5), "padding must not change the mean"
    train, dev = binary_data
    out = tmp_path / "mean"
    res = finetune_run(tiny_init, out, "--train", str(train), "--dev", str(dev), "--max-steps", "3", "--pooling", "mean")
    texts = read_examples([dev]).texts
    trained = finetune.predict_proba(res["model"].cpu(), res["tokenizer"], texts, info=res["info"])
    model, tok, info = finetune.load_finetuned(out)
    assert info["pooling"] == "mean" and model.pooling == "mean"
    assert np.array_equal(finetune.predict_proba(model, tok, texts, info=info), trained)


def test_adversarial_augment_and_contrastive_losses_train(tiny_init, binary_data, tmp_path):
    train, dev = binary_data
    res = finetune_run(tiny_init, tmp_path / "out", "--train", str(train), "--dev", str(dev), "--max-steps", "2",
                       "--adversarial", "fgm", "--adv-eps", "0.5", "--augment", "eda", "--eval-attack-eps", "0.5",
                       "--eval-attack-steps", "2")
    dev_metrics = res["metrics"]["dev"]
    # a loss-maximising attack takes correct answers away: never above clean accuracy, in whole examples
    assert dev_metrics["robust_accuracy"] <= dev_metrics["accuracy"]
    assert (24 * dev_metrics["robust_accuracy"]) == pytest.approx(round(24 * dev_metrics["robust_accuracy"]))
    res = finetune_run(tiny_init, tmp_path / "out2", "--train", str(train), "--max-steps", "2", "--contrastive-weight", "0.5")
    assert res["metrics"]["steps"] == 2 and res["metrics"].get("dev") is None


# -----------------------------------------------------------------------------------------------------
# bad input: one clear line each, exit code 2


def bad_vocab_folder(tiny_init, tmp_path):
    folder = tmp_path / "bad_vocab"
    folder.mkdir()
    for f in tiny_init.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    with open(folder / "vocab.txt", "a") as f:
        f.write("extraword\n")
    return folder


@pytest.mark.parametrize("case, expected", [
    ("unknown column", "unknown text column 'review'"),
    ("labels outside the task", "is a third class"),
    ("empty file", "empty file"),
    ("mixed label types", "mixed label types"),
    ("mismatched vocab", "mismatched vocab: the tokenizer has"),
    ("missing init", "folder not found"),
    ("fsdp", "--fsdp: finetune.py does not shard"),
])
def test_bad_input_gives_one_clear_error(tiny_init, binary_data, tmp_path, capsys, case, expected):
    train, dev = binary_data
    init, extra = tiny_init, []
    bad = tmp_path / "bad.tsv"
    if case == "unknown column":
        extra = ["--text-col", "review"]
    elif case == "labels outside the task":
        bad.write_text("sentence\tlabel\na\t0\nb\t1\nc\t2\n")
        train = bad
    elif case == "empty file":
        bad.write_text("")
        train = bad
    elif case == "mixed label types":
        bad.write_text("sentence\tlabel\na\t0\nb\tpositive\n")
        train = bad
    elif case == "mismatched vocab":
        init = bad_vocab_folder(tiny_init, tmp_path)
    elif case == "fsdp":
        extra = ["--fsdp"]
    else:
        init = tmp_path / "nowhere"
    code = finetune.main(["--init", str(init), "--train", str(train), "--dev", str(dev), "--out", str(tmp_path / "o"),
                          *FAST, "--max-steps", "1", *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and expected in err


# -----------------------------------------------------------------------------------------------------
# real data


def test_minilm_fine_tunes_on_real_sst2_rows(tmp_path):
    train_rows = require_data("sst2", "train.tsv").read_text().splitlines()[:65]
    dev_rows = require_data("sst2", "dev.tsv").read_text().splitlines()[:33]
    (tmp_path / "train.tsv").write_text("\n".join(train_rows) + "\n")
    (tmp_path / "dev.tsv").write_text("\n".join(dev_rows) + "\n")
    out = tmp_path / "out"
    res = finetune.run(["--init", str(minilm_dir()), "--train", str(tmp_path / "train.tsv"), "--dev",
                        str(tmp_path / "dev.tsv"), "--out", str(out), *FAST, "--batch-size", "16", "--max-steps", "3"])
    assert res["metrics"]["train_examples"] == 64 and res["metrics"]["steps"] == 3
    head, rows = read_tsv(out / "predictions.tsv")
    assert head == ["text", "gold", "prediction", "p_0", "p_1"] and len(rows) == 32
    gold = [line.split("\t")[1] for line in dev_rows[1:]]
    assert [r[1] for r in rows] == gold                                     # the dev rows, in order
    # the reported accuracy is the predictions' agreement with the gold labels, and each prediction the
    # more probable class
    assert res["metrics"]["dev"]["accuracy"] == pytest.approx(np.mean([r[2] == g for r, g in zip(rows, gold)]))
    assert all(r[2] == ("1" if float(r[4]) > float(r[3]) else "0") for r in rows)
