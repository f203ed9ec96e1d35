"""data/tasks.py (task files, labels, micro-batches, augmentation) and data/prepare_glue.py."""
import hashlib
import json
import lzma
import zipfile

import numpy as np
import pytest
import torch

from conftest import require_data
from data import prepare_glue
from data.tasks import (TaskDataError, TaskDataset, encode_labels, label_classes, pad_batch, read_examples, read_sentences, sample_binary, write_sample_binary)


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# -----------------------------------------------------------------------------------------------------
# reading the GLUE layouts as they ship


def test_sst2_layout_reads_sentence_and_label(tmp_path):
    ex = read_examples([write(tmp_path / "train.tsv", "sentence\tlabel\nit 's \" charming \t1\ndull \t0\n")])
    assert ex.texts == ['it \'s " charming', "dull"] and ex.labels == ["1", "0"] and ex.pairs is None
    assert ex.columns == {"text": "sentence", "pair": None, "label": "label"}
    assert ex.where == [f"{tmp_path / 'train.tsv'}:2", f"{tmp_path / 'train.tsv'}:3"]


def test_cola_without_header_is_recognised_by_its_shape(tmp_path):
    ex = read_examples([write(tmp_path / "in_domain_train.tsv", "gj04\t1\t\tGood one.\ngj04\t0\t*\tOne bad .\n")])
    assert ex.layout == "cola" and ex.texts == ["Good one.", "One bad ."] and ex.labels == ["1", "0"]


def test_real_cola_dev_is_the_in_domain_plus_out_of_domain_files():
    raw = require_data("cola", "cola_public", "raw")
    ex = read_examples([raw / "in_domain_dev.tsv", raw / "out_of_domain_dev.tsv"])
    assert len(ex) == 1043 and ex.layout == "cola"          # GLUE's CoLA dev
    assert label_classes("binary", ex) == ["0", "1"]


def test_real_stsb_gives_pairs_and_float_scores():
    ex = read_examples([require_data("stsb", "dev.tsv")])
    assert len(ex) == 1500 and ex.columns == {"text": "sentence1", "pair": "sentence2", "label": "score"}
    scores = encode_labels("regression", ex, label_classes("regression", ex))
    assert scores[0] == 5.0 and min(scores) == 0.0 and max(scores) == 5.0


def test_real_sst2_dev_reads_all_rows():
    ex = read_examples([require_data("sst2", "dev.tsv")])
    assert len(ex) == 872 and sorted(set(ex.labels)) == ["0", "1"]


def test_mrpc_layout_with_byte_order_mark(tmp_path):
    f = write(tmp_path / "train.tsv", "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n1\t7\t8\tA \"b\".\tA b.\n")
    ex = read_examples([f])
    assert (ex.texts, ex.pairs, ex.labels) == (['A "b".'], ["A b."], ["1"])


def test_qnli_pairs_question_with_sentence_and_names_map_to_sorted_ids(tmp_path):
    f = write(tmp_path / "dev.tsv", "index\tquestion\tsentence\tlabel\n0\tWho?\tHe.\tnot_entailment\n1\tWhat?\tIt.\tentailment\n")
    ex = read_examples([f])
    assert ex.columns["text"] == "question" and ex.columns["pair"] == "sentence"
    classes = label_classes("pair", ex)
    assert classes == ["entailment", "not_entailment"] and encode_labels("pair", ex, classes) == [1, 0]


def test_csv_and_jsonl_with_named_columns(tmp_path):
    csv_file = write(tmp_path / "a.csv", 'review,stars\n"good, really",5\nbad,1\n')
    ex = read_examples([csv_file], label_col="stars")
    assert ex.texts == ["good, really", "bad"] and ex.labels == ["5", "1"]
    jsonl = write(tmp_path / "a.jsonl", '{"text": "x y", "label": "pos"}\n{"text": "z", "label": "neg"}\n')
    assert read_examples([jsonl]).labels == ["pos", "neg"]


def test_numeric_classes_sort_numerically_and_binary_targets_are_floats(tmp_path):
    f = write(tmp_path / "t.tsv", "text\tlabel\na\t10\nb\t9\nc\t1.0\n")
    ex = read_examples([f])
    assert label_classes("multiclass", ex) == ["1", "9", "10"]
    assert encode_labels("multiclass", ex, ["1", "9", "10"]) == [2, 1, 0]
    two = read_examples([write(tmp_path / "b.tsv", "text\tlabel\na\t1\nb\t0\n")])
    assert encode_labels("binary", two, label_classes("binary", two)) == [1.0, 0.0]


# -----------------------------------------------------------------------------------------------------
# one clear error per kind of bad input


@pytest.mark.parametrize("content, kwargs, task, message", [
    ("sentence\tlabel\na\t1\n", {"text_col": "review"}, "binary", "unknown text column 'review'; the file has sentence, label"),
    ("text\tlabel\na\t0\nb\t1\nc\t2\n", {}, "binary", ":4: label '2' is a third class"),
    ("", {}, "binary", "empty file"),
    ("sentence\tlabel\n", {}, "binary", "no examples"),
    ("text\tlabel\na\t1\nb\tpos\n", {}, "multiclass", ":3: mixed label types: 'pos' is a name"),
    ("text\tlabel\na\t1\nb\t0\textra\n", {}, "binary", ":3: ragged row: expected 2 fields like the header, got 3"),
    ("text\tscore\na\t1.5\nb\thigh\n", {}, "regression", ":3: expected a numeric score"),
    ("text\tlabel\na\t0.5\n", {}, "binary", "is not a class"),
    ("words\tlabel\na\t1\n", {}, "binary", "no text column among words, label"),
])
def test_bad_task_files_raise_one_line_errors_naming_the_file(tmp_path, content, kwargs, task, message):
    f = write(tmp_path / "bad.tsv", content)
    with pytest.raises(TaskDataError) as err:
        label_classes(task, read_examples([f], **kwargs))
    assert message in str(err.value) and str(f) in str(err.value) and "\n" not in str(err.value)


def test_a_dev_label_unseen_in_training_is_an_error(tmp_path):
    train = read_examples([write(tmp_path / "train.tsv", "text\tlabel\na\tx\nb\ty\n")])
    dev = read_examples([write(tmp_path / "dev.tsv", "text\tlabel\na\tz\n")])
    with pytest.raises(TaskDataError, match=r"dev.tsv:2: label 'z' is not one of the training classes x, y"):
        encode_labels("multiclass", dev, label_classes("multiclass", train))


def test_jsonl_row_missing_a_field(tmp_path):
    f = write(tmp_path / "a.jsonl", '{"text": "a", "label": 1}\n{"text": "b"}\n')
    with pytest.raises(TaskDataError, match=r"a.jsonl:2: no field 'label'"):
        read_examples([f])


# -----------------------------------------------------------------------------------------------------
# micro-batches


def make_dataset(slots=1, n=50, batch_size=4, seed=3, augmenter=None):
    rng = np.random.default_rng(0)
    ids = [[2] + list(rng.integers(5, 40, rng.integers(1, 20))) + [3] for _ in range(n)]
    types = [[0] * len(x) for x in ids]
    return TaskDataset(ids, types, list(range(n)), batch_size, slots, seed, pad_id=0, label_dtype=torch.long,
                       augmenter=augmenter)


def test_micro_batch_is_a_pure_function_of_step_and_index():
    a, b = make_dataset(), make_dataset()
    for step in (0, 7, 3, 30, 7):                         # any order, a fresh object: the same batches
        x, y = a.micro_batch(step, 0), b.micro_batch(step, 0)
        assert all(torch.equal(x[k], y[k]) for k in ("input_ids", "attention_mask", "labels"))


def test_ranks_and_accumulation_see_the_same_stream():
    # 2 slots (2 ranks or 2 micro-batches): (step 1, index 1) is global micro-batch 3, as (step 3, index 0) with 1
    two, one = make_dataset(slots=2), make_dataset(slots=1)
    assert torch.equal(two.micro_batch(1, 1)["labels"], one.micro_batch(3, 0)["labels"])


def test_each_epoch_visits_every_example_once_in_a_new_order():
    data = make_dataset(n=50, batch_size=4)               # 13 batches, the last of 2
    epoch0 = torch.cat([data.micro_batch(s, 0)["labels"] for s in range(13)])
    epoch1 = torch.cat([data.micro_batch(s, 0)["labels"] for s in range(13, 26)])
    assert sorted(epoch0.tolist()) == sorted(epoch1.tolist()) == list(range(50))
    assert epoch0.tolist() != epoch1.tolist()
    assert sum(data.micro_batch(s, 0)["num_targets"] for s in range(13)) == 50


def test_batches_pad_to_their_longest_and_bucketing_cuts_padding():
    data = make_dataset(n=400, batch_size=8)
    batch = data.micro_batch(0, 0)
    assert batch["input_ids"].shape[1] == int(batch["attention_mask"].sum(1).max())
    assert batch["num_tokens"] == int(batch["attention_mask"].sum())
    padding = lambda d: sum(int((1 - d.micro_batch(s, 0)["attention_mask"]).sum()) for s in range(50))
    unbucketed = make_dataset(n=400, batch_size=8)
    unbucketed.bucket = 1                                 # batches straight from the permutation
    assert padding(data) < padding(unbucketed) / 2


def test_pad_batch_masks_padding():
    b = pad_batch([[2, 7, 3], [2, 3]], [[0, 0, 0], [0, 0]], pad_id=0)
    assert b["input_ids"].tolist() == [[2, 7, 3], [2, 3, 0]] and b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


# -----------------------------------------------------------------------------------------------------
# the augmentation hook (what it edits: tests/test_augment.py)


def test_augmented_micro_batches_stay_pure():
    """The hook gets the example's index and the batch's own generator, so batches are still (step, index)."""
    def reverse_some(i, rng):
        ids = make_dataset().ids[i]
        return (ids[:1] + ids[1:-1][::-1] + ids[-1:] if rng.random() < 0.5 else ids), [0] * len(ids)
    make = lambda: make_dataset(augmenter=reverse_some)
    assert torch.equal(make().micro_batch(4, 0)["input_ids"], make().micro_batch(4, 0)["input_ids"])
    assert not torch.equal(make().micro_batch(4, 0)["input_ids"], make_dataset().micro_batch(4, 0)["input_ids"])


# -----------------------------------------------------------------------------------------------------
# sentences and the built-in sample


def test_read_sentences_splits_lines_and_reads_xz(tmp_path):
    f = tmp_path / "wiki.txt.xz"
    f.write_bytes(lzma.compress("First one is here. Second one follows!\nshort\nThird line has four words\n".encode()))
    assert read_sentences([f]) == ["First one is here.", "Second one follows!", "Third line has four words"]
    tsv = write(tmp_path / "s.tsv", "sentence\tlabel\nsome words here\t1\nhi\t0\n")
    assert read_sentences([tsv]) == ["some words here"]


def test_sample_is_deterministic_balanced_and_distinct(tmp_path):
    rows = sample_binary(200)
    assert rows == sample_binary(200) and len({t for t, _ in rows}) == 200
    assert sum(y for _, y in rows) == 100
    train, dev = write_sample_binary(tmp_path, n_train=30, n_dev=10)
    assert len(read_examples([train])) == 30 and len(read_examples([dev])) == 10
    assert not set(read_examples([train]).texts) & set(read_examples([dev]).texts)


# -----------------------------------------------------------------------------------------------------
# prepare_glue: a local file:// archive stands in for the download


def fake_glue_zip(tmp_path):
    archive = tmp_path / "mirror" / "SST-2.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("SST-2/train.tsv", "sentence\tlabel\ngood \t1\n")
        z.writestr("SST-2/dev.tsv", "sentence\tlabel\nbad \t0\n")
        z.writestr("SST-2/test.tsv", "index\tsentence\n0\tok \n")
    return archive, hashlib.sha256(archive.read_bytes()).hexdigest()


def test_prepare_glue_downloads_verifies_and_unzips(tmp_path):
    archive, sha = fake_glue_zip(tmp_path)
    out = tmp_path / "glue"
    assert prepare_glue.main(["--task", "sst2", "--url", archive.as_uri(), "--sha256", sha, "--out", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in (out / "sst2").iterdir()) == ["dev.tsv", "test.tsv", "train.tsv"]
    assert read_examples([out / "sst2" / "train.tsv"]).texts == ["good"]
    assert not list(out.glob(".*tmp*"))                   # no leftovers


def test_prepare_glue_rejects_a_checksum_mismatch(tmp_path, capsys):
    archive, _ = fake_glue_zip(tmp_path)                  # not the official archive: the built-in hash fails
    assert prepare_glue.main(["--task", "sst2", "--url", archive.as_uri(), "--out", str(tmp_path / "glue"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checksum mismatch") and err.count("\n") == 1 and prepare_glue.ARCHIVES["sst2"][1] in err
    assert not (tmp_path / "glue" / "sst2").exists()


def test_prepare_glue_builds_mrpc_from_the_corpus_files(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    head = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
    write(mirror / "msr_paraphrase_train.txt", head + "1\t1\t2\tA.\tB.\n0\t3\t4\tC.\tD.\n1\t5\t6\tE.\tF.\n")
    write(mirror / "msr_paraphrase_test.txt", head + "1\t7\t8\tG.\tH.\n")
    write(mirror / "mrpc_dev_ids.tsv", "3\t4\n")
    for name, (url, _) in list(prepare_glue.MRPC_FILES.items()):
        monkeypatch.setitem(prepare_glue.MRPC_FILES, name, (url, hashlib.sha256((mirror / name).read_bytes()).hexdigest()))
    out = tmp_path / "glue"
    assert prepare_glue.main(["--task", "mrpc", "--url", mirror.as_uri(), "--out", str(out), "--quiet"]) == 0
    train, dev = read_examples([out / "mrpc" / "train.tsv"]), read_examples([out / "mrpc" / "dev.tsv"])
    assert train.texts == ["A.", "E."] and dev.texts == ["C."] and dev.pairs == ["D."]
    test = read_examples([out / "mrpc" / "test.tsv"], need_labels=False)
    assert test.labels is None and test.pairs == ["H."]
