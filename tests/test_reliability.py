"""Faults survived and bad inputs refused (issue 11), as a specification: a fine-tuned folder loads exactly
or not at all; a pre-empted run exports nothing and exits 75; --resume continues only the same run; a dead
rank, a torn log line, a full disk, an unusable --out, bad task files and bad meta.json are one clear line.
docs/reliability.md lists each fault with the command that tries it."""
import errno
import json
import multiprocessing
import os
import shutil
import socket
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import finetune
import model as M
import pretrain
import trainer
from data.tasks import TaskDataError, label_classes, read_examples
from finetuned import load_finetuned
from test_finetune import FAST, binary_data  # noqa: F401  (a fixture; tiny_init comes from conftest.py)


def finetune_main(init, train, out, *args):
    return finetune.main(["--init", str(init), "--train", str(train), "--out", str(out), *FAST, "--eval-every", "0",
                          *args])


def one_line_error(capsys):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# -----------------------------------------------------------------------------------------------------
# loading a fine-tuned folder is strict (High 2)


@pytest.fixture(scope="module")
def finetuned_dir(tiny_init, tmp_path_factory):
    from data.tasks import write_sample_binary
    tmp = tmp_path_factory.mktemp("ft")
    train, _ = write_sample_binary(tmp / "data", n_train=32, n_dev=8)
    assert finetune.main(["--init", str(tiny_init), "--train", str(train), "--out", str(tmp / "out"), *FAST,
                          "--max-steps", "2", "--eval-every", "0"]) == 0
    return tmp / "out"


def spoil(weights):
    """Each way a fine-tuned folder's weights can be wrong, and what the error must name."""
    C = weights["bert.pooler.dense.weight"].shape[0]
    return {
        "no classifier": ({k: v for k, v in weights.items() if not k.startswith("classifier.")}, "classifier.weight"),
        "no pooler": ({k: v for k, v in weights.items() if not k.startswith("bert.pooler.")}, "pooler.dense.weight"),
        "wrong-shaped classifier": ({**weights, "classifier.weight": torch.zeros(3, C)}, "classifier.weight has shape (3,"),
        "extra tensor": ({**weights, "cls.predictions.bias": torch.zeros(5)}, "unexpected keys in the checkpoint: "
                                                                             "cls.predictions.bias"),
        "int tensor": ({**weights, "bert.pooler.dense.weight": torch.zeros(C, C, dtype=torch.int64)},
                       ": pooler.dense.weight has dtype int64, expected a float tensor"),
        "nan weight": ({**weights, "bert.encoder.layer.1.output.dense.weight":
                        weights["bert.encoder.layer.1.output.dense.weight"].clone().index_fill_(0, torch.tensor([0]),
                                                                                                 float("nan"))},
                       ": encoder.layer.1.output.dense.weight holds non-finite values"),
        "misshapen key part": ({**weights, "bert.encoder.layer.0.attention.self.key.weight": torch.zeros(C + 1, C)},
                               f"encoder.layer.0.attention.self.key.weight has shape ({C + 1}, {C})"),
        "missing value part": ({k: v for k, v in weights.items() if "layer.0.attention.self.value.bias" not in k},
                               "lacks encoder.layer.0.attention.self.value.bias"),
    }


@pytest.mark.parametrize("case", ["no classifier", "no pooler", "wrong-shaped classifier", "extra tensor",
                                  "int tensor", "nan weight", "misshapen key part", "missing value part"])
def test_a_spoiled_fine_tuned_folder_is_one_checkpoint_error_naming_folder_and_tensor(finetuned_dir, tmp_path, case):
    folder = tmp_path / "spoiled"
    shutil.copytree(finetuned_dir, folder)
    weights, expected = spoil(load_file(finetuned_dir / "model.safetensors"))[case]
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(M.CheckpointError) as err:
        load_finetuned(folder)
    assert str(folder) in str(err.value) and expected in str(err.value) and "\n" not in str(err.value)


def test_the_intact_folder_loads_and_predict_cli_refuses_a_spoiled_one_in_one_line(finetuned_dir, tmp_path, capsys):
    model, _, info = load_finetuned(finetuned_dir)
    stored = load_file(finetuned_dir / "model.safetensors")["classifier.weight"]     # (2, C): [0, z] for transformers
    assert info["task"] == "binary" and torch.equal(model.classifier.weight, stored[1:] - stored[:1])
    folder = tmp_path / "spoiled"
    shutil.copytree(finetuned_dir, folder)
    save_file(spoil(load_file(finetuned_dir / "model.safetensors"))["no classifier"][0], folder / "model.safetensors")
    import predict
    with pytest.raises(SystemExit) as code:
        predict.main([str(folder), "a fine film"])
    assert code.value.code == 2 and "classifier.weight" in one_line_error(capsys)


def test_only_init_of_a_pretrained_encoder_creates_a_fresh_head(tiny_init):
    """tiny_init has no pooler or classifier: --init (not strict) starts them afresh; strict refuses."""
    assert isinstance(M.from_hf_bert(str(tiny_init), head="classifier", num_labels=3), M.SequenceClassifier)
    with pytest.raises(M.CheckpointError, match="lacks pooler.dense.weight"):
        M.from_hf_bert(str(tiny_init), head="classifier", num_labels=3, strict=True)


def test_labels_json_without_a_known_task_is_an_error(finetuned_dir, tmp_path):
    folder = tmp_path / "f"
    shutil.copytree(finetuned_dir, folder)
    (folder / "labels.json").write_text("{}")
    with pytest.raises(ValueError, match="labels.json: expected a 'task'"):
        load_finetuned(folder)


# -----------------------------------------------------------------------------------------------------
# pre-emption exports nothing and exits 75; --resume finishes (High 3)


def weights_of(out):
    return torch.load(out / "checkpoint.pt", weights_only=True)["model"]


def test_preempted_finetune_exports_nothing_exits_75_and_resume_finishes_exactly(tiny_init, binary_data, tmp_path):
    train, dev = binary_data
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = ("--max-steps", "4", "--dev", str(dev))
    assert finetune_main(tiny_init, train, straight, *common) == 0
    assert finetune_main(tiny_init, train, split, *common, "--stop-at-step", "2") == trainer.EX_TEMPFAIL
    assert (split / "checkpoint.pt").is_file()
    for name in ("model.safetensors", "labels.json", "metrics.json", "predictions.tsv"):
        assert not (split / name).exists(), f"a pre-empted run wrote {name}"
    assert torch.load(split / "checkpoint.pt", weights_only=True)["step"] == 2
    assert finetune_main(tiny_init, train, split, *common, "--resume") == 0
    assert json.loads((split / "metrics.json").read_text())["steps"] == 4
    a, b = weights_of(straight), weights_of(split)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the straight run's"


# -----------------------------------------------------------------------------------------------------
# --resume continues only the same run (High 4)


def test_resume_differences_name_each_setting_and_max_steps_may_only_grow_when_allowed():
    saved = {"lr": 1e-3, "seed": 1, "max_steps": 10, "task": "binary"}
    assert trainer.resume_differences(saved, dict(saved), 5, set()) == []
    assert trainer.resume_differences(saved, {**saved, "lr": 2e-3, "seed": 2}, 5, set()) == [
        "lr (saved: 0.001, now: 0.002)", "seed (saved: 1, now: 2)"]
    assert trainer.resume_differences(saved, {**saved, "max_steps": 20}, 5, set()) == [
        "max_steps (saved: 10, now: 20)"]
    assert trainer.resume_differences(saved, {**saved, "max_steps": 20}, 5, {"max_steps"}) == []
    assert trainer.resume_differences(saved, {**saved, "max_steps": 3}, 5, {"max_steps"}) == [
        "max_steps 3 is below the step already reached (5)"]
    assert trainer.resume_differences({}, saved, 5, set()) == [], "an older checkpoint records nothing to compare"


@pytest.fixture
def stopped_run(tiny_init, binary_data, tmp_path):
    train, _ = binary_data
    out = tmp_path / "run"
    assert finetune_main(tiny_init, train, out, "--max-steps", "4", "--stop-at-step", "2") == trainer.EX_TEMPFAIL
    return train, out


@pytest.mark.parametrize("change, expected", [
    (["--lr", "1e-2"], "lr (saved: 0.001, now: 0.01)"),
    (["--batch-size", "4"], "batch_size (saved: 8, now: 4)"),
    (["--grad-accum", "2"], "grad_accum (saved: 1, now: 2)"),
    (["--seed", "7"], "seed (saved: 1337, now: 7)"),
    (["--schedule", "cosine"], "schedule (saved: 'linear', now: 'cosine')"),
    (["--warmup", "0"], "warmup (saved: 0.06, now: 0.0)"),
    (["--method", "lora"], "method (saved: 'full', now: 'lora')"),
    (["--task", "multiclass"], "task (saved: 'binary', now: 'multiclass')"),
    (["--max-steps", "1"], "max_steps 1 is below the step already reached (2)"),
    (["--max-steps", "8"], "max_steps (saved: 4, now: 8)"),
    (["--train", "OTHER"], "train_data (saved: ["),
    (["--init", "OTHER_INIT"], "init (saved: "),
    (["--allow-changed", "colour"], "--allow-changed: unknown setting 'colour'"),
])
def test_resume_of_another_run_is_refused_in_one_line_naming_what_differs(stopped_run, tiny_init, tmp_path, capsys,
                                                                           change, expected):
    train, out = stopped_run
    before = (out / "checkpoint.pt").read_bytes()
    if "OTHER" in change:
        other = tmp_path / "other.tsv"
        other.write_text(train.read_text() + "one more fine film\t1\n")
        change = ["--train", str(other)]
    init = tiny_init
    if "OTHER_INIT" in change:
        init = tmp_path / "init_copy"
        shutil.copytree(tiny_init, init)
        change = []
    args = ["--max-steps", "4", *change]
    argv = ["--init", str(init), "--out", str(out), *FAST, "--eval-every", "0", "--resume", *args]
    if "--train" not in change:
        argv += ["--train", str(train)]
    assert finetune.main(argv) == 2
    err = one_line_error(capsys)
    assert expected in err and (str(out / "checkpoint.pt") in err or "--allow-changed" in change)
    assert (out / "checkpoint.pt").read_bytes() == before, "a refused resume must leave the checkpoint alone"


def test_allow_changed_max_steps_trains_a_run_longer(stopped_run, tiny_init, capsys):
    train, out = stopped_run
    code = finetune.main(["--init", str(tiny_init), "--train", str(train), "--out", str(out), *FAST,
                          "--eval-every", "0", "--resume", "--max-steps", "6", "--allow-changed", "max_steps"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "metrics.json").read_text())["steps"] == 6


def test_pretrain_resume_with_another_mask_rate_or_data_is_refused(tmp_path, capsys):
    from data.prepare import prepare
    from conftest import require_data
    src = str(require_data("wikitext", "wiki.valid.raw"))
    prepare([src], str(tmp_path / "d1"), vocab_size=400, val_fraction=0.1, quiet=True, workers=1)
    shutil.copytree(tmp_path / "d1", tmp_path / "d2")
    meta = json.loads((tmp_path / "d2" / "meta.json").read_text())
    (tmp_path / "d2" / "meta.json").write_text(json.dumps({**meta, "note": "another preparation"}))
    common = ["--model", "tiny", "--seq-len", "16", "--batch-size", "2", "--no-progress", "--eval-every", "0",
              "--eval-batches", "1", "--max-steps", "4", "--out", str(tmp_path / "run")]
    assert pretrain.main(["--data", str(tmp_path / "d1"), *common, "--stop-at-step", "2"])["preempted"]
    for change, expected in ((["--data", str(tmp_path / "d1"), "--mask-rate", "0.3"], "mask_rate (saved: 0.15, now: 0.3)"),
                             (["--data", str(tmp_path / "d2")], "data (saved: '"),
                             (["--data", str(tmp_path / "d1"), "--seq-len", "8"], "seq_len (saved: 16, now: 8)")):
        with pytest.raises(SystemExit) as code:
            pretrain.main([*common, *change, "--resume"])
        assert code.value.code == 2 and expected in one_line_error(capsys)
    assert pretrain.main(["--data", str(tmp_path / "d1"), *common, "--resume"])["step"] == 4


# -----------------------------------------------------------------------------------------------------
# the loop's faults: a frozen rank, a torn log line, stale temporaries, a full disk, a bad --out (Medium 5-7, 10)


class Counting:
    """A toy data stream for trainer.train on a Linear model; counts the micro-batches drawn."""

    def __init__(self):
        self.drawn = 0

    def micro_batch(self, step, index):
        self.drawn += 1
        g = torch.Generator().manual_seed(step)
        return {"x": torch.randn(4, 3, generator=g), "num_targets": 4, "num_tokens": 4}


def toy_train(out, *, data=None, **cfg):
    torch.manual_seed(0)
    config = trainer.TrainConfig(out=str(out), max_steps=cfg.pop("max_steps", 4), no_progress=True, eval_every=0,
                                 log_every=1, **cfg)
    return trainer.train(torch.nn.Linear(3, 1), lambda m, b: (m(b["x"]) ** 2).sum(), data or Counting(), config,
                         trainer.Dist("cpu"))


def _stalled_rank(rank, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    torch.set_num_threads(1)
    env = trainer.Dist("cpu", timeout=3)
    if rank == 1:                       # joins the group, then never joins a collective (a frozen rank)
        import time
        time.sleep(120)
        return
    try:
        env.all_reduce_sum(torch.ones(1))
        queue.put("no error")
    except trainer.RunError as e:
        queue.put(str(e))


def test_a_rank_that_never_joins_a_collective_fails_the_others_with_a_message_naming_the_rank():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_stalled_rank, args=(r, port, queue)) for r in (0, 1)]
    for p in procs:
        p.start()
    try:
        msg = queue.get(timeout=90)      # the bound: --dist-timeout 3 s, plus start-up
    finally:
        for p in procs:
            p.kill()
            p.join()
    assert msg.startswith("rank 0 of 2: an all-reduce did not complete within --dist-timeout 3 s"), msg
    assert "\n" not in msg


def test_a_torn_last_log_line_does_not_block_resume_and_a_bad_middle_line_is_named(tmp_path):
    out = tmp_path / "run"
    assert toy_train(out, stop_at_step=2)["preempted"]
    log = out / "metrics.jsonl"
    log.write_text(log.read_text() + '{"step": 3, "lo')           # the disk filled mid-line
    assert toy_train(out, resume="auto")["step"] == 4
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    out2 = tmp_path / "run2"
    toy_train(out2, stop_at_step=2)
    (out2 / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(trainer.RunError, match=r"metrics.jsonl:2: not a JSON line"):
        toy_train(out2, resume="auto")


def test_temporaries_of_killed_runs_are_removed_when_a_run_starts_in_that_folder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = 2 ** 22 + 12345                                   # above the default pid_max: no such process
    stale = [out / f"checkpoint.pt.tmp.{dead}", out / f"best_model.pt.tmp.{dead}"]
    for f in stale:
        f.write_bytes(b"half a checkpoint")
    alive = out / f"checkpoint.pt.tmp.{os.getppid()}"         # a process that still runs: maybe still writing
    alive.write_bytes(b"in progress")
    toy_train(out)
    assert not any(f.exists() for f in stale) and alive.exists()


def test_a_full_disk_during_a_save_is_one_line_and_the_last_checkpoint_survives(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save, calls = torch.save, []

    def disk_fills_on_the_second_save(obj, path, *a, **k):
        calls.append(path)
        if len(calls) == 2:
            real_save(obj, path, *a, **k)                    # part of it reached the disk, then ENOSPC
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", disk_fills_on_the_second_save)
    with pytest.raises(trainer.RunError) as err:
        toy_train(out, save_every=1)
    assert str(err.value).startswith(f"cannot write checkpoint to --out {out} (disk full: ")
    monkeypatch.undo()
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 1
    assert [p.name for p in out.iterdir() if ".tmp" in p.name] == []


def test_finetune_on_a_full_disk_exits_2_with_one_line(tiny_init, binary_data, tmp_path, monkeypatch, capsys):
    def no_space(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", no_space)
    assert finetune_main(tiny_init, binary_data[0], tmp_path / "o", "--max-steps", "2") == 2
    assert "cannot write checkpoint to --out" in one_line_error(capsys)


@pytest.mark.parametrize("case", ["a file", "under a file"])
def test_an_unusable_out_is_one_line_before_any_step(tmp_path, case):
    (tmp_path / "f").write_text("a file")
    out = tmp_path / "f" if case == "a file" else tmp_path / "f" / "sub"
    data = Counting()
    with pytest.raises(trainer.RunError, match=f"--out {out}: " + ("is a file" if case == "a file" else "cannot create")):
        toy_train(out, data=data)
    assert data.drawn == 0


def test_tensorboard_without_the_package_fails_before_training_with_exit_2(tiny_init, binary_data, tmp_path,
                                                                          monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)      # import raises ImportError
    out = tmp_path / "o"
    assert finetune_main(tiny_init, binary_data[0], out, "--max-steps", "2", "--tensorboard") == 2
    assert "--tensorboard needs the tensorboard package" in one_line_error(capsys)
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoint.pt").exists()


# -----------------------------------------------------------------------------------------------------
# bad task files and bad meta.json (Medium 9, Low)


@pytest.mark.parametrize("content, message", ids=["null text", "list text", "number text", "bool label",
                                                   "list label", "5000-digit number", "5000 nested lists"], argvalues=[
    ('{"sentence": null, "label": 1}\n', "a.jsonl:1: field 'sentence' is null None; expected a string"),
    ('{"sentence": ["a", "b"], "label": 1}\n', "a.jsonl:1: field 'sentence' is list ['a', 'b']; expected a string"),
    ('{"sentence": 5, "label": 1}\n', "a.jsonl:1: field 'sentence' is int 5; expected a string"),
    ('{"sentence": "a", "label": 1}\n{"sentence": "b", "label": true}\n',
     "a.jsonl:2: field 'label' is bool True; expected a string or a number"),
    ('{"sentence": "a", "label": [1]}\n', "a.jsonl:1: field 'label' is list [1]; expected a string or a number"),
    ('{"sentence": "a", "label": ' + "9" * 5000 + '}\n', "a.jsonl:1: expected a JSON object per line ('Exceeds the limit (4300 digits)"),
    ('{"sentence": ' + "[" * 5000 + "]" * 5000 + '}\n', "a.jsonl:1: expected a JSON object per line"),
])
def test_jsonl_values_of_the_wrong_type_are_file_line_errors(tmp_path, content, message):
    f = tmp_path / "a.jsonl"
    f.write_text(content)
    with pytest.raises(TaskDataError) as err:
        label_classes("binary", read_examples([f]))
    assert message in str(err.value) and "\n" not in str(err.value) and len(str(err.value)) < 300


def test_a_csv_named_tsv_says_it_does_not_look_tab_separated(tmp_path):
    f = tmp_path / "train.tsv"
    f.write_text("sentence,label\na fine film,1\na dull film,0\n")
    with pytest.raises(TaskDataError, match=r"train.tsv: does not look tab-separated .* a CSV file should be named .csv"):
        read_examples([f])


def test_a_binary_file_is_refused_with_a_short_escaped_excerpt(tmp_path):
    f = tmp_path / "train.tsv"
    f.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8)) + b"\x00\n" * 3)
    with pytest.raises(TaskDataError) as err:
        read_examples([f])
    msg = str(err.value)
    assert "does not look like a text file" in msg and len(msg) < len(str(f)) + 160 and msg.isprintable()


def write_shards(folder, meta, tokens=10, itemsize=2):
    folder.mkdir()
    (folder / "meta.json").write_text(json.dumps(meta))
    for split in ("train", "val"):
        (folder / f"{split}.bin").write_bytes(b"\x01" * tokens * itemsize)


@pytest.mark.parametrize("meta, message", [
    ({}, "missing or invalid field 'dtype'"),
    ({"dtype": "uint16"}, "missing or invalid field 'vocab_size'"),
    ({"dtype": "uint16", "vocab_size": 2000, "val_tokens": 10}, "missing or invalid field 'train_tokens'"),
    ({"dtype": "uint8", "vocab_size": 2000, "train_tokens": 20, "val_tokens": 20},
     "dtype 'uint8' cannot hold the ids of vocab_size 2000"),
    ({"dtype": "uint16", "vocab_size": 2000, "train_tokens": 10, "val_tokens": 10, "tokenizer": "../../etc/passwd"},
     "tokenizer '../../etc/passwd' points outside its folder"),
    ({"dtype": "uint16", "vocab_size": 2000, "train_tokens": 10, "val_tokens": 10, "tokenizer": "/etc/passwd"},
     "tokenizer '/etc/passwd' points outside its folder"),
])
def test_a_bad_meta_json_is_one_line_naming_the_field(tmp_path, meta, message):
    write_shards(tmp_path / "d", meta)
    with pytest.raises(ValueError) as err:
        pretrain.Shards(str(tmp_path / "d"))
    assert str(tmp_path / "d" / "meta.json") in str(err.value) and message in str(err.value)
