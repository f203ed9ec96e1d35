"""learning_curve.py as a specification: nested subsets, the step budget, every row end to end on a tiny
model (random, pre-trained, + task-adaptive pre-training, another folder, bag-of-words), a table that is
the median of the seeds, a PNG and JSON, and finished runs reused."""
import json
import os
import pathlib
import shutil
import sys

import pytest
import torch

import learning_curve as lc
from conftest import run_process_group
from data.tasks import read_examples, write_sample_binary


def test_subsets_are_nested_and_fixed_by_the_shuffle_seed(tmp_path):
    train, _ = write_sample_binary(tmp_path / "data", n_train=200, n_dev=10)
    ex = read_examples([train])
    paths = lc.write_subsets(ex, [20, 50, 200], tmp_path / "a", shuffle_seed=0)
    rows = {n: paths[n].read_text().splitlines()[1:] for n in paths}
    assert len(rows[20]) == 20 and rows[50][:20] == rows[20] and rows[200][:50] == rows[50]
    assert sorted(rows[200]) == sorted(f"{t}\t{y}" for t, y in zip(ex.texts, ex.labels)), "all of it, once each"
    again = lc.write_subsets(ex, [50], tmp_path / "b", shuffle_seed=0)[50].read_text()
    other = lc.write_subsets(ex, [50], tmp_path / "c", shuffle_seed=1)[50].read_text()
    assert again == paths[50].read_text() and other != again
    # the same folder with another shuffle: the subset is rewritten, not reused by its name
    assert lc.write_subsets(ex, [50], tmp_path / "b", shuffle_seed=1)[50].read_text() == other


def test_fine_tune_steps_take_epochs_within_the_floor_and_the_cap():
    assert lc.fine_tune_steps(500, 32, 3, 300, 1000) == 300            # 47 steps of epochs: the floor
    assert lc.fine_tune_steps(4000, 32, 3, 300, 1000) == 375           # 3 epochs
    assert lc.fine_tune_steps(67349, 32, 3, 300, 1000) == 1000         # the CPU cap


def test_every_row_runs_end_to_end_and_the_table_is_the_median_of_the_seeds(tiny_init, tmp_path):
    train, dev = write_sample_binary(tmp_path / "data", n_train=120, n_dev=40)
    out = tmp_path / "curve"
    args = ["--train", str(train), "--dev", str(dev), "--pretrained", str(tiny_init),
            "--also", f"again={tiny_init}", "--sizes", "all", "--seeds", "2", "--min-steps", "4",
            "--max-steps", "4", "--tapt-steps", "3", "--tapt-seq-len", "16", "--out", str(out)]
    table = lc.main(args)
    assert set(table) == {"random", "pretrained", "pretrained + TAPT", "again", "bow"}
    saved = json.loads((out / "curve.json").read_text())
    assert saved["sizes"] == {"all": 120}
    for arm in ("random", "pretrained", "pretrained + TAPT", "again"):
        for size in ("all",):
            runs = saved["runs"][arm][size]
            assert sorted(r["seed"] for r in runs) == [1, 2] and all(r["steps"] == 4 for r in runs)
            accs = sorted(100 * r["accuracy"] for r in runs)
            assert table[arm][size]["median"] == pytest.approx((accs[0] + accs[1]) / 2)
    assert len(saved["runs"]["bow"]["all"]) == 1                     # convex: one run per size
    assert (out / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tapt = json.loads((out / "tapt" / "model" / "tapt.json").read_text())
    assert tapt["steps"] == 3 and (out / "tapt" / "shards" / "meta.json").is_file()
    # random init: a fresh draw per seed, with the pre-trained folder's architecture and tokenizer
    r1, r2 = (out / "random" / f"random_seed{s}" / "model.safetensors" for s in (1, 2))
    assert r1.read_bytes() != r2.read_bytes()
    assert (out / "random" / "random_seed1" / "vocab.txt").read_text() == (tiny_init / "vocab.txt").read_text()
    # finished runs are kept: collecting again runs nothing and gives the same table
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("metrics.json")}
    assert lc.main(args + ["--collect-only"]) == table
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("metrics.json")} == before


def test_the_prompt_row_fine_tunes_the_cloze_on_the_same_subsets_and_is_rerun_when_its_template_changes(
        tiny_init, tmp_path):
    train, dev = write_sample_binary(tmp_path / "data", n_train=60, n_dev=30)
    out = tmp_path / "curve"
    args = ["--train", str(train), "--dev", str(dev), "--pretrained", str(tiny_init), "--arms", "prompt",
            "--template", "{text} overall [MASK] .", "--verbalizer", "terrible,superb", "--sizes", "20", "all",
            "--seeds", "2", "--min-steps", "3", "--max-steps", "3", "--out", str(out)]
    table = lc.main(args)
    runs = json.loads((out / "curve.json").read_text())["runs"][lc.PROMPT]
    assert set(table) == {lc.PROMPT} and sorted(runs) == ["20", "all"]
    for size in ("20", "all"):
        assert [r["seed"] for r in runs[size]] == [1, 2] and all(r["steps"] == 3 for r in runs[size])
    one = out / "runs" / "pretrained_prompt" / "n20" / "seed1"
    metrics, settings = json.loads((one / "metrics.json").read_text()), json.loads((one / "run.json").read_text())
    assert metrics["train_examples"] == 20 and metrics["task"] == "prompt" and metrics["steps"] == 3
    assert json.loads((one / "labels.json").read_text())["template"] == "{text} overall [MASK] ."   # finetune.py's
    assert settings["verbalizer"] == "terrible,superb" and "pooling" not in settings
    # another template is another recipe: every prompt run again, none taken from the cache
    before = one.joinpath("metrics.json").stat().st_mtime_ns
    lc.main([("{text} honestly [MASK] ." if x == "{text} overall [MASK] ." else x) for x in args])
    assert json.loads((one / "run.json").read_text())["template"] == "{text} honestly [MASK] ."
    assert one.joinpath("metrics.json").stat().st_mtime_ns != before


def test_jobs_two_gives_the_runs_of_jobs_one(tiny_init, tmp_path):
    """--jobs 2: the same fine-tunes, two processes at a time, the same accuracies run for run."""
    train, dev = write_sample_binary(tmp_path / "data", n_train=60, n_dev=30)
    common = ["--train", str(train), "--dev", str(dev), "--pretrained", str(tiny_init), "--arms", "random",
              "--sizes", "all", "--seeds", "2", "--min-steps", "3", "--max-steps", "3"]
    runs = {}
    for jobs in (1, 2):
        lc.main(common + ["--jobs", str(jobs), "--out", str(tmp_path / f"jobs{jobs}")])
        runs[jobs] = json.loads((tmp_path / f"jobs{jobs}" / "curve.json").read_text())["runs"]
    assert runs[2] == runs[1] and [r["seed"] for r in runs[2]["random"]["all"]] == [1, 2]


def test_jobs_run_side_by_side_and_a_failure_keeps_the_runs_that_finished(tiny_init, tmp_path, monkeypatch):
    import threading
    import time
    train, dev = write_sample_binary(tmp_path / "data", n_train=60, n_dev=30)
    lock, running, peak, started = threading.Lock(), [0], [0], []

    def fake_fine_tune(init, subset, dev_files, seed, steps, lr, out, a, prompt=False, layer_decay=1.0, fail_seed=None):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
            started.append(seed)
        if seed == fail_seed:                       # at once, while the runs beside it are still going
            with lock:
                running[0] -= 1
            raise SystemExit(f"error: finetune.py ... failed (exit 1); the end of {out / 'log.txt'}")
        time.sleep(0.3)
        with lock:
            running[0] -= 1
        out.mkdir(parents=True, exist_ok=True)
        m = {"dev": {"accuracy": seed / 10}}
        (out / "metrics.json").write_text(json.dumps(m))
        return m

    common = ["--train", str(train), "--dev", str(dev), "--pretrained", str(tiny_init), "--arms", "pretrained",
              "--sizes", "all", "--seeds", "6", "--jobs", "3"]
    monkeypatch.setattr(lc, "fine_tune", fake_fine_tune)
    table = lc.main(common + ["--out", str(tmp_path / "ok")])
    assert peak[0] == 3 and sorted(started) == [1, 2, 3, 4, 5, 6]
    assert table["pretrained"]["all"]["runs"] == pytest.approx([10, 20, 30, 40, 50, 60])    # in seed order
    # seed 2 fails: the runs beside it finish and are kept, no run waits for a slot after it, the curve stops
    started.clear()
    monkeypatch.setattr(lc, "fine_tune", lambda *args, **kw: fake_fine_tune(*args, **kw, fail_seed=2))
    with pytest.raises(SystemExit, match="finetune.py ... failed"):
        lc.main(common + ["--out", str(tmp_path / "failed")])
    assert sorted(started) == [1, 2, 3]
    kept = json.loads((tmp_path / "failed" / "curve.json").read_text())["runs"]["pretrained"]["all"]
    assert [r["seed"] for r in kept] == [1, 3]


def test_a_finished_run_is_reused_only_when_its_fine_tuning_settings_match(tiny_init, tmp_path, monkeypatch,
                                                                          capsys):
    train, dev = write_sample_binary(tmp_path / "data", n_train=60, n_dev=30)
    calls = []

    def fake_fine_tune(init, subset, dev_files, seed, steps, lr, out, a, prompt=False, layer_decay=1.0):
        calls.append((seed, steps, lr))
        out.mkdir(parents=True, exist_ok=True)
        m = {"dev": {"accuracy": steps / 100}}
        (out / "metrics.json").write_text(json.dumps(m))
        return m
    monkeypatch.setattr(lc, "fine_tune", fake_fine_tune)
    common = ["--train", str(train), "--dev", str(dev), "--pretrained", str(tiny_init), "--arms", "pretrained",
              "--sizes", "all", "--seeds", "2", "--min-steps", "3", "--out", str(tmp_path / "curve")]
    lc.main(common + ["--max-steps", "3"])
    assert calls == [(1, 3, 1e-4), (2, 3, 1e-4)]
    lc.main(common + ["--max-steps", "3"])                      # the same recipe: nothing runs again
    assert len(calls) == 2
    table = lc.main(common + ["--max-steps", "5"])              # another step budget: both seeds run again
    assert calls[2:] == [(1, 5, 1e-4), (2, 5, 1e-4)] and table["pretrained"]["all"]["median"] == pytest.approx(5)
    assert "made with other fine-tuning settings (steps): run again" in capsys.readouterr().out
    # --collect-only never passes off a run of other settings as this recipe's: it is left out, and said so
    table = lc.main(common + ["--max-steps", "5", "--lr", "3e-4", "--collect-only"])
    assert len(calls) == 4 and not table.get("pretrained")
    assert "made with other fine-tuning settings (lr): left out" in capsys.readouterr().out


def test_a_run_whose_settings_file_is_torn_is_run_again_not_a_traceback(tiny_init, tmp_path, monkeypatch, capsys):
    """A curve killed while writing a run's run.json (by a version that wrote it in place) is picked up again:
    that one run is redone, the others are reused, and nothing half-written is left behind."""
    train, dev = write_sample_binary(tmp_path / "data", n_train=60, n_dev=30)
    calls = []

    def fake_fine_tune(init, subset, dev_files, seed, steps, lr, out, a, prompt=False, layer_decay=1.0):
        calls.append(seed)
        out.mkdir(parents=True, exist_ok=True)
        m = {"dev": {"accuracy": 0.5 + seed / 10}}
        (out / "metrics.json").write_text(json.dumps(m))
        return m
    monkeypatch.setattr(lc, "fine_tune", fake_fine_tune)
    args = ["--train", str(train), "--dev", str(dev), "--pretrained", str(tiny_init), "--arms", "pretrained",
            "--sizes", "all", "--seeds", "2", "--min-steps", "3", "--max-steps", "3", "--out", str(tmp_path / "curve")]
    lc.main(args)
    seed1 = tmp_path / "curve" / "runs" / "pretrained" / "n60" / "seed1"
    (seed1 / "run.json").write_text('{"init": "')                 # torn mid-write
    capsys.readouterr()
    table = lc.main(args)
    assert calls == [1, 2, 1]                                        # seed 1 again, seed 2 reused
    assert f"{seed1}: its settings (run.json) are missing or unreadable: run again" in capsys.readouterr().out
    assert table["pretrained"]["all"]["median"] == pytest.approx(65.0)
    assert lc.saved_settings(seed1 / "run.json")["seed"] == 1
    assert not list((tmp_path / "curve").rglob("*.tmp.*"))
    assert json.loads((tmp_path / "curve" / "curve.json").read_text())["table"] == table


def test_a_sweep_reports_each_arms_best_recipe_and_what_it_picked(tiny_init, tmp_path, monkeypatch, capsys):
    """Several --lr and --min-steps: every arm runs every recipe, each cell is the arm's best median, and the
    table says which recipe that was. Here a long fine-tune suits the pre-trained arm and hurts random init."""
    train, dev = write_sample_binary(tmp_path / "data", n_train=60, n_dev=30)
    calls = []

    def fake_fine_tune(init, subset, dev_files, seed, steps, lr, out, a, prompt=False, layer_decay=1.0):
        calls.append((pathlib.Path(init).name, seed, steps, lr))
        pretrained = pathlib.Path(init) == tiny_init
        acc = steps / 100 + lr * 100 if pretrained else (10 - steps) / 100 + seed / 1000
        out.mkdir(parents=True, exist_ok=True)
        m = {"dev": {"accuracy": acc}}
        (out / "metrics.json").write_text(json.dumps(m))
        return m
    monkeypatch.setattr(lc, "fine_tune", fake_fine_tune)
    # 60 examples, 1 epoch: 2 steps, so --min-steps 1, 2 and 6 give budgets of 2, 2 and 6 (2 runs once)
    args = ["--train", str(train), "--dev", str(dev), "--pretrained", str(tiny_init), "--arms", "random,pretrained",
            "--sizes", "all", "--seeds", "2", "--epochs", "1", "--min-steps", "1", "2", "6", "--max-steps", "6",
            "--lr", "1e-4", "3e-4", "--out", str(tmp_path / "curve")]
    table = lc.main(args)
    assert len(calls) == 2 * 2 * 2 * 2                             # arms x seeds x lrs x budgets
    pre, rnd = table["pretrained"]["all"], table["random"]["all"]
    assert (pre["lr"], pre["steps"]) == (3e-4, 6) and pre["median"] == pytest.approx(6 + 3)
    assert (rnd["lr"], rnd["steps"]) == (1e-4, 2) and rnd["median"] == pytest.approx(8.15)   # a tie: the first lr
    assert sorted((c["lr"], c["steps"]) for c in pre["candidates"]) == [(1e-4, 2), (1e-4, 6), (3e-4, 2), (3e-4, 6)]
    assert (tmp_path / "curve" / "runs" / "pretrained" / "n60" / "lr0.0003-steps6" / "seed2" / "run.json").is_file()
    out = capsys.readouterr().out
    assert "the fine-tuning each cell picked" in out and "0.0003 / 6" in out and "0.0001 / 2" in out
    assert lc.main(args) == table and len(calls) == 16              # every recipe's runs are reused


def test_a_curve_widened_into_a_sweep_runs_only_the_recipes_it_adds(tiny_init, tmp_path, monkeypatch):
    """The runs of a one-recipe curve are reused by a sweep over the same --out (and the other way round), each
    only where its settings match: the sweep runs the new learning rate alone and its table holds both."""
    train, dev = write_sample_binary(tmp_path / "data", n_train=60, n_dev=30)
    calls = []

    def fake_fine_tune(init, subset, dev_files, seed, steps, lr, out, a, prompt=False, layer_decay=1.0):
        calls.append((seed, lr))
        out.mkdir(parents=True, exist_ok=True)
        m = {"dev": {"accuracy": lr * 1000 + seed / 100}}
        (out / "metrics.json").write_text(json.dumps(m))
        return m
    monkeypatch.setattr(lc, "fine_tune", fake_fine_tune)
    base = ["--train", str(train), "--dev", str(dev), "--pretrained", str(tiny_init), "--arms", "pretrained",
            "--sizes", "all", "--seeds", "2", "--epochs", "1", "--min-steps", "2", "--max-steps", "2",
            "--out", str(tmp_path / "curve")]
    one = lc.main(base + ["--lr", "3e-4"])
    assert sorted(calls) == [(1, 3e-4), (2, 3e-4)]
    sweep = lc.main(base + ["--lr", "1e-4", "3e-4"])
    assert sorted(calls) == [(1, 1e-4), (1, 3e-4), (2, 1e-4), (2, 3e-4)]        # only lr 1e-4 ran
    assert sorted(c["lr"] for c in sweep["pretrained"]["all"]["candidates"]) == [1e-4, 3e-4]
    assert sweep["pretrained"]["all"]["median"] == one["pretrained"]["all"]["median"]
    assert lc.main(base + ["--lr", "1e-4"])["pretrained"]["all"]["median"] == pytest.approx(100 * (0.1 + 0.015))
    assert len(calls) == 4                                                       # and back: nothing runs
    lc.main(base + ["--lr", "3e-4", "--dropout", "0"])                           # another recipe matches neither
    assert len(calls) == 6



def test_a_layer_decay_sweep_runs_finetune_with_it_and_reuses_the_runs_made_without_it(tiny_init, tmp_path,
                                                                                      monkeypatch, capsys):
    """--layer-decay 1 0.8 over the --out of a curve made without it: only the 0.8 runs are made, each as a
    finetune.py --layer-decay 0.8 run in a folder of its own; the table picks per arm and says which decay."""
    train, dev = write_sample_binary(tmp_path / "data", n_train=60, n_dev=30)
    commands = []

    def fake_run_logged(cmd, out, result, threads=None):     # finetune.py as the curve calls it, not run
        commands.append(cmd)
        decay = float(cmd[cmd.index("--layer-decay") + 1]) if "--layer-decay" in cmd else 1.0
        pretrained = pathlib.Path(cmd[cmd.index("--init") + 1]) == tiny_init
        m = {"dev": {"accuracy": (1.5 - decay if pretrained else decay / 2) + int(cmd[cmd.index("--seed") + 1]) / 100}}
        out.mkdir(parents=True, exist_ok=True)
        (out / "metrics.json").write_text(json.dumps(m))
        return m
    monkeypatch.setattr(lc, "run_logged", fake_run_logged)
    base = ["--train", str(train), "--dev", str(dev), "--pretrained", str(tiny_init), "--arms", "random,pretrained",
            "--sizes", "all", "--seeds", "2", "--epochs", "1", "--min-steps", "2", "--max-steps", "2",
            "--out", str(tmp_path / "curve")]
    lc.main(base)
    assert len(commands) == 4 and not any("--layer-decay" in c for c in commands)
    table = lc.main(base + ["--layer-decay", "1", "0.8"])
    assert len(commands) == 8, "the runs without a decay are reused; only the 0.8 ones run"
    assert all(c[c.index("--layer-decay") + 1] == "0.8" for c in commands[4:])
    pre, rnd = table["pretrained"]["all"], table["random"]["all"]
    assert pre["layer_decay"] == 0.8 and pre["median"] == pytest.approx(100 * (0.7 + 0.015))
    assert rnd["layer_decay"] == 1.0 and rnd["median"] == pytest.approx(100 * (0.5 + 0.015))
    assert sorted(c["layer_decay"] for c in pre["candidates"]) == [0.8, 1.0]
    runs = tmp_path / "curve" / "runs" / "pretrained" / "n60"
    assert lc.saved_settings(runs / "lr0.0001-steps2-decay0.8" / "seed1" / "run.json")["layer_decay"] == 0.8
    assert "layer_decay" not in lc.saved_settings(runs / "seed1" / "run.json")   # the curve's first runs, as made
    out = capsys.readouterr().out
    assert "lr / steps / layer decay" in out and "0.0001 / 2 / 0.8" in out and "0.0001 / 2 / 1" in out
    saved = json.loads((tmp_path / "curve" / "curve.json").read_text())["runs"]["pretrained"]["all"]
    assert sorted(r.get("layer_decay", 1.0) for r in saved) == [0.8, 0.8, 1.0, 1.0]
    assert lc.main(base + ["--layer-decay", "1", "0.8"]) == table and len(commands) == 8    # all reused

def test_bad_arguments_are_one_line_each(tiny_init, tmp_path, capsys):
    train, dev = write_sample_binary(tmp_path / "data", n_train=20, n_dev=10)
    for argv, expected in ((["--arms", "random"], "--pretrained DIR is needed"),
                           (["--pretrained", str(tmp_path)], "no config.json"),
                           (["--arms", "bow,magic"], "unknown magic"),
                           (["--arms", "bow", "--sizes", "ten"], "neither a positive count"),
                           (["--arms", "bow", "--min-steps", "300", "0"], "--min-steps 0: must be at least 1"),
                           (["--arms", "bow", "--lr", "3e-4", "0"], "--lr 0.0: must be positive"),
                           (["--arms", "bow", "--layer-decay", "1", "1.5"], "--layer-decay 1.5: expected a factor in (0, 1]"),
                           (["--arms", "prompt", "--pretrained", str(tiny_init), "--template", "{text} no blank"],
                            "--template '{text} no blank': expected {text} once and [MASK] once")):
        with pytest.raises(SystemExit) as e:
            lc.parse_args(["--train", str(train), "--dev", str(dev), *argv])
        assert e.value.code == 2 and expected in capsys.readouterr().err


def test_a_cached_tapt_model_is_reused_only_when_every_tapt_setting_matches(tiny_init, tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, out, result):             # stands in for prepare.py / pretrain.py
        calls.append(pathlib.Path(cmd[1]).name)
        result.parent.mkdir(parents=True, exist_ok=True)
        result.write_text("{}")
        out.mkdir(parents=True, exist_ok=True)
        (out / "checkpoint.pt").write_text("")
        return {}
    monkeypatch.setattr(lc, "run_logged", fake_run)
    a = lc.parse_args(["--train", "t.tsv", "--dev", "d.tsv", "--arms", "bow", "--tapt-steps", "5"])
    texts = [f"sentence {i}" for i in range(60)]
    init = tmp_path / "init"
    shutil.copytree(tiny_init, init)
    lc.task_adaptive_pretraining(str(init), texts, tmp_path, a)
    assert calls == ["prepare.py", "pretrain.py"]
    lc.task_adaptive_pretraining(str(init), texts, tmp_path, a)         # same settings: reused
    assert calls == ["prepare.py", "pretrain.py"]
    a.tapt_lr *= 2                                                      # another learning rate: redone
    lc.task_adaptive_pretraining(str(init), texts, tmp_path, a)
    assert calls == ["prepare.py", "pretrain.py"] * 2
    save_new_weights(init, seed=7)                                      # the folder pre-trained again: redone
    lc.task_adaptive_pretraining(str(init), texts, tmp_path, a)
    assert calls == ["prepare.py", "pretrain.py"] * 3


def save_new_weights(folder, seed, **config):
    """Overwrite a BERT folder with other weights (a checkpoint trained on, or another shape given **config)."""
    from model import EncoderConfig, LanguageModel, from_hf_bert, save_hf_bert
    from tokenizer import load_tokenizer
    torch.manual_seed(seed)
    cfg = from_hf_bert(str(folder), head=None).config.to_dict()
    save_hf_bert(LanguageModel(EncoderConfig.from_dict({**cfg, **config})), str(folder), load_tokenizer(folder))


def test_runs_are_matched_on_the_weights_they_start_from_not_on_the_folders_name(tiny_init, tmp_path, monkeypatch,
                                                                                capsys):
    """A folder pre-trained again under the same name has its rows run again; another checkpoint of the same
    architecture reuses the random rows (the same draws); another architecture draws its random weights again."""
    train, dev = write_sample_binary(tmp_path / "data", n_train=60, n_dev=30)
    calls = []

    def fake_fine_tune(init, subset, dev_files, seed, steps, lr, out, a, prompt=False, layer_decay=1.0):
        calls.append(out.parent.parent.name)
        out.mkdir(parents=True, exist_ok=True)
        m = {"dev": {"accuracy": 0.5}}
        (out / "metrics.json").write_text(json.dumps(m))
        return m
    monkeypatch.setattr(lc, "fine_tune", fake_fine_tune)
    ckpt, later = tmp_path / "ckpt", tmp_path / "later"
    shutil.copytree(tiny_init, ckpt)
    curve = lambda folder: lc.main(["--train", str(train), "--dev", str(dev), "--pretrained", str(folder),
                                    "--arms", "random,pretrained", "--sizes", "all", "--seeds", "1", "--min-steps", "3",
                                    "--max-steps", "3", "--out", str(tmp_path / "curve")])
    curve(ckpt)
    assert calls == ["random", "pretrained"]
    curve(ckpt)                                                       # nothing changed: nothing runs
    assert calls == ["random", "pretrained"]
    save_new_weights(ckpt, seed=7)                                    # pre-trained again, same name
    capsys.readouterr()
    curve(ckpt)
    assert calls[2:] == ["pretrained"]
    assert "made with other fine-tuning settings (starting weights): run again" in capsys.readouterr().out
    shutil.copytree(ckpt, later)
    save_new_weights(later, seed=8)                                   # another checkpoint of this architecture
    curve(later)
    assert calls[3:] == ["pretrained"]
    random_copy = tmp_path / "curve" / "random" / "random_seed1"
    before = (random_copy / "model.safetensors").read_bytes()
    save_new_weights(later, seed=8, hidden_size=48, intermediate_size=96)   # another architecture
    curve(later)
    assert calls[4:] == ["random", "pretrained"]
    assert json.loads((random_copy / "config.json").read_text())["hidden_size"] == 48
    assert (random_copy / "model.safetensors").read_bytes() != before


def script_at_tiny_size(name, tmp_path, out, **settings):
    """A runner of scripts/NAME at a tiny size: 60 one-document files of the sample's sentences as the raw
    text, a 120-piece vocabulary, tiny at 4 x 32 tokens, the sample task, one seed of 3 steps at size 40."""
    from data.tasks import sample_binary
    root = pathlib.Path(__file__).resolve().parents[1]
    (tmp_path / "text").mkdir()
    for k in range(60):
        (tmp_path / "text" / f"r{k}.txt").write_text(" ".join(t for t, _ in sample_binary(40, seed=k)))
    train, dev = write_sample_binary(tmp_path / "task", n_train=80, n_dev=40)
    env = dict(os.environ, TEXT=str(tmp_path / "text"), HELDOUT="", DATA=str(tmp_path / "shards"), VOCAB="120",
               MODEL="tiny", BATCH="4", SEQ_LEN="32", TRAIN=str(train), DEV=str(dev), SIZES="40", SEEDS="1",
               FT_MIN_STEPS="3", FT_MAX_STEPS="3", **settings)

    def run():
        done = run_process_group(["bash", str(root / "scripts" / name), str(out)], 600, env=env, cwd=tmp_path)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return done.stdout
    return run


def test_the_transfer_script_runs_every_stage_and_a_second_run_trains_nothing_again(tmp_path):
    """scripts/transfer_curve.sh, issue #10's pipeline in one command, at a tiny size: shards, word vectors,
    two masked-LM cycles on the frozen table, the learning curve. A cycle stopped after its checkpoint resumes
    it; a finished stage is skipped."""
    from model import from_hf_bert
    out = tmp_path / "out"
    run = script_at_tiny_size("transfer_curve.sh", tmp_path, out, STEPS1="3", STEPS2="2")

    first = run()
    assert "word vectors" in first and "masked LM" in first
    curve = json.loads((out / "curve" / "curve.json").read_text())
    assert set(curve["runs"]) == {"random", "pretrained", "word-vectors", "bow"}
    assert all(len(curve["runs"][arm]["40"]) == 1 for arm in ("random", "pretrained", "word-vectors"))
    steps = [json.loads(line)["step"] for line in (out / "mlm-2" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 2
    wv, mlm = (from_hf_bert(str(out / name), head=None) for name in ("wv", "mlm-2"))
    assert torch.equal(wv.embed.tok.weight, mlm.embed.tok.weight), "the masked LM ran on the frozen word vectors"
    assert not torch.equal(wv.blocks[0].ffn.fc1.weight, mlm.blocks[0].ffn.fc1.weight), "its layers learnt"
    # again: every stage is done, nothing is trained twice; a cycle without its marker resumes its checkpoint
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors")}
    (out / "mlm-2.done").unlink()
    second = run()
    assert "word vectors" not in second
    assert [line.split(" ", 2)[2] for line in second.splitlines() if "masked LM" in line] == \
        [f"masked LM {out / 'mlm-2'}: resuming its checkpoint"]
    assert "resumed from" in (out / "mlm-2.log").read_text()
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.safetensors") if "mlm-2" not in str(p)} == \
        {p: t for p, t in stamps.items() if "mlm-2" not in str(p)}


def test_the_gpu_script_sizes_the_run_to_its_minutes_and_a_second_run_trains_nothing_again(tmp_path):
    """scripts/gpu_transfer.sh at a tiny size on the CPU: shards, a 60-step trial, a masked-LM run whose step
    count comes from the trial's speed and MINUTES, then random / pretrained / + TAPT / prompt / bag-of-words."""
    out = tmp_path / "out"
    run = script_at_tiny_size("gpu_transfer.sh", tmp_path, out, MINUTES="0.1", AMP="none", JOBS="2", TAPT_STEPS="2",
                              TAPT_SEQ_LEN="16", TEMPLATE="{text} [MASK]", VERBALIZER="a,i")   # words of 120 pieces

    first = run()
    planned = int(first.split("minutes at the trial's speed: ")[1].split(" steps")[0])
    speed = [json.loads(line) for line in (out / "trial" / "metrics.jsonl").read_text().splitlines()
             if "tokens_per_s" in line][-1]["tokens_per_s"]
    assert planned == max(10, int(0.88 * 0.1 * 60 * speed / (4 * 32)))
    steps = [json.loads(line)["step"] for line in (out / "mlm" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == planned, "the run takes the planned steps, its decay ending there"
    curve = json.loads((out / "curve" / "curve.json").read_text())
    assert set(curve["runs"]) == {"random", "pretrained", "pretrained + TAPT", "pretrained, prompt", "bow"}
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.json*")}
    second = run()
    assert "trial" not in second and {p: p.stat().st_mtime_ns for p in out.rglob("*.json*")
                                      if "curve.json" not in p.name} == \
        {p: t for p, t in stamps.items() if "curve.json" not in p.name}


def test_jobs_share_the_cores_between_them_unless_omp_num_threads_is_set(tmp_path, monkeypatch):
    """N fine-tunes side by side on a CPU: each gets cores / N threads (at least one), not every core."""
    assert lc.threads_per_job(2, {}, 2) == "1" and lc.threads_per_job(3, {}, 16) == "5"
    assert lc.threads_per_job(4, {}, 2) == "1"
    assert lc.threads_per_job(1, {}, 16) is None                          # one job: torch's own choice
    assert lc.threads_per_job(2, {"OMP_NUM_THREADS": "4"}, 16) is None    # the caller's choice stands
    # the subprocess sees it; the calling process's environment is left as it was
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    result = tmp_path / "env.json"
    child = ("import json, os, sys; json.dump({'threads': os.environ.get('OMP_NUM_THREADS')}, "
             "open(sys.argv[1], 'w'))")
    assert lc.run_logged([sys.executable, "-c", child, str(result)], tmp_path, result, threads="3") == {"threads": "3"}
    assert "OMP_NUM_THREADS" not in os.environ


def test_a_verbalizer_that_does_not_fit_the_classes_is_refused_before_any_run(tiny_init, tmp_path, capsys):
    train, dev = write_sample_binary(tmp_path / "data", n_train=20, n_dev=10)
    with pytest.raises(SystemExit) as e:
        lc.main(["--train", str(train), "--dev", str(dev), "--pretrained", str(tiny_init), "--arms", "bow,prompt",
                 "--verbalizer", "bad,fine,great", "--out", str(tmp_path / "curve")])
    assert "--verbalizer 'bad,fine,great' has 3 words" in str(e.value) and "2 classes" in str(e.value)
    with pytest.raises(SystemExit, match="'dull film' is 2 tokens"):
        lc.main(["--train", str(train), "--dev", str(dev), "--pretrained", str(tiny_init), "--arms", "bow,prompt",
                 "--verbalizer", "dull film,superb", "--out", str(tmp_path / "curve")])
    assert not (tmp_path / "curve").exists(), "refused before a subset, a bag-of-words or a prompt run is written"
