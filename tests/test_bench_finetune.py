"""bench_finetune.py, the reproducible comparison of issue #16, as a specification: both arms train on the
same fixed nested subsets, every seed's score is kept and the table is their median and spread, "ours" is
judged on its last weights (the dev-selected score beside it), and an interrupted table only runs what is
missing. The figures themselves are in the README (no wall-clock or accuracy thresholds here)."""
import json
import statistics

import pytest

import bench_finetune
from data.tasks import write_sample_binary
# tiny_init: a fixture of conftest.py (a BERT-layout folder with a vocab.txt that transformers reads)


def test_bench_runs_both_arms_on_nested_subsets_and_reports_every_seed(tiny_init, tmp_path, monkeypatch):
    train, dev = write_sample_binary(tmp_path / "data", n_train=96, n_dev=24)
    out = tmp_path / "bench"
    argv = ["--train", str(train), "--dev", str(dev), "--init", str(tiny_init), "--sizes", "32", "64",
            "--epochs", "1", "--seeds", "2", "--out", str(out)]
    bench_finetune.main(argv)

    small = (out / "data" / "train_32.tsv").read_text().splitlines()
    big = (out / "data" / "train_64.tsv").read_text().splitlines()
    assert len(small) == 33 and len(big) == 65 and big[:33] == small          # a header, then nested rows
    table = json.loads((out / "bench.json").read_text())["table"]
    assert set(table) == {f"{arm} {n}" for arm in ("hf", "ours", "ours*") for n in (32, 64)}
    for n in (32, 64):
        hf = [json.loads((out / "runs" / "hf" / str(n) / f"seed{s}" / "result.json").read_text()) for s in (1, 2)]
        ours = [json.loads((out / "runs" / "ours" / str(n) / f"seed{s}" / "result.json").read_text()) for s in (1, 2)]
        assert [r["steps"] for r in hf] == [n // 32] * 2                          # 1 epoch of batch 32
        assert [r["recipe"]["max_steps"] for r in ours] == [n // 16] * 2          # ours: of 16, a small set's
        assert [r["recipe"]["lr"] for r in ours] == [1e-3] * 2                  # the recipe's, not a flag
        assert table[f"hf {n}"]["runs"] == [100 * r["dev"]["accuracy"] for r in hf]
        assert table[f"ours {n}"]["runs"] == [100 * r["dev_last"]["accuracy"] for r in ours]   # unselected
        assert table[f"ours* {n}"]["runs"] == [100 * r["dev"]["accuracy"] for r in ours]       # selected on dev
        for arm in ("hf", "ours", "ours*"):
            row = table[f"{arm} {n}"]
            assert row["median"] == statistics.median(row["runs"])
            assert (row["min"], row["max"]) == (min(row["runs"]), max(row["runs"]))

    # a second call (an interrupted table resumed) reuses every finished run and trains nothing
    fail = lambda *a, **k: pytest.fail("a finished run was trained again")
    monkeypatch.setattr(bench_finetune, "hf_loop", fail)
    monkeypatch.setattr(bench_finetune, "ours", fail)
    bench_finetune.main(argv)
    assert json.loads((out / "bench.json").read_text())["table"] == table


def test_subsets_of_sentence_pairs_keep_the_second_sentence(tmp_path):
    from data.tasks import read_examples
    from learning_curve import write_subsets
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("sentence1\tsentence2\tlabel\n" + "".join(f"a{i} x\tb{i} y\t{i % 2}\n" for i in range(10)))
    full = read_examples([pairs])
    sub = read_examples([write_subsets(full, [4], tmp_path / "subsets", shuffle_seed=0)[4]])
    rows = {(t, p, y) for t, p, y in zip(full.texts, full.pairs, full.labels)}
    assert len(sub.texts) == 4 and {(t, p, y) for t, p, y in zip(sub.texts, sub.pairs, sub.labels)} <= rows
