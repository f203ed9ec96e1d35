"""pretrain.py + trainer.py as a specification: masking statistics, DDP equals gradient accumulation, exact
resume, atomic checkpoints, AMP, pre-emption, bad input, and loss that falls on the real corpora."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import pretrain
import trainer
from conftest import ROOT, minilm_dir, require_data, run_process_group

TINY = ["--model", "tiny", "--seq-len", "32", "--batch-size", "4", "--no-progress", "--log-every", "1",
        "--eval-batches", "2", "--dropout", "0"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A small prepared folder made from real text: one Wikipedia file, one Gutenberg book, WikiText valid."""
    from data.prepare import prepare
    out = tmp_path_factory.mktemp("corpus")
    prepare([str(require_data("wiki", "text", "AA", "wiki_00.xz")),
             str(require_data("books", "twain__the-adventures-of-tom-sawyer.txt.xz"))],
            str(out / "data"), vocab_size=2000, val_fraction=0.05, quiet=True, workers=1)
    prepare([str(require_data("wikitext", "wiki.valid.raw"))], str(out / "wikitext"), val_only=True,
            tokenizer=str(out / "data" / "tokenizer.model"), quiet=True, workers=1)
    return out


def run_cli(args, env_extra=None, torchrun=0, timeout=600):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **(env_extra or {}))
    if torchrun:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={torchrun}",
               f"--master_port={free_port()}", str(ROOT / "pretrain.py"), *args]
    else:
        cmd = [sys.executable, str(ROOT / "pretrain.py"), *args]
    return run_process_group(cmd, timeout, env=env, cwd=ROOT)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def params(out_dir):
    return torch.load(os.path.join(out_dir, "checkpoint.pt"), weights_only=True)["model"]


def log_lines(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


# -----------------------------------------------------------------------------------------------------
# masking


def test_mlm_mask_ratio_80_10_10():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(5, 1000, (64, 512), generator=g)
    tokens[:, 0], tokens[:, 100], tokens[:, -1] = 2, 3, 0                  # [CLS], [SEP], [PAD]
    inputs, labels = pretrain.mask_tokens(tokens, g, 1000, {0, 1, 2, 3, 4}, mask_id=4, rate=0.15)
    eligible = tokens >= 5
    chosen = labels != -100
    assert abs(chosen.sum() / eligible.sum() - 0.15) < 0.01
    n = chosen.sum().item()
    as_mask = (inputs[chosen] == 4).sum().item() / n
    kept = (inputs[chosen] == tokens[chosen]).sum().item() / n
    assert abs(as_mask - 0.8) < 0.02
    assert abs(kept - 0.1) < 0.02 + 0.001                               # random can also hit the same id
    assert abs(1 - as_mask - kept - 0.1) < 0.02
    assert not chosen[~eligible].any(), "special tokens must never be masked"
    assert torch.equal(labels[chosen], tokens[chosen])
    assert torch.equal(inputs[~chosen], tokens[~chosen])
    assert (inputs[chosen] >= 4).all(), "random replacements are never [PAD]/[UNK]/[CLS]/[SEP]"


def test_mlm_random_replacements_skip_scattered_wordpiece_specials():
    g = torch.Generator().manual_seed(0)
    specials = {0, 100, 101, 102, 103}                                     # [PAD] [UNK] [CLS] [SEP] [MASK]
    tokens = torch.randint(104, 110, (256, 256), generator=g)              # a vocabulary of 110 ids
    inputs, labels = pretrain.mask_tokens(tokens, g, 110, specials, mask_id=103, rate=0.5)
    chosen = labels != -100
    replaced = chosen & (inputs != 103) & (inputs != tokens)
    assert replaced.sum() > 500
    assert not torch.isin(inputs[replaced], torch.tensor(sorted(specials))).any()
    assert (inputs[replaced] < 100).any(), "ids below the specials are regular words here"


def test_micro_batch_is_a_pure_function_of_step_and_index(corpus):
    args = pretrain.parse_args(["--data", str(corpus / "data"), *TINY])
    shards = pretrain.Shards(args.data)
    data = pretrain.PretrainData(shards.train, args, {0, 1, 2, 3, 4}, 2, 4, shards.vocab_size)
    a, b = data.micro_batch(7, 1), data.micro_batch(7, 1)
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
    assert not torch.equal(a["input_ids"], data.micro_batch(7, 0)["input_ids"])
    assert (a["input_ids"][:, 0] == 2).all()                              # every window starts with [CLS]


def test_windows_are_cls_then_the_stream_from_each_offset(corpus):
    for objective, length in (("mlm", 16), ("clm", 17)):                  # CLM reads one more: the last target
        args = pretrain.parse_args(["--data", str(corpus / "data"), *TINY, "--seq-len", "16", "--objective", objective])
        shards = pretrain.Shards(args.data)
        data = pretrain.PretrainData(shards.train, args, {0, 1, 2, 3, 4}, 2, 4, shards.vocab_size)
        starts = torch.tensor([0, 5, len(shards.train) - length + 1])   # the last offset a window fits at
        windows = data.windows(starts)
        assert windows.shape == (3, length) and windows.dtype == torch.int64
        for row, start in zip(windows, starts.tolist()):
            assert row[0] == 2 and row[1:].tolist() == shards.train[start:start + length - 1].tolist()


def test_seed_changes_the_batches_and_the_same_seed_repeats_them(corpus):
    """--seed must matter: two seeds draw different windows and masks; one seed draws the same ones again.
    (A torch.Generator keeps 32 bits of its seed: packing seed << 40 into it made every seed alike.)"""
    def batch(seed, step=3, index=0):
        args = pretrain.parse_args(["--data", str(corpus / "data"), *TINY, "--seed", str(seed)])
        shards = pretrain.Shards(args.data)
        return pretrain.PretrainData(shards.train, args, {0, 1, 2, 3, 4}, 2, 4, shards.vocab_size).micro_batch(step, index)

    a, again, other = batch(1), batch(1), batch(2)
    assert torch.equal(a["input_ids"], again["input_ids"]) and torch.equal(a["labels"], again["labels"])
    assert not torch.equal(a["input_ids"], other["input_ids"])
    assert not torch.equal(a["labels"] != -100, other["labels"] != -100), "the masks differ too"
    assert not torch.equal(batch(1, 0, 0)["input_ids"], batch(1, 2 ** 20, 0)["input_ids"]), "no period of 2^20 steps"
    assert not torch.equal(batch(1, 0, 1)["input_ids"], batch(1, 1, 0)["input_ids"])


def test_batch_streams_are_distinct_for_every_seed_step_and_index():
    """No two (seed, step, index) keys share a random stream, including keys that collided when they were
    packed into one integer ((seed << 40) ^ (step << 12) ^ index)."""
    keys = [(s, t, i) for s in (0, 1, 2 ** 24) for t in (0, 1, 2 ** 20, 2 ** 28) for i in (0, 1, 4096)]
    draws = {tuple(pretrain.batch_generator(*k).integers(0, 2 ** 62, 2)) for k in keys}
    assert len(draws) == len(keys)


# -----------------------------------------------------------------------------------------------------
# the loop: DDP == accumulation, resume, checkpoints, AMP


def test_ddp_two_ranks_equals_grad_accum_two(corpus, tmp_path):
    """MLM micro-batches hold different numbers of masked tokens; normalising by the global count makes
    2 ranks x 1 micro-batch and 1 rank x 2 micro-batches the same optimisation, to float rounding."""
    common = ["--data", str(corpus / "data"), *TINY, "--max-steps", "4", "--eval-every", "0", "--save-every", "0"]
    one = run_cli([*common, "--out", str(tmp_path / "accum"), "--grad-accum", "2"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli([*common, "--out", str(tmp_path / "ddp"), "--grad-accum", "1"], torchrun=2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = params(tmp_path / "accum"), params(tmp_path / "ddp")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-6, worst
    # the counts really differed between micro-batches, or this test would prove nothing
    args = pretrain.parse_args(common)
    shards = pretrain.Shards(args.data)
    data = pretrain.PretrainData(shards.train, args, {0, 1, 2, 3, 4}, 2, 4, shards.vocab_size)
    assert data.micro_batch(0, 0)["num_targets"] != data.micro_batch(0, 1)["num_targets"]
    losses_a = [r["loss"] for r in log_lines(tmp_path / "accum") if "loss" in r]
    losses_b = [r["loss"] for r in log_lines(tmp_path / "ddp") if "loss" in r]
    assert np.allclose(losses_a, losses_b, atol=1e-5)


def test_fsdp_two_ranks_matches_ddp_and_resumes(corpus, tmp_path):
    """FSDP2 shards parameters but computes the same update as DDP; its checkpoints gather full tensors."""
    common = ["--data", str(corpus / "data"), *TINY, "--max-steps", "4", "--eval-every", "0", "--save-every", "0"]
    ddp = run_cli([*common, "--out", str(tmp_path / "ddp")], torchrun=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    first = run_cli([*common, "--out", str(tmp_path / "fsdp"), "--fsdp", "--stop-at-step", "2"], torchrun=2)
    # pre-empted: every rank exits 75 (EX_TEMPFAIL); torchrun reports the ranks' code and fails itself
    assert first.returncode != 0 and "exitcode  : 75" in first.stderr, first.stderr[-3000:]
    second = run_cli([*common, "--out", str(tmp_path / "fsdp"), "--fsdp", "--resume"], torchrun=2)
    assert second.returncode == 0, second.stderr[-3000:]
    a, b = params(tmp_path / "ddp"), params(tmp_path / "fsdp")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    assert (tmp_path / "fsdp" / "model.safetensors").exists()          # the export ran on a plain copy


def _same_run(a_dir, b_dir, tol):
    """Parameters and logged losses, gradient norms and evaluations of two runs agree to tol."""
    a, b = params(a_dir), params(b_dir)
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)       # whole tensors, not shards
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < tol, worst
    la, lb = log_lines(a_dir), log_lines(b_dir)
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    for key in ("loss", "grad_norm", "eval/loss"):
        xs = [r[key] for r in la if key in r]
        assert xs and np.allclose(xs, [r[key] for r in lb if key in r], rtol=0, atol=tol), key


def test_tensor_parallel_two_ranks_equals_one_process_and_resumes(corpus, tmp_path):
    """--tp 2: each rank holds half the heads and half the FFN of every block; the losses, gradient norms
    (clipped: they exceed --clip 1) and parameters are one process's to 1e-5, the checkpoint holds whole
    tensors in the usual layout, and a resumed tensor-parallel run continues it."""
    common = ["--data", str(corpus / "data"), *TINY, "--max-steps", "4", "--eval-every", "2", "--save-every", "0"]
    one = run_cli([*common, "--out", str(tmp_path / "one")])
    assert one.returncode == 0, one.stderr[-3000:]
    first = run_cli([*common, "--out", str(tmp_path / "tp"), "--tp", "2", "--stop-at-step", "2"], torchrun=2)
    assert first.returncode != 0 and "exitcode  : 75" in first.stderr, first.stderr[-3000:]     # pre-empted
    second = run_cli([*common, "--out", str(tmp_path / "tp"), "--tp", "2", "--resume"], torchrun=2)
    assert second.returncode == 0, second.stderr[-3000:]
    _same_run(tmp_path / "one", tmp_path / "tp", 1e-5)
    assert max(r["grad_norm"] for r in log_lines(tmp_path / "one") if "grad_norm" in r) > 1.0
    import transformers
    hf = transformers.BertForMaskedLM.from_pretrained(str(tmp_path / "tp"))         # the export is whole too
    assert hf.config.num_attention_heads == 2


def test_tensor_and_data_parallel_on_a_2x2_mesh_equal_accumulation(corpus, tmp_path):
    """4 ranks = 2 replicas x 2 tensor-parallel ranks: the same optimisation as 1 process with 2 micro-batches."""
    common = ["--data", str(corpus / "data"), *TINY, "--max-steps", "3", "--eval-every", "0", "--save-every", "0"]
    one = run_cli([*common, "--out", str(tmp_path / "one"), "--grad-accum", "2"])
    assert one.returncode == 0, one.stderr[-3000:]
    mesh = run_cli([*common, "--out", str(tmp_path / "mesh"), "--tp", "2"], torchrun=4)
    assert mesh.returncode == 0, mesh.stderr[-3000:]
    _same_run(tmp_path / "one", tmp_path / "mesh", 1e-5)


def test_tensor_parallel_refuses_what_it_cannot_split(corpus, tmp_path):
    res = run_cli(["--data", str(corpus / "data"), *TINY, "--out", str(tmp_path / "o"), "--tp", "2"])
    assert res.returncode == 2 and "--tp 2: the world size 1 is not a multiple" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_resume_is_exact(corpus, tmp_path, optimizer):
    common = ["--data", str(corpus / "data"), *TINY, "--max-steps", "20", "--eval-every", "5", "--save-every", "0",
              "--dropout", "0.1", "--optimizer", optimizer]
    straight = pretrain.main([*common, "--out", str(tmp_path / "straight")])
    assert pretrain.main([*common, "--out", str(tmp_path / "split"), "--stop-at-step", "10"])["preempted"]
    assert not (tmp_path / "split" / "curves.png").exists()          # drawn when a run ends, not when it pauses
    pretrain.main([*common, "--out", str(tmp_path / "split"), "--resume"])
    from test_plots import png_series
    assert {"loss", "eval/loss"} <= set(png_series(tmp_path / "straight" / "curves.png"))
    a, b = params(tmp_path / "straight"), params(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a), "parameters differ after resume"
    assert log_lines(tmp_path / "straight") == log_lines(tmp_path / "split") or \
        [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in log_lines(tmp_path / "straight")] == \
        [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in log_lines(tmp_path / "split")]
    assert straight["step"] == 20


def test_wsd_run_trained_longer_in_its_stable_phase_equals_the_longer_run_from_the_start(corpus, tmp_path, capsys):
    # a run planned for 12 steps (stable until step 6), paused at step 5, then given 20 (--allow-changed
    # max_steps) is the 20-step run: same lrs, batches, masks and weights
    common = ["--data", str(corpus / "data"), *TINY, "--eval-every", "0", "--save-every", "0", "--schedule", "wsd",
              "--warmup", "3", "--cooldown", "6"]
    pretrain.main([*common, "--max-steps", "20", "--out", str(tmp_path / "long")])
    assert pretrain.main([*common, "--max-steps", "12", "--out", str(tmp_path / "grown"), "--stop-at-step", "5"])["preempted"]
    res = run_cli([*common, "--max-steps", "20", "--out", str(tmp_path / "grown"), "--resume"])
    assert res.returncode == 2 and "max_steps (saved: 12, now: 20)" in res.stderr    # only when asked for
    capsys.readouterr()
    pretrain.main([*common, "--max-steps", "20", "--out", str(tmp_path / "grown"), "--resume",
                   "--allow-changed", "max_steps"])
    assert "at step 5; changed by --allow-changed: max_steps (saved: 12, now: 20)" in capsys.readouterr().out
    a, b = params(tmp_path / "long"), params(tmp_path / "grown")
    assert all(torch.equal(a[k], b[k]) for k in a)
    lrs = [r["lr"] for r in log_lines(tmp_path / "long") if "lr" in r]
    assert len(lrs) == 20 and lrs == [r["lr"] for r in log_lines(tmp_path / "grown") if "lr" in r]
    assert lrs[2:14] == pytest.approx([1e-3] * 12) and lrs[14:] == pytest.approx([1e-3 * (20 - s) / 6 for s in range(14, 20)])


def test_half_written_checkpoint_never_replaces_the_last_good_one(corpus, tmp_path, monkeypatch):
    out = tmp_path / "run"
    pretrain.main(["--data", str(corpus / "data"), *TINY, "--max-steps", "3", "--out", str(out), "--eval-every", "0"])
    good = params(out)

    real_save = torch.save

    def crash_midway(obj, path, *a, **k):          # write half a file, then die as a killed process would
        real_save(obj, path, *a, **k)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
        raise KeyboardInterrupt("simulated crash during save")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        trainer.atomic_save({"model": {}}, str(out / "checkpoint.pt"))
    monkeypatch.undo()
    after = params(out)
    assert all(torch.equal(good[k], after[k]) for k in good)
    assert [p.name for p in out.iterdir() if ".tmp" in p.name] == []


def test_bf16_autocast_trains_on_cpu(corpus, tmp_path):
    result = pretrain.main(["--data", str(corpus / "data"), *TINY, "--max-steps", "30", "--amp", "bf16",
                            "--out", str(tmp_path / "bf16"), "--eval-every", "0", "--lr", "2e-3"])
    losses = [r["loss"] for r in log_lines(tmp_path / "bf16") if "loss" in r]
    assert all(np.isfinite(losses)) and np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3
    assert result["step"] == 30


def test_fp16_scaler_skips_steps_with_inf_gradients(tmp_path):
    """The scaler unscales gradients, finds inf, skips the optimizer step, halves the scale, counts it."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)

    class Data:
        def micro_batch(self, step, index):
            x = torch.randn(8, 4)
            if step == 2:
                x[0, 0] = float("inf")                       # poisons every gradient of this step
            return {"x": x, "num_targets": 8, "num_tokens": 8}

    before = {}

    def loss_fn(m, batch):
        return (m(batch["x"]) ** 2).sum()

    def snapshot(m):
        before[len(before)] = {k: v.clone() for k, v in m.state_dict().items()}

    args = pretrain.parse_args(["--out", str(tmp_path), "--max-steps", "4", "--amp", "fp16", "--no-progress",
                                "--save-every", "1", "--eval-every", "0", "--log-every", "1"])
    result = trainer.train(model, loss_fn, Data(), args, trainer.Dist("cpu"), on_save=snapshot)
    logs = log_lines(tmp_path)
    skipped = [r["skipped_steps"] for r in logs]
    assert skipped[2] == skipped[1] + 1 and skipped[3] == skipped[2]   # (step 1 may also skip: scale calibration)
    assert all(torch.equal(before[1][k], before[2][k]) for k in before[1]), "the inf step must not move weights"
    assert not torch.equal(before[2]["weight"], before[3]["weight"])
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    assert result["step"] == 4


def test_sigterm_saves_a_checkpoint_and_exits_75_so_no_pipeline_takes_it_for_finished(corpus, tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, str(ROOT / "pretrain.py"), "--data", str(corpus / "data"), *TINY,
                             "--max-steps", "100000", "--out", str(out), "--eval-every", "0", "--save-every", "0"],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "metrics.jsonl").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == trainer.EX_TEMPFAIL == 75, stderr[-2000:]
    assert "continue with --resume" in stdout and "Traceback" not in stderr
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert 0 < ckpt["step"] < 100000
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()


def test_torchrun_two_ranks_end_to_end_with_clm_and_export(corpus, tmp_path):
    out = tmp_path / "clm"
    res = run_cli(["--data", str(corpus / "data"), "--eval-data", str(corpus / "wikitext"), *TINY,
                   "--objective", "clm", "--max-steps", "30", "--out", str(out), "--eval-every", "15",
                   "--sample", "2"], torchrun=2)
    assert res.returncode == 0, res.stderr[-3000:]
    logs = log_lines(out)
    assert logs[-1]["step"] == 30 and "eval/wikitext/ppl" in logs[-1]
    assert "--- " in res.stdout                                          # the generated samples
    import transformers
    hf = transformers.BertForMaskedLM.from_pretrained(str(out))             # the BERT-layout export
    assert hf.config.num_hidden_layers == 2


# -----------------------------------------------------------------------------------------------------
# real data: the loss falls


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_tiny_model_loss_falls_on_real_corpus_within_200_steps(corpus, tmp_path, objective):
    out = tmp_path / objective
    pretrain.main(["--data", str(corpus / "data"), "--eval-data", str(corpus / "wikitext"), "--model", "tiny",
                   "--objective", objective, "--seq-len", "64", "--batch-size", "8", "--max-steps", "200",
                   "--lr", "2e-3", "--eval-every", "100", "--eval-batches", "4", "--no-progress", "--out", str(out),
                   "--log-every", "1"])
    evals = [r for r in log_lines(out) if "eval/loss" in r]
    first, last = evals[0], evals[-1]
    train = [r["loss"] for r in log_lines(out) if "loss" in r]
    assert train[0] > np.log(2000) - 0.3                                # starts near uniform: ln(2000) = 7.6
    assert np.mean(train[-20:]) < train[0] - 1.0, train[::20]
    assert last["eval/loss"] < first["eval/loss"]
    assert last["eval/loss"] < np.log(2000) - 1.0                       # far better than uniform over the vocab
    assert last["eval/wikitext/loss"] < np.log(2000) - 1.0              # also on held-out WikiText


# -----------------------------------------------------------------------------------------------------
# bad input: one clear line each, nothing deleted


def test_bad_inputs_give_one_clear_error_each(corpus, tmp_path):
    res = run_cli(["--data", str(tmp_path / "nope"), *TINY])
    assert res.returncode == 2 and "no such folder" in res.stderr and "Traceback" not in res.stderr
    (tmp_path / "empty").mkdir()
    res = run_cli(["--data", str(tmp_path / "empty"), *TINY])
    assert res.returncode == 2 and "no meta.json" in res.stderr
    res = run_cli(["--data", str(corpus / "data"), *TINY[:2], "--seq-len", "600", "--out", str(tmp_path / "o")])
    assert res.returncode == 2 and "--seq-len 600 exceeds" in res.stderr

    # shards whose dtype disagrees with meta.json, and whose ids exceed the vocabulary
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(corpus / "data", bad)
    meta = json.loads((bad / "meta.json").read_text())
    meta["dtype"] = "uint32"
    (bad / "meta.json").write_text(json.dumps(meta))
    res = run_cli(["--data", str(bad), *TINY])
    assert res.returncode == 2 and "train.bin" in res.stderr and "uint32" in res.stderr
    meta["dtype"], meta["vocab_size"] = "uint16", 100
    (bad / "meta.json").write_text(json.dumps(meta))
    res = run_cli(["--data", str(bad), *TINY])
    assert res.returncode == 2 and "vocab_size is 100" in res.stderr

    # a corrupt checkpoint passed to --resume: clear error, and the file is left where it was
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint at all")
    res = run_cli(["--data", str(corpus / "data"), *TINY, "--out", str(out), "--resume"])
    assert res.returncode == 2 and "corrupt" in res.stderr and "Traceback" not in res.stderr
    assert (out / "checkpoint.pt").read_bytes() == b"not a checkpoint at all"


def test_init_bad_inputs_one_clear_error_each_and_nothing_overwritten(corpus, tmp_path):
    """--init on a folder without config.json, a tokenizer that is not --data's, --init with --resume, and a
    fresh run into a folder that already holds one: one line each, the existing files untouched."""
    (tmp_path / "no_config").mkdir()
    res = run_cli(["--data", str(corpus / "data"), "--init", str(tmp_path / "no_config"), "--out", str(tmp_path / "o1")])
    assert res.returncode == 2 and "no config.json" in res.stderr and "Traceback" not in res.stderr
    res = run_cli(["--data", str(corpus / "data"), "--init", str(minilm_dir()), "--out", str(tmp_path / "o2")])
    assert res.returncode == 2 and "is not the one --data" in res.stderr and "--tokenizer" in res.stderr
    res = run_cli(["--data", str(corpus / "data"), "--init", str(minilm_dir()), "--resume", "--out", str(tmp_path / "o3")])
    assert res.returncode == 2 and "--init" in res.stderr and "--resume" in res.stderr
    res = run_cli(["--data", str(corpus / "data"), "--init", str(minilm_dir()), "--model", "mini"])
    assert res.returncode == 2 and "drop --model" in res.stderr
    res = run_cli(["--data", str(corpus / "data"), "--init", str(minilm_dir()), "--embedding-norm"])
    assert res.returncode == 2 and "drop --embedding-norm" in res.stderr
    assert not any((tmp_path / o).exists() for o in ("o1", "o2", "o3"))
    run_dir = tmp_path / "run"
    assert run_cli(["--data", str(corpus / "data"), *TINY, "--max-steps", "2", "--out", str(run_dir)]).returncode == 0
    before = (run_dir / "checkpoint.pt").read_bytes()
    res = run_cli(["--data", str(corpus / "data"), *TINY, "--max-steps", "2", "--out", str(run_dir)])
    assert res.returncode == 2 and "already holds a run" in res.stderr
    assert (run_dir / "checkpoint.pt").read_bytes() == before


def test_embedding_norm_flag_builds_a_pre_ln_model_that_saves_and_resumes_with_it(corpus, tmp_path):
    out = tmp_path / "run"
    base = ["--data", str(corpus / "data"), *TINY, "--norm", "pre", "--out", str(out)]
    assert run_cli([*base, "--embedding-norm", "--max-steps", "2"]).returncode == 0
    assert json.loads((out / "config.json").read_text())["plainbert_embedding_norm"] is True
    # resuming with the flags the run was started with continues it; without the LN it is another model
    assert run_cli([*base, "--embedding-norm", "--max-steps", "3", "--resume", "--allow-changed", "max_steps"]).returncode == 0
    res = run_cli([*base, "--max-steps", "4", "--resume", "--allow-changed", "max_steps"])
    assert res.returncode == 2 and "embedding_norm" in res.stderr and "Traceback" not in res.stderr
    res = run_cli(["--data", str(corpus / "data"), *TINY, "--no-embedding-norm", "--out", str(tmp_path / "post")])
    assert res.returncode == 2 and "--no-embedding-norm needs --norm pre" in res.stderr
    assert not (tmp_path / "post").exists()


def test_freeze_embeddings_keeps_the_word_vectors_and_trains_the_rest(corpus, tmp_path):
    """--init DIR --freeze-embeddings: the word embeddings (and the LM decoder, the same tensor) stay as DIR
    has them, everything else learns; the run resumes only with the flag; without --init it is refused."""
    start, frozen = tmp_path / "start", tmp_path / "frozen"
    assert run_cli(["--data", str(corpus / "data"), *TINY, "--norm", "pre", "--max-steps", "2", "--out", str(start)]).returncode == 0
    base = ["--data", str(corpus / "data"), "--seq-len", "32", "--batch-size", "4", "--eval-every", "0",
            "--save-every", "0", "--dropout", "0", "--out", str(frozen)]
    res = run_cli([*base, "--init", str(start), "--freeze-embeddings", "--max-steps", "3"])
    assert res.returncode == 0 and "word embeddings frozen" in res.stdout
    before, after = params(start), params(frozen)
    assert torch.equal(before["encoder.embed.tok.weight"], after["encoder.embed.tok.weight"])
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert "encoder.embed.pos.weight" in moved and "lm_head.bias" in moved and len(moved) > len(before) // 2
    res = run_cli([*base, "--freeze-embeddings", "--resume", "--max-steps", "4", "--allow-changed", "max_steps"])
    assert res.returncode == 0 and torch.equal(params(frozen)["encoder.embed.tok.weight"], before["encoder.embed.tok.weight"])
    res = run_cli([*base, "--resume", "--max-steps", "5", "--allow-changed", "max_steps"])
    assert res.returncode == 2 and "freeze_embeddings" in res.stderr and "Traceback" not in res.stderr
    res = run_cli(["--data", str(corpus / "data"), *TINY, "--freeze-embeddings", "--out", str(tmp_path / "none")])
    assert res.returncode == 2 and "--freeze-embeddings needs --init" in res.stderr and not (tmp_path / "none").exists()


def test_continued_pretraining_of_minilm_on_wordpiece_shards_learns_and_fine_tunes(tmp_path):
    """pretrain.py --init all-MiniLM-L6-v2 (an encoder without an MLM head) on shards made with its own
    WordPiece vocabulary: a tied head is initialised, the MLM loss falls, the result resumes with its own
    architecture and fine-tunes."""
    from data.prepare import prepare
    prepare([str(require_data("wiki", "text", "AA", "wiki_00.xz"))], str(tmp_path / "wp"), tokenizer=str(minilm_dir()),
            val_fraction=0.05, quiet=True, workers=1)
    out = tmp_path / "cpt"
    args = ["--data", str(tmp_path / "wp"), "--init", str(minilm_dir()), "--seq-len", "32", "--batch-size", "8",
            "--lr", "2e-4", "--warmup", "2", "--eval-every", "10", "--eval-batches", "2", "--log-every", "1",
            "--no-progress", "--out", str(out)]
    res = run_cli([*args, "--max-steps", "30", "--stop-at-step", "20"])
    assert res.returncode == trainer.EX_TEMPFAIL, res.stderr[-2000:]
    assert "no LM head: a new one is initialised, tied to the word embeddings" in res.stdout
    res = run_cli([a for a in args if a not in ("--init", str(minilm_dir()))] + ["--max-steps", "30", "--resume"])
    assert res.returncode == 0, res.stderr[-2000:]
    evals = [r["eval/loss"] for r in log_lines(out) if "eval/loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0] - 0.2, evals
    import model as M
    lm = M.from_hf_bert(str(out), head="mlm")
    assert lm.lm_head.tok_embedding[0].weight is lm.encoder.embed.tok.weight
    import finetune
    result = finetune.run(["--task", "binary", "--init", str(out), "--max-steps", "3", "--batch-size", "4",
                           "--no-progress", "--out", str(tmp_path / "ft"), "--save-every", "0"])
    assert result["metrics"]["steps"] == 3 and result["info"]["init"] == str(out)
    assert (tmp_path / "ft" / "config.json").is_file()


def test_training_puts_the_signal_handlers_back(tmp_path):
    """A worker pool forked after training must still die on SIGTERM (Pool.terminate would hang)."""
    before = signal.getsignal(signal.SIGTERM)

    class Data:
        def micro_batch(self, step, index):
            return {"x": torch.ones(2, 3), "num_targets": 2, "num_tokens": 2}

    args = pretrain.parse_args(["--out", str(tmp_path), "--max-steps", "2", "--no-progress", "--eval-every", "0"])
    trainer.train(torch.nn.Linear(3, 1), lambda m, b: m(b["x"]).sum(), Data(), args, trainer.Dist("cpu"))
    assert signal.getsignal(signal.SIGTERM) is before


# -----------------------------------------------------------------------------------------------------
# CLM evaluation by generation (--eval-generate) and --sample, both through generate.py


def test_clm_eval_logs_bleu_and_rouge_of_greedy_continuations(corpus, tmp_path, capsys):
    """Logged gen_bleu / gen_rougeL are sacrebleu's and rouge-score's scores of the final model's greedy
    continuation of the first 8 tokens of the first 6 held-out windows against their next 8 tokens."""
    import sacrebleu
    from rouge_score import rouge_scorer

    import generate
    out = tmp_path / "clm"
    pretrain.main(["--data", str(corpus / "data"), *TINY, "--objective", "clm", "--max-steps", "6",
                   "--eval-every", "3", "--eval-generate", "8", "--eval-generate-windows", "6", "--sample", "2",
                   "--out", str(out)])
    printed = capsys.readouterr().out
    evals = [r for r in log_lines(out) if "eval/loss" in r]
    assert [r["step"] for r in evals] == [3, 6] and all("eval/gen_bleu" in r and "eval/gen_rougeL" in r for r in evals)
    assert printed.count("\n--- ") + printed.startswith("--- ") == 2        # --sample 2: two continuations
    # the held-out windows: [CLS] + the val stream cut into consecutive pieces of --seq-len tokens
    model, tok = generate.load_causal_lm(str(out))
    meta = json.loads((corpus / "data" / "meta.json").read_text())
    val = np.fromfile(corpus / "data" / "val.bin", dtype=meta["dtype"]).astype(np.int64)
    windows = [[tok.cls_id] + val[i * 32:i * 32 + 15].tolist() for i in range(6)]     # body = seq_len for CLM
    new = generate.generate(model, [w[:8] for w in windows], 8, temperature=0)
    hyps, refs = [tok.decode(n) for n in new], [tok.decode(w[8:]) for w in windows]
    assert evals[-1]["eval/gen_bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-6)
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge_l = np.mean([scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)])
    assert evals[-1]["eval/gen_rougeL"] == pytest.approx(rouge_l, abs=1e-6)
    assert all(len(n) == 8 for n in new)
    assert evals[-1]["eval/gen_bleu"] > 0 and evals[-1]["eval/gen_rougeL"] > 0       # not vacuous


def test_eval_generate_needs_clm_and_room_in_the_window(capsys):
    for argv, expected in [(["--eval-generate", "4"], "only a causal LM"),
                           (["--objective", "clm", "--seq-len", "16", "--eval-generate", "9"], "expected K in 0..8")]:
        with pytest.raises(SystemExit):
            pretrain.parse_args(argv)
        assert expected in capsys.readouterr().err
    assert pretrain.parse_args(["--objective", "clm", "--seq-len", "20"]).eval_generate == 10   # default: min(16, T/2)
    assert pretrain.parse_args([]).eval_generate == 0                                         # MLM: off


# -----------------------------------------------------------------------------------------------------
# ELECTRA: replaced-token detection


def electra_batch(corpus, extra=()):
    args = pretrain.parse_args(["--data", str(corpus / "data"), *TINY, "--objective", "electra", *extra])
    shards = pretrain.Shards(args.data)
    data = pretrain.PretrainData(shards.train, args, {0, 1, 2, 3, 4}, 2, 4, shards.vocab_size)
    return args, shards, dict(data.micro_batch(3, 0), causal=False, rtd_scale=args.rtd_weight * args.mask_rate)


def test_electra_loss_is_the_generators_mlm_plus_lambda_times_rate_times_the_summed_detection_loss(corpus):
    """Recomputed with torch's own losses: the generator's summed cross-entropy on the masked tokens, its
    samples put in their place (with the seed the batch carries), torch's BCE on every token of that text."""
    import torch.nn.functional as F
    from model import EncoderConfig, ReplacedTokenDetection
    args, shards, batch = electra_batch(corpus)
    torch.manual_seed(0)
    model = ReplacedTokenDetection(EncoderConfig.preset("tiny", vocab_size=shards.vocab_size, dropout=0,
                                                        attention_dropout=0))
    loss = pretrain.lm_loss(model, batch)

    ids, labels = batch["input_ids"], batch["labels"]
    masked = labels != -100
    gen_logits = model.generator(ids)[masked]                                        # (M, V)
    mlm = F.cross_entropy(gen_logits, labels[masked], reduction="sum")
    g = torch.Generator().manual_seed(batch["sample_seed"])
    sampled = torch.multinomial(F.softmax(gen_logits.detach(), -1), 1, generator=g).squeeze(1)
    original = torch.where(masked, labels, ids)
    corrupted = original.clone()
    corrupted[masked] = sampled
    is_replaced = (corrupted != original).float()
    assert 0 < is_replaced.sum() <= masked.sum() and not is_replaced[~masked].any()  # only masked tokens change
    rtd = F.binary_cross_entropy_with_logits(model.rtd_head(model.encoder(corrupted)).squeeze(-1), is_replaced,
                                             reduction="sum")
    expected = mlm + 50 * 0.15 * rtd
    assert batch["rtd_scale"] == 50 * 0.15
    assert torch.allclose(loss, expected, rtol=1e-5), (loss.item(), expected.item())


def test_electra_generator_shares_the_discriminators_embeddings_and_both_losses_train_them(corpus):
    from model import EncoderConfig, ReplacedTokenDetection
    args, shards, batch = electra_batch(corpus)
    cfg = EncoderConfig.preset("mini", vocab_size=shards.vocab_size)
    model = ReplacedTokenDetection(cfg)
    assert model.generator_layers == 1 and len(model.generator.encoder.blocks) == 1 and len(model.encoder.blocks) == 4
    assert model.generator.encoder.embed is model.encoder.embed
    assert model.generator.lm_head.tok_embedding[0].weight is model.encoder.embed.tok.weight
    out = pretrain.electra_forward(model, batch)
    out[2].backward()                                           # the generator's loss alone reaches the table
    assert model.encoder.embed.tok.weight.grad.abs().sum() > 0 and model.rtd_head[0].weight.grad is None
    model.zero_grad()
    pretrain.electra_forward(model, batch)[5].backward()        # and so does the discriminator's
    assert model.encoder.embed.tok.weight.grad.abs().sum() > 0 and model.generator.lm_head.dense.weight.grad is None
    # a state dict loaded into a fresh model keeps the sharing (the shared tensors load once, as one)
    fresh = ReplacedTokenDetection(cfg)
    fresh.load_state_dict(model.state_dict())
    assert fresh.generator.encoder.embed is fresh.encoder.embed
    assert torch.equal(fresh.encoder.embed.tok.weight, model.encoder.embed.tok.weight)


def test_electra_ddp_two_ranks_equals_grad_accum_two_and_resume_is_exact(corpus, tmp_path):
    """The generator's samples come from the batch's own seed, so two ranks and accumulation see the same
    replacements, and a resumed run the ones an uninterrupted run would have drawn."""
    common = ["--data", str(corpus / "data"), *TINY, "--objective", "electra", "--max-steps", "4", "--eval-every", "0",
              "--save-every", "0"]
    one = run_cli([*common, "--out", str(tmp_path / "accum"), "--grad-accum", "2"])
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli([*common, "--out", str(tmp_path / "ddp"), "--grad-accum", "1"], torchrun=2)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = params(tmp_path / "accum"), params(tmp_path / "ddp")
    assert a.keys() == b.keys() and any(k.startswith("generator.") for k in a) and "rtd_head.2.weight" in a
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-6, worst

    common = ["--data", str(corpus / "data"), *TINY, "--objective", "electra", "--max-steps", "8", "--eval-every", "4",
              "--save-every", "0"]
    pretrain.main([*common, "--out", str(tmp_path / "straight")])
    assert pretrain.main([*common, "--out", str(tmp_path / "split"), "--stop-at-step", "4"])["preempted"]
    pretrain.main([*common, "--out", str(tmp_path / "split"), "--resume"])
    a, b = params(tmp_path / "straight"), params(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a), "parameters differ after resume"
    res = run_cli([*common, "--out", str(tmp_path / "split"), "--resume", "--generator-layers", "2",
                   "--max-steps", "9", "--allow-changed", "max_steps"])
    assert res.returncode == 2 and "generator_layers" in res.stderr and "Traceback" not in res.stderr


def test_electra_discriminator_learns_to_find_the_replaced_tokens(corpus):
    """Fitted to one batch of real text, the discriminator goes from coin flips (a fresh head's logits are
    near 0) to catching the replaced tokens, and flagging almost no original. On a whole corpus this takes
    ~1,000 steps of 4k tokens (docs/pretraining.md), too long for a test; one batch shows the gradient
    reaches the right place."""
    from model import EncoderConfig, ReplacedTokenDetection
    args, shards, batch = electra_batch(corpus, ["--batch-size", "8", "--seq-len", "64"])
    torch.manual_seed(0)
    model = ReplacedTokenDetection(EncoderConfig.preset("tiny", vocab_size=shards.vocab_size, norm="pre", dropout=0,
                                                        attention_dropout=0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    score = lambda: pretrain.evaluate_electra(model, [batch], trainer.Dist("cpu"))
    before = score()
    # 240 steps: by 120 the generator fills most masks with the original token, so recall is taken over a few
    # replacements and swings with the float sums' order (0.62 with one thread, 1.0 with two); from 200 it is 1.0
    for _ in range(240):
        loss = pretrain.lm_loss(model, batch) / batch["num_targets"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = score()
    assert before["rtd_accuracy"] < 0.7 and after["rtd_accuracy"] > 0.98 and after["rtd_recall"] > 0.8, (before, after)
    assert after["rtd_loss"] < before["rtd_loss"] / 10 and after["loss"] < before["loss"] / 10


def test_electra_run_saves_the_discriminators_encoder_which_fine_tunes(corpus, tmp_path):
    """The folder holds the discriminator's encoder alone, in the BERT layout (checkpoint.pt keeps the
    generator and the detection head, to resume), and finetune.py takes it."""
    from model import from_hf_bert
    out = tmp_path / "electra"
    pretrain.main(["--data", str(corpus / "data"), "--model", "tiny", "--objective", "electra", "--seq-len", "64",
                   "--batch-size", "8", "--max-steps", "100", "--lr", "2e-3", "--eval-every", "50", "--eval-batches",
                   "4", "--no-progress", "--log-every", "1", "--dropout", "0", "--out", str(out)])
    evals = [r for r in log_lines(out) if "eval/rtd_loss" in r]
    assert len(evals) == 2 and {"eval/rtd_accuracy", "eval/rtd_recall", "eval/accuracy"} <= set(evals[0])
    train = [r["loss"] for r in log_lines(out) if "loss" in r]
    assert np.mean(train[-20:]) < np.mean(train[:5]) - 1.0, train[::10]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertModel"] and config["plainbert_pretraining"] == "electra"
    encoder = from_hf_bert(str(out), head=None, strict=True)
    ckpt = params(out)
    assert all(torch.equal(v, ckpt["encoder." + k]) for k, v in encoder.state_dict().items())
    import finetune
    tsv = tmp_path / "train.tsv"
    tsv.write_text("sentence\tlabel\n" + "".join(f"{w} film .\t{int(i % 2 == 0)}\n"
                                                 for i, w in enumerate(["a good", "a bad"] * 20)))
    result = finetune.run(["--task", "binary", "--init", str(out), "--train", str(tsv), "--dev", str(tsv),
                           "--max-steps", "60", "--lr", "1e-3", "--out", str(tmp_path / "ft"), "--no-progress"])
    assert result["info"]["init"] == str(out) and result["metrics"]["dev"]["accuracy"] == 1.0, result["metrics"]


def test_electra_flags_bad_input_one_clear_error_each(corpus, tmp_path):
    res = run_cli(["--data", str(corpus / "data"), *TINY, "--generator-layers", "1", "--out", str(tmp_path / "a")])
    assert res.returncode == 2 and "add --objective electra" in res.stderr
    res = run_cli(["--data", str(corpus / "data"), *TINY, "--objective", "electra", "--generator-layers", "3",
                   "--out", str(tmp_path / "b")])
    assert res.returncode == 2 and "--generator-layers 3" in res.stderr and "2 layers" in res.stderr
    res = run_cli(["--data", str(corpus / "data"), *TINY, "--objective", "electra", "--rtd-weight", "0",
                   "--out", str(tmp_path / "c")])
    assert res.returncode == 2 and "positive weight" in res.stderr and "Traceback" not in res.stderr
    assert not any((tmp_path / o).exists() for o in "abc")
