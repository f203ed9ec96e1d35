"""The default fine-tuning recipe (finetune.resolve_recipe) as a specification: which learning rate, how many
steps, which checkpoint, for a given training-set size, model and method; and that a run prints it and
saves it in metrics.json. The comparison with a plain transformers loop lives in bench_finetune.py."""
import copy
import json

import numpy as np
import pytest
import torch

import finetune
import trainer
from data.tasks import write_sample_binary
from model import EncoderConfig, LanguageModel, save_hf_bert
from test_finetune import FAST                 # tiny_init: a fixture of conftest.py


class ModelLike(torch.nn.Module):
    """What the recipe reads of a model: its config (width, dropout) and whether its LayerNorms were trained."""

    def __init__(self, width=384, pretrained=True, dropout=0.1):
        super().__init__()
        self.config = EncoderConfig(hidden_size=width, num_heads=1, dropout=dropout, attention_dropout=dropout)
        self.norm = torch.nn.LayerNorm(4)
        if pretrained:
            with torch.no_grad():
                self.norm.weight.mul_(1.1)


def recipe(*flags, n=2000, model=None, has_dev=True, task="binary"):
    a = finetune.build_parser().parse_args(["--task", task, *flags])
    return finetune.resolve_recipe(a, task, n, model or ModelLike(), has_dev)


def steps(n, **kw):
    return recipe(n=n, **kw)[0]["max_steps"]


def test_fresh_weights_are_recognised_as_not_pretrained():
    torch.manual_seed(0)
    model = LanguageModel(EncoderConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, max_position=16))
    assert not finetune.is_pretrained(model)
    with torch.no_grad():
        model.encoder.embed.norm.weight[0] = 1.01
    assert finetune.is_pretrained(model)


@pytest.mark.parametrize("width, pretrained, lr", [
    (128, True, 3e-4),    # BERT-Tiny's width: at 1e-4 a tiny pre-trained here barely leaves one class
    (384, True, 1e-4),    # MiniLM-L6: the plain transformers loop's 1e-4
    (256, True, 3e-4),    # our mini: our short pre-training wants larger steps than MiniLM's
    (768, True, 5e-5),    # BERT-base
    (1024, True, 2e-5),   # BERT-large
    (256, False, 3e-4),   # random weights must move far to leave one class
    (64, False, 1e-3),    # the tiny sample model
])
def test_learning_rate_follows_the_models_width_and_pretraining(width, pretrained, lr):
    r, why = recipe(model=ModelLike(width, pretrained))
    assert r["lr"] == lr and r["pretrained"] == pretrained and f"hidden size {width}" in why["lr"]


@pytest.mark.parametrize("n, pretrained, lr", [
    (8000, True, 1e-4),            # 750 steps: the 8k comparison with the plain loop keeps the table's lr
    (16000, True, 1e-4),           # 1,500 steps: the last that do
    (32000, True, 1e-4 * 0.5 ** 0.5),   # 3,000 steps: sqrt(1,500 / 3,000)
    (67349, True, 5e-5),           # SST-2 in full, 6,315 steps: half (at least half from 6,000 steps on)
    (670000, True, 5e-5),          # never below half
    (67349, False, 3e-4),          # random weights: no evidence that long runs want less, the table's lr
])
def test_a_pretrained_models_long_schedule_takes_a_smaller_learning_rate(n, pretrained, lr):
    r, why = recipe(n=n, model=ModelLike(pretrained=pretrained))
    assert r["lr"] == pytest.approx(lr, rel=1e-12)
    assert ("long run" in why["lr"]) == (lr < 1e-4 and pretrained)
    assert recipe("--lr", "1e-4", n=n, model=ModelLike(pretrained=pretrained))[0]["lr"] == 1e-4   # a flag wins
    assert recipe("--method", "lora", n=n)[0]["lr"] == finetune.METHODS["lora"].lr                # PEFT keeps its own


def test_peft_methods_and_simcse_keep_their_own_learning_rates():
    assert recipe("--method", "lora")[0]["lr"] == finetune.METHODS["lora"].lr
    assert recipe("--method", "bitfit")[0]["lr"] == finetune.METHODS["bitfit"].lr
    assert recipe(task="simcse")[0]["lr"] == finetune.SIMCSE_LR


@pytest.mark.parametrize("n, pretrained, expected_steps, expected_epochs", [
    (1000, True, 315, 5),         # 63 steps of 16 an epoch: 5 epochs reach 300 steps
    (2000, True, 375, 3),         # 125 of 16 an epoch: 3 epochs
    (8000, True, 750, 3),         # 250 of 32 an epoch: 3 epochs already pass 300
    (67349, True, 6315, 3),       # SST-2 in full: 3 epochs
    (1000, False, 630, 10),       # random weights: at least 600 steps
    (100, True, 140, 20),         # 7 steps an epoch: capped at 20 epochs
])
def test_small_sets_get_more_epochs_until_a_minimum_number_of_steps(n, pretrained, expected_steps, expected_epochs):
    r, why = recipe(n=n, model=ModelLike(pretrained=pretrained))
    assert (r["max_steps"], r["epochs"]) == (expected_steps, expected_epochs)
    assert f"{expected_epochs} epochs" in why["max_steps"]


@pytest.mark.parametrize("n, flags, task, batch_size", [
    (2000, [], "binary", 16),            # SST-2's first 2,000: twice the steps an epoch of 32
    (3999, [], "pair", 16),
    (4000, [], "binary", 32),            # from SMALL_SET[0] on: transformers' 32
    (67349, [], "binary", 32),
    (2000, ["--batch-size", "32"], "binary", 32),   # a flag wins
    (2000, [], "simcse", 64),            # in-batch negatives: SimCSE's own
])
def test_small_sets_train_in_batches_of_sixteen(n, flags, task, batch_size):
    r, why = recipe(*flags, n=n, task=task)
    assert r["batch_size"] == batch_size
    assert ("fewer than 4,000" in why["batch_size"]) == (batch_size == 16)


def test_the_small_set_rule_counts_only_the_examples_that_train():
    assert recipe(n=4400, has_dev=False)[0]["batch_size"] == 16     # 440 held out: 3,960 train


def test_the_recipes_batch_size_is_what_the_loop_trains_with(tiny_init, tmp_path, monkeypatch):  # noqa: F811
    seen = []
    monkeypatch.setattr(finetune, "train", lambda model, loss, data, cfg, *args, **kw: seen.append(cfg.batch_size) or 1 / 0)
    train, _ = write_sample_binary(tmp_path / "data", n_train=240, n_dev=24)
    quiet = ["--no-progress", "--save-every", "0", "--max-steps", "2"]
    for flags in ([], ["--batch-size", "8"]):
        with pytest.raises(ZeroDivisionError):
            finetune.run(["--init", str(tiny_init), "--train", str(train), "--out", str(tmp_path / "out"), *quiet, *flags])
    assert seen == [16, 8]


def test_a_one_logit_binary_head_at_twice_the_lr_steps_as_a_two_logit_softmax_head():
    """transformers' binary head: logits z0, z1 and softmax cross-entropy; ours: one logit (the margin
    z1 - z0) and BCE. Started from the same margin, with the head at HEAD_LR_SCALE["binary"] x the lr,
    AdamW takes the same steps: the same losses, the same encoder, and our head = w1 - w0, b1 - b0."""
    torch.manual_seed(0)
    C, lr, steps = 8, 1e-2, 30
    two = torch.nn.ModuleDict({"encoder": torch.nn.Linear(C, C), "classifier": torch.nn.Linear(C, 2)}).double()
    one = torch.nn.ModuleDict({"encoder": torch.nn.Linear(C, C), "classifier": torch.nn.Linear(C, 1)}).double()

    def margin_of(two):       # the two-logit head as one logit: (w1 - w0, b1 - b0)
        return two.classifier.weight[1:] - two.classifier.weight[:1], two.classifier.bias[1:] - two.classifier.bias[:1]

    def run(one, scale):
        with torch.no_grad():
            one.encoder.load_state_dict(two.encoder.state_dict())
            for mine, theirs in zip((one.classifier.weight, one.classifier.bias), margin_of(two)):
                mine.copy_(theirs)
        return trainer.build_optimizer(one, lr, weight_decay=0.0, lr_scales={"classifier.": scale})

    opt_two = trainer.build_optimizer(two, lr, weight_decay=0.0)
    opt_one = run(one, finetune.HEAD_LR_SCALE["binary"])
    control = copy.deepcopy(one)
    opt_control = run(control, 1.0)           # the same head at the encoder's lr drifts away
    for step in range(steps):
        x, y = torch.randn(16, C, dtype=torch.float64), torch.randint(0, 2, (16,))
        for opt in (opt_two, opt_one, opt_control):
            trainer.set_lr(opt, lr * (1 - step / steps))          # a decaying schedule, as train_step sets it
            opt.zero_grad()
        loss_two = torch.nn.functional.cross_entropy(two.classifier(torch.tanh(two.encoder(x))), y)
        loss_one, loss_control = (torch.nn.functional.binary_cross_entropy_with_logits(
            m.classifier(torch.tanh(m.encoder(x))).squeeze(-1), y.double()) for m in (one, control))
        for loss, opt in ((loss_two, opt_two), (loss_one, opt_one), (loss_control, opt_control)):
            loss.backward()
            opt.step()
        assert torch.allclose(loss_one, loss_two, rtol=1e-10, atol=0)
    w, b = margin_of(two)
    assert torch.allclose(one.classifier.weight, w, atol=1e-12) and torch.allclose(one.classifier.bias, b, atol=1e-12)
    assert torch.allclose(one.encoder.weight, two.encoder.weight, atol=1e-12)
    assert (control.classifier.weight - w).abs().max() > 1e-2       # at 1x it does not match


@pytest.mark.parametrize("task, scale", [("binary", 2.0), ("multiclass", 1.0), ("regression", 1.0)])
def test_only_the_one_logit_binary_head_trains_faster_than_the_encoder(task, scale):
    r, why = recipe(task=task)
    assert r["head_lr_scale"] == scale and (task != "binary" or "two-logit softmax" in why["head_lr_scale"])
    assert recipe("--head-lr-scale", "1", task=task)[0]["head_lr_scale"] == 1.0


def test_the_head_lr_scale_reaches_the_optimizer_and_the_schedule():
    model = torch.nn.ModuleDict({"encoder": torch.nn.Linear(4, 4), "classifier": torch.nn.Linear(4, 1)})
    opt = trainer.build_optimizer(model, 1e-4, lr_scales={"classifier.": 2.0})
    trainer.set_lr(opt, 5e-5)
    head = {id(p) for p in model["classifier"].parameters()}
    for group in opt.param_groups:
        in_head = {id(p) in head for p in group["params"]}
        assert len(in_head) == 1 and group["lr"] == (1e-4 if in_head == {True} else 5e-5)
        assert group["weight_decay"] == (0.01 if group["params"][0].ndim == 2 else 0.0)


def test_layer_decay_trains_each_encoder_layer_at_xi_times_the_lr_of_the_one_above(tiny_init, tmp_path, monkeypatch):  # noqa: F811
    """--layer-decay 0.8 on a 2-block encoder: block 1 (the top) at the lr, block 0 at 0.8x, the embeddings at
    0.64x; the pooler at 1x and binary's head at its 2x; what finetune.run hands the optimizer."""
    seen = []
    monkeypatch.setattr(finetune, "train", lambda model, *args, **kw: seen.append((model, kw["lr_scales"])) or 1 / 0)
    train, _ = write_sample_binary(tmp_path / "data", n_train=240, n_dev=24)
    for flags in ([], ["--layer-decay", "0.8"]):
        with pytest.raises(ZeroDivisionError):
            finetune.run(["--init", str(tiny_init), "--train", str(train), "--out", str(tmp_path / "out"), *FAST, *flags])
    expected = {"encoder.embed": 0.64, "encoder.blocks.0": 0.8, "encoder.blocks.1": 1.0, "pooler": 1.0, "classifier": 2.0}
    for (model, scales), decay in zip(seen, (1.0, 0.8)):
        assert len(model.encoder.blocks) == 2
        opt = trainer.build_optimizer(model, 1.0, lr_scales=scales)
        lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
        for name, p in model.named_parameters():
            part = next(k for k in expected if name.startswith(k))
            want = expected[part] if decay != 1 or part == "classifier" else 1.0
            assert lr_of[id(p)] == pytest.approx(want, rel=1e-12), name
    assert recipe("--layer-decay", "0.8")[0]["layer_decay"] == 0.8 and recipe()[0]["layer_decay"] == 1.0


@pytest.mark.parametrize("value", ["0", "1.5", "-0.9"])
def test_a_layer_decay_outside_zero_to_one_is_one_clear_error(value):
    a = finetune.build_parser().parse_args(["--layer-decay", value])
    with pytest.raises(finetune.FinetuneError, match=r"--layer-decay: expected a factor in \(0, 1\]"):
        finetune.check_args(a)


def test_flags_given_win_over_the_recipe():
    r, why = recipe("--lr", "3e-5", "--epochs", "2", "--dropout", "0.2")
    assert (r["lr"], r["max_steps"], r["epochs"], r["dropout"]) == (3e-5, 250, 2, 0.2)
    assert (why["lr"], why["max_steps"], why["dropout"]) == ("--lr", "--epochs 2", "--dropout")
    assert recipe("--max-steps", "7", "--epochs", "2")[0]["max_steps"] == 7


def test_sentence_classification_does_not_clip_by_default_as_the_plain_loop(tiny_init, tmp_path, monkeypatch):  # noqa: F811
    """Clipping at norm 1 cost 0.1-0.4 points against the plain transformers loop on 2k-example sets (README,
    7 seeds), so the recipe leaves the gradient alone; --clip wins; token tagging, QA and multi-task keep
    transformers Trainer's 1.0. And the choice is what the loop gets."""
    r, why = recipe()
    assert r["clip"] == 0.0 and "no gradient clipping" in why["clip"]
    assert recipe("--clip", "0.5")[0]["clip"] == 0.5 and recipe("--clip", "0.5")[1]["clip"] == "--clip"
    for task in ("token", "qa"):
        assert finetune.clip_or(finetune.build_parser().parse_args(["--task", task])) == 1.0
    seen = []
    monkeypatch.setattr(finetune, "train", lambda model, loss, data, cfg, *args, **kw: seen.append(cfg.clip) or 1 / 0)
    train, _ = write_sample_binary(tmp_path / "data", n_train=240, n_dev=24)
    for flags in ([], ["--clip", "2"]):
        with pytest.raises(ZeroDivisionError):
            finetune.run(["--init", str(tiny_init), "--train", str(train), "--out", str(tmp_path / "out"), *FAST, *flags])
    assert seen == [0.0, 2.0]


def test_a_checkpoint_pretrained_without_dropout_fine_tunes_with_some():
    assert recipe(model=ModelLike(dropout=0.0))[0]["dropout"] == finetune.FINETUNE_DROPOUT
    assert recipe(model=ModelLike(dropout=0.2))[0]["dropout"] == 0.2


def test_checkpoint_selection_on_dev_says_it_is_optimistic_and_without_dev_holds_out_train():
    r, why = recipe(n=2000, has_dev=True)
    assert r["select"] == "dev" and r["heldout"] == 0 and "optimistic" in why["select"]
    r, why = recipe(n=2000, has_dev=False)
    assert r["select"] == "heldout" and r["heldout"] == 200 and "no dev set" in why["select"]
    assert r["max_steps"] == 3 * 113            # the recipe counts the 1,800 that train: 113 steps of 16 an epoch
    assert recipe(n=50000, has_dev=False)[0]["heldout"] == 1000        # clamped
    assert recipe(n=1000, has_dev=False)[0]["heldout"] == 100
    r, why = recipe(n=150, has_dev=False)                                # too few to hold any out
    assert r["select"] == "last" and "too few" in why["select"]
    assert recipe("--select", "heldout", n=2000)[0]["heldout"] == 200    # fair dev: ask for it
    assert recipe("--select", "last")[0]["select"] == "last"
    with pytest.raises(finetune.FinetuneError, match="--select dev: needs a dev set"):
        recipe("--select", "dev", has_dev=False)


def test_evaluation_every_epoch_but_at_most_twenty_times():
    assert recipe(n=2000)[0]["eval_every"] == 125
    assert recipe(n=8000)[0]["eval_every"] == 250
    assert recipe(n=100)[0]["eval_every"] == 7
    assert recipe("--eval-every", "5")[0]["eval_every"] == 5


def test_a_run_prints_its_recipe_and_saves_it_in_metrics_json(tiny_init, tmp_path, capsys):  # noqa: F811
    train, dev = write_sample_binary(tmp_path / "data", n_train=240, n_dev=24)
    out = tmp_path / "out"
    res = finetune.run(["--init", str(tiny_init), "--train", str(train), "--out", str(out), *FAST, "--max-steps", "4"])
    said = capsys.readouterr().out
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["recipe"] == res["metrics"]["recipe"] and saved["recipe"]["select"] == "heldout"
    assert saved["recipe"]["heldout"] == 100 and saved["train_examples"] == 140
    assert "no dev set given: 100 training examples held out" in said
    for name, value in saved["recipe"].items():         # every choice printed with its reason
        assert f"  {name:<13} {value!s:<12} {saved['recipe_why'][name]}" in said
    assert saved["heldout_best"]["accuracy"] == saved["best"]


def test_selection_on_dev_keeps_the_last_weights_score_beside_it(tiny_init, tmp_path):  # noqa: F811
    train, dev = write_sample_binary(tmp_path / "data", n_train=64, n_dev=24)
    res = finetune.run(["--init", str(tiny_init), "--train", str(train), "--dev", str(dev), "--out",
                        str(tmp_path / "out"), *FAST, "--max-steps", "6", "--eval-every", "2"])
    m = res["metrics"]
    assert m["recipe"]["select"] == "dev" and m["dev"]["accuracy"] == m["best"] >= m["dev_last"]["accuracy"]


def test_seeds_runs_each_seed_and_reports_median_and_spread(tiny_init, tmp_path, capsys):  # noqa: F811
    train, dev = write_sample_binary(tmp_path / "data", n_train=64, n_dev=24)
    out = tmp_path / "out"
    assert finetune.main(["--init", str(tiny_init), "--train", str(train), "--dev", str(dev), "--out", str(out),
                          *FAST, "--max-steps", "3", "--seeds", "3", "--seed", "5"]) == 0
    summary = json.loads((out / "seeds.json").read_text())
    runs = [json.loads((out / f"seed{s}" / "metrics.json").read_text())["dev"]["accuracy"] for s in (5, 6, 7)]
    assert summary["runs"] == {"5": runs[0], "6": runs[1], "7": runs[2]}
    assert summary["median"] == sorted(runs)[1] and (summary["min"], summary["max"]) == (min(runs), max(runs))
    assert "3 seeds, dev accuracy: median" in capsys.readouterr().out


def test_batches_are_random_by_default_and_length_sorted_on_request():
    r, why = recipe()
    assert r["length_bucket"] == 1 and "random batches" in why["length_bucket"]
    assert recipe("--length-bucket", "50")[0]["length_bucket"] == 50


def test_length_bucket_sorts_within_chunks_and_one_means_random_batches():
    from data.tasks import TaskDataset
    lengths = np.random.default_rng(0).integers(3, 60, 256)
    ids = [[5] * int(n) for n in lengths]
    sorted_ = TaskDataset(ids, [[0] * len(x) for x in ids], None, 16, 1, 0, 0, bucket=100).epoch_batches(0)
    random_ = TaskDataset(ids, [[0] * len(x) for x in ids], None, 16, 1, 0, 0, bucket=1).epoch_batches(0)
    spread = lambda batches: np.mean([np.ptp(lengths[b]) for b in batches])    # length range inside a batch
    assert spread(sorted_) < 5 < 30 < spread(random_)
    assert sorted(np.concatenate(random_)) == list(range(256))                   # each example once an epoch
