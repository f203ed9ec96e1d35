"""finetune.py --task prompt: the task asked as a cloze, scored by the masked-LM head at the [MASK]."""
import json

import numpy as np
import pytest
import torch

import finetune
import predict
from data.tasks import pad_batch, write_sample_binary
from finetuned import FinetuneError, build_model, cloze_ids, load_finetuned, predict_proba
from model import ClozeClassifier, from_hf_bert
from tokenizer import TokenizerError, load_tokenizer

CLOZE = "{text} overall [MASK] ."
FAST = ["--no-progress", "--log-every", "10", "--save-every", "0", "--batch-size", "16"]


def test_each_sentence_is_put_in_the_template_and_a_long_one_is_cut_not_the_template(tiny_init):
    tok = load_tokenizer(str(tiny_init)).set_template(CLOZE)
    short, long = "a dull film", " ".join(["dull"] * 50)
    ids = tok([short, long, "a dull [MASK] film"], max_length=16, padding=False, return_tensors=None)["input_ids"]
    cloze = tok.encode("overall") + [tok.mask_id] + tok.encode(".") + [tok.sep_id]
    assert ids[0] == [tok.cls_id] + tok.encode(short) + cloze
    assert len(ids[1]) == 16 and ids[1][-4:] == cloze
    assert ids[2] == ids[0], "a [MASK] typed in the sentence is dropped: each row holds the template's one"
    assert tok.set_template(None)([short], return_tensors=None)["input_ids"][0] == [tok.cls_id] + tok.encode(short) + [tok.sep_id]


def test_a_template_is_refused_with_pairs_and_without_room_for_the_sentence(tiny_init):
    tok = load_tokenizer(str(tiny_init)).set_template(CLOZE)
    with pytest.raises(TokenizerError, match="one text per example"):
        tok(["a dull film"], ["a pair"])
    with pytest.raises(TokenizerError, match="max_length=5 leaves no room"):
        tok(["a dull film"], max_length=5)
    with pytest.raises(TokenizerError, match="expected {text} once and \\[MASK\\] once"):
        tok.set_template("{text} overall .")


def test_class_scores_are_the_lm_heads_scores_of_the_verbalizer_words_at_the_mask(tiny_init):
    tok = load_tokenizer(str(tiny_init))
    mask_id, words = cloze_ids(tok, CLOZE, ["terrible", "superb"], ["0", "1"], "train.tsv")
    lm = from_hf_bert(str(tiny_init), head="mlm").eval()
    model = build_model(tiny_init, "prompt", 2, cloze=(mask_id, words)).eval()
    assert isinstance(model, ClozeClassifier) and words == [tok.token_to_id("terrible"), tok.token_to_id("superb")]
    enc = tok(["a dull film", "superb , a joy to watch overall"], return_tensors=None)
    batch = pad_batch(enc["input_ids"], enc["token_type_ids"], tok.pad_id)
    with torch.no_grad():
        scores = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])      # (2, 2)
        full = lm(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])            # (2, T, V)
    at_mask = [row.index(tok.mask_id) for row in enc["input_ids"]]
    torch.testing.assert_close(scores, torch.stack([full[b, at_mask[b], words] for b in range(2)]), rtol=1e-5, atol=1e-5)


def test_a_verbalizer_that_does_not_fit_the_classes_or_the_tokenizer_is_refused_by_name(tiny_init):
    tok = load_tokenizer(str(tiny_init))
    with pytest.raises(FinetuneError, match="'dull film' is 2 tokens"):
        cloze_ids(tok, CLOZE, ["dull film", "superb"], ["0", "1"], "train.tsv")
    with pytest.raises(FinetuneError, match="has 3 words, train.tsv has 2 classes"):
        cloze_ids(tok, CLOZE, ["terrible", "dull", "superb"], ["0", "1"], "train.tsv")


def test_prompt_fine_tuning_learns_the_sample_from_chance_and_its_folder_predicts_the_same(tiny_init, tmp_path):
    train, dev = write_sample_binary(tmp_path / "data", n_train=200, n_dev=100)
    out = tmp_path / "prompt"
    res = finetune.run(["--task", "prompt", "--init", str(tiny_init), "--train", str(train), "--dev", str(dev),
                        "--template", CLOZE, "--verbalizer", "terrible,superb", "--max-steps", "120", "--lr", "3e-3",
                        "--out", str(out), *FAST])
    m = res["metrics"]
    assert abs(m["dev_before"]["accuracy"] - 0.5) <= 0.15      # the random tiny LM's cloze before training: a coin
    assert m["dev"]["accuracy"] >= 0.9                          # after it: the sample's sentiment words
    info = json.loads((out / "labels.json").read_text())
    assert info["template"] == CLOZE and info["verbalizer"] == ["terrible", "superb"] and info["num_outputs"] == 2
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertForMaskedLM"]
    # the folder reads text as the model was trained on it: the same probabilities as the run's dev predictions
    model, tok, info = load_finetuned(out)
    assert isinstance(model, ClozeClassifier) and tok.cloze is not None
    lines = (out / "predictions.tsv").read_text().splitlines()[1:]
    texts, written = [r.split("\t")[0] for r in lines], np.array([[float(x) for x in r.split("\t")[3:5]] for r in lines])
    np.testing.assert_allclose(predict_proba(model, tok, texts, info=info), written, atol=1e-5)
    np.testing.assert_allclose(predict.Predictor([str(out)])(texts[:10]), written[:10], atol=1e-5)
    # and explains it: integrated gradients over the template's words too, summing to f(x) - f(baseline)
    from explain import explain
    e = explain(model, tok, info, "a superb film", steps=20)
    assert e.tokens[-4:] == ["overall", "[MASK]", ".", "[SEP]"] and abs(e.completeness_gap) <= 1e-3


def test_prompt_folder_exports_to_onnx_with_its_template(tiny_init, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    import export
    train, dev = write_sample_binary(tmp_path / "data", n_train=40, n_dev=20)
    src = tmp_path / "prompt"
    finetune.run(["--task", "prompt", "--init", str(tiny_init), "--train", str(train), "--dev", str(dev),
                  "--verbalizer", "terrible,superb", "--max-steps", "5", "--out", str(src), *FAST])
    export.main([str(src), "--out", str(tmp_path / "onnx"), "--onnx"])
    texts = ["a superb film", "what a dull and terrible experience .", "fine"]
    np.testing.assert_allclose(predict.Predictor([str(tmp_path / "onnx")], runtime="onnx")(texts),
                               predict.Predictor([str(src)])(texts), atol=1e-4)
    with pytest.raises(SystemExit) as e:                     # int8.load_int8 rebuilds classifiers only
        export.main([str(src), "--out", str(tmp_path / "int8"), "--quantize", "int8"])
    assert e.value.code == 2 and "--quantize int8: " in capsys.readouterr().err
    assert not (tmp_path / "int8").exists()


@pytest.mark.parametrize("extra, expected", [
    (["--task", "binary", "--template", CLOZE], "--template/--verbalizer: only with --task prompt"),
    (["--task", "prompt", "--template", "{text} overall ."], "expected {text} once and [MASK] once"),
    (["--task", "prompt", "--verbalizer", "terrible,dull,superb"], "has 3 words"),
    (["--task", "prompt", "--verbalizer", "terrible,superb", "--pooling", "mean"], "--pooling mean: --task prompt"),
])
def test_bad_prompt_flags_are_one_line_each_and_nothing_is_written(tiny_init, tmp_path, extra, expected):
    train, dev = write_sample_binary(tmp_path / "data", n_train=20, n_dev=10)
    with pytest.raises(FinetuneError) as e:
        finetune.run(["--init", str(tiny_init), "--train", str(train), "--dev", str(dev), "--max-steps", "1",
                      "--out", str(tmp_path / "out"), *FAST, *extra])
    assert expected in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_prompt_needs_a_masked_lm_head(tiny_init, tmp_path):
    """all-MiniLM-L6-v2 ships no MLM head: a cloze cannot be scored, and the error says so (not a missing key)."""
    from model import save_hf_bert
    encoder_only = tmp_path / "encoder"
    save_hf_bert(from_hf_bert(str(tiny_init), head=None), str(encoder_only), load_tokenizer(str(tiny_init)))
    train, dev = write_sample_binary(tmp_path / "data", n_train=20, n_dev=10)
    with pytest.raises(FinetuneError, match="--task prompt scores words with a masked-LM head, and this folder has none"):
        finetune.run(["--task", "prompt", "--init", str(encoder_only), "--train", str(train), "--dev", str(dev),
                      "--verbalizer", "terrible,superb", "--max-steps", "1", "--out", str(tmp_path / "out"), *FAST])
    assert not (tmp_path / "out").exists()
