"""scripts/prompt_finetune.py: the task asked as a cloze, scored by the masked-LM head at the [MASK]."""
import importlib.util
import json
import pathlib

import pytest
import torch

spec = importlib.util.spec_from_file_location(
    "prompt_finetune", pathlib.Path(__file__).parent.parent / "scripts" / "prompt_finetune.py")
prompt_finetune = importlib.util.module_from_spec(spec)
spec.loader.exec_module(prompt_finetune)


def test_each_sentence_is_wrapped_in_the_template_and_a_long_one_is_cut_not_the_template(tiny_init):
    from tokenizer import load_tokenizer
    tok = load_tokenizer(str(tiny_init))
    short, long = "a dull film", " ".join(["dull"] * 50)
    ids = prompt_finetune.prompt_ids(tok, [short, long], "{text} overall [MASK] .", max_length=16)
    cloze = tok.encode("overall") + [tok.mask_id] + tok.encode(".") + [tok.sep_id]
    assert ids[0] == [tok.cls_id] + tok.encode(short) + cloze
    assert len(ids[1]) == 16 and ids[1][-4:] == cloze
    assert all(row.count(tok.mask_id) == 1 for row in ids)


def test_class_scores_are_the_lm_heads_scores_of_the_verbalizer_words_at_the_mask(tiny_init):
    from data.tasks import pad_batch
    from model import from_hf_bert
    from tokenizer import load_tokenizer
    tok, model = load_tokenizer(str(tiny_init)), from_hf_bert(str(tiny_init), head="mlm").eval()
    ids = prompt_finetune.prompt_ids(tok, ["a dull film", "superb , a joy to watch"], "{text} overall [MASK] .", 32)
    batch = pad_batch(ids, [[0] * len(x) for x in ids], tok.pad_id)
    words = prompt_finetune.verbalizer_ids(tok, ["terrible", "superb"])
    with torch.no_grad():
        scores = prompt_finetune.class_scores(model, batch, tok.mask_id, words)               # (2, 2)
        full = model(batch["input_ids"], batch["attention_mask"])                            # (2, T, V)
    at_mask = [row.index(tok.mask_id) for row in ids]
    expected = torch.stack([full[b, at_mask[b], words] for b in range(2)])
    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-5)


def test_a_verbalizer_word_the_tokenizer_splits_is_refused_by_name(tiny_init):
    from tokenizer import load_tokenizer
    with pytest.raises(SystemExit, match="'dull film' is 2 tokens"):
        prompt_finetune.verbalizer_ids(load_tokenizer(str(tiny_init)), ["dull film", "superb"])


def test_prompt_fine_tuning_learns_the_sample_and_random_weights_start_at_chance(tiny_init, tmp_path):
    from data.tasks import write_sample_binary
    train, dev = write_sample_binary(tmp_path, n_train=200, n_dev=100)
    args = ["--init", str(tiny_init), "--train", str(train), "--dev", str(dev), "--template", "{text} overall [MASK] .",
            "--verbalizer", "terrible,superb", "--steps", "150", "--lr", "3e-3", "--batch-size", "16"]
    prompt_finetune.main(args + ["--random", "--out", str(tmp_path / "r.json")])
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["train_examples"] == 200 and result["steps"] == 150
    assert abs(result["zero_shot_accuracy"] - 0.5) <= 0.15        # the cloze before training: a coin, nearly
    assert result["accuracy"] >= 0.9                               # after it: the sample's sentiment words


def test_bad_input_is_one_line_naming_the_file(tiny_init, tmp_path, capsys):
    from data.tasks import write_sample_binary
    train, dev = write_sample_binary(tmp_path, n_train=20, n_dev=10)
    other = tmp_path / "other.tsv"
    other.write_text("sentence\tlabel\na dull film\t7\n")
    common = ["--train", str(train), "--steps", "1", "--verbalizer", "terrible,superb",
              "--out", str(tmp_path / "r.json")]
    with pytest.raises(SystemExit) as e:
        prompt_finetune.main(common + ["--init", str(tmp_path), "--dev", str(dev)])
    assert str(e.value).startswith("error: ") and str(tmp_path) in str(e.value) and "expected" in str(e.value)
    with pytest.raises(SystemExit) as e:
        prompt_finetune.main(common + ["--init", str(tiny_init), "--dev", str(other)])
    assert e.value.code == 2 and "labels 7 are not among" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
