"""Multi-task fine-tuning: the task-sampling formula, one task per step normalised by its own examples, a
real run on SST-2 + STS-B + CoLA slices whose per-task folders predict.py loads, and exact resume."""
import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import finetune
from conftest import ROOT, minilm_dir, require_data
from data.tasks import TaskDataset, sample_binary
from finetuned import FinetuneError, TASKS, load_finetuned, predict_proba
from model import EncoderConfig, MultiTaskClassifier
from multitask import MultiTaskData, TaskSampler, parse_tasks, sampling_probabilities
from predict import Predictor
from test_finetune import FAST                 # tiny_init: a fixture of conftest.py
from trainer import EX_TEMPFAIL, Dist, Parallel, train_step

GLUE_SIZES = [67349, 5749, 8551]          # SST-2, STS-B, CoLA training sets


# -----------------------------------------------------------------------------------------------------
# sampling


def test_sampling_probabilities_follow_the_formula():
    n = np.array(GLUE_SIZES, dtype=float)
    assert np.allclose(sampling_probabilities(n, "proportional"), n / n.sum(), atol=1e-15)
    assert np.allclose(sampling_probabilities(n, "proportional"), [0.82486, 0.07041, 0.10473], atol=1e-5)
    # p_t = n_t^(1/T) / sum_s n_s^(1/T): T = 2 is the square root, T = 1 proportional, large T uniform
    assert np.allclose(sampling_probabilities(n, "temperature", 2.0), np.sqrt(n) / np.sqrt(n).sum(), atol=1e-15)
    assert np.allclose(sampling_probabilities(n, "temperature", 2.0), [0.60662, 0.17723, 0.21615], atol=1e-5)
    assert np.allclose(sampling_probabilities(n, "temperature", 1.0), n / n.sum(), atol=1e-15)
    assert np.allclose(sampling_probabilities(n, "temperature", 1e6), [1 / 3] * 3, atol=1e-5)
    with pytest.raises(FinetuneError, match="--sampling-temperature"):
        sampling_probabilities(n, "temperature", 0.0)


@pytest.mark.parametrize("method, T", [("proportional", 1.0), ("temperature", 2.0), ("temperature", 5.0)])
def test_sampled_task_frequencies_match_the_probabilities(method, T):
    p = sampling_probabilities(GLUE_SIZES, method, T)
    steps = 40_000
    counts = TaskSampler(p, seed=3).counts(steps)
    sigma = np.sqrt(steps * p * (1 - p))                  # binomial standard deviation of each count
    assert counts.sum() == steps and np.all(np.abs(counts - steps * p) < 4 * sigma), (counts, steps * p)


def test_each_task_reads_its_own_batches_in_order_and_the_draw_is_a_pure_function_of_the_step():
    p = sampling_probabilities([50, 30, 20])
    sampler = TaskSampler(p, seed=7)
    seen = {0: [], 1: [], 2: []}
    for step in range(3 * TaskSampler.BLOCK + 17):       # across block boundaries
        t, k = sampler(step)
        seen[t].append(k)
    assert all(ks == list(range(len(ks))) for ks in seen.values())   # 0, 1, 2, ...: no batch skipped or repeated
    assert list(sampler.counts(3 * TaskSampler.BLOCK + 17)) == [len(v) for v in seen.values()]
    fresh = TaskSampler(p, seed=7)                        # a resumed run asks for a late step first
    assert fresh(3 * TaskSampler.BLOCK + 16) == sampler(3 * TaskSampler.BLOCK + 16)
    assert [TaskSampler(p, seed=8)(s)[0] for s in range(50)] != [sampler(s)[0] for s in range(50)]


# -----------------------------------------------------------------------------------------------------
# the loss: one task per step, normalised by that task's real examples


def test_a_step_is_normalised_by_its_own_tasks_examples_and_moves_only_its_head():
    """Two micro-batches of 3 and 5 examples of the regression task: the step moves the shared encoder and
    that task's head exactly as plain SGD on the mean loss of the 8 examples under the single-task model
    (task_model), and leaves the other head untouched."""
    torch.manual_seed(0)
    cfg = EncoderConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, max_position=16, dropout=0.0,
                        attention_dropout=0.0)
    mt = MultiTaskClassifier(cfg, {"sent": 1, "sts": 1})
    ids = [[int(v) for v in np.random.default_rng(i).integers(5, 50, size=3 + i % 4)] for i in range(8)]
    types = [[0] * len(x) for x in ids]
    scores = np.linspace(0, 5, 8)
    sts = TaskDataset(ids, types, scores, batch_size=4, slots=2, seed=0, pad_id=0)
    sts.epoch_batches = lambda epoch: [np.arange(3), np.arange(3, 8)]          # sizes 3 and 5
    sts.batches_per_epoch = 2
    data = MultiTaskData({"sent": sts, "sts": sts}, TaskSampler([0.0, 1.0], seed=0))   # every step: sts
    batches = [data.micro_batch(0, i) for i in range(2)]
    assert [b["task"] for b in batches] == ["sts", "sts"] and [b["num_targets"] for b in batches] == [3, 5]

    inputs = lambda b: {k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    single = copy.deepcopy(mt).task_model("sts")
    mean_loss = sum(TASKS["regression"].loss(single(**inputs(b)), b["labels"]) for b in batches) / 8
    mean_loss.backward()
    expected = {n: p.detach() - 0.5 * p.grad for n, p in single.named_parameters()}

    before_other = mt.heads["sent"].weight.detach().clone()
    loss_fn = lambda model, b: TASKS["regression"].loss(model(**inputs(b), task=b["task"]), b["labels"])
    opt = torch.optim.SGD(mt.parameters(), lr=0.5)
    par = Parallel(mt, mt, mt, fsdp=False)
    loss_sum, n, _, _ = train_step(par, opt, torch.amp.GradScaler("cpu", enabled=False), loss_fn, batches, 0.5, 0,
                                   lambda: torch.autocast("cpu", enabled=False), Dist("cpu"))
    assert int(n) == 8 and torch.allclose(loss_sum / n, mean_loss.detach(), atol=1e-6)
    got = dict(mt.task_model("sts").named_parameters())
    assert all(torch.allclose(got[k], expected[k], atol=1e-6) for k in expected)
    assert torch.equal(mt.heads["sent"].weight, before_other)


# -----------------------------------------------------------------------------------------------------
# end to end


def glue_slices(tmp_path):
    """The first rows of SST-2, STS-B and CoLA (train and dev) as small files; returns --tasks specs."""
    cola = require_data("cola", "cola_public", "raw")
    parts = {"sst2": (require_data("sst2", "train.tsv"), require_data("sst2", "dev.tsv"), 1),
             "stsb": (require_data("stsb", "train.tsv"), require_data("stsb", "dev.tsv"), 1),
             "cola": (cola / "in_domain_train.tsv", cola / "in_domain_dev.tsv", 0)}          # CoLA: no header
    specs = []
    for name, (train, dev, header) in parts.items():
        for split, src, n in (("train", train, 40), ("dev", dev, 24)):
            (tmp_path / f"{name}_{split}.tsv").write_text("\n".join(src.read_text().splitlines()[:n + header]) + "\n")
        kind = "regression" if name == "stsb" else "binary"
        specs.append(f"{name}:{kind}:{tmp_path / f'{name}_train.tsv'}:{tmp_path / f'{name}_dev.tsv'}")
    return specs


def test_minilm_on_sst2_stsb_cola_slices_writes_per_task_metrics_and_heads_predict_loads(tmp_path):
    specs, out = glue_slices(tmp_path), tmp_path / "mt"
    res = finetune.run(["--init", str(minilm_dir()), "--tasks", *specs, "--out", str(out), *FAST,
                        "--max-steps", "6", "--eval-every", "3", "--task-sampling", "temperature"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["step"] for e in metrics["evaluations"]] == [3, 6]
    for e in metrics["evaluations"]:                       # every task's own metric at every evaluation
        assert {"sst2/accuracy", "stsb/spearman", "cola/mcc", "average"} <= set(e)
        assert e["average"] == pytest.approx(np.mean([e["sst2/accuracy"], e["stsb/spearman"], e["cola/mcc"]]))
    assert sum(t["steps"] for t in metrics["tasks"].values()) == 6
    assert metrics["tasks"]["cola"]["metric"] == "mcc" and metrics["tasks"]["stsb"]["train_examples"] == 40
    assert metrics["tasks"]["cola"]["dev"]["mcc"] == metrics["evaluations"][-1]["cola/mcc"]

    mt, tok = res["model"], res["tokenizer"]
    dev_texts = ["a gripping , funny film", "the book was written by him .", "dull and far too long"]
    sts_pairs = (["A man is playing a flute.", "A cat sleeps."], ["A man plays the flute.", "The market fell."])
    for name, texts, pairs in (("sst2", dev_texts, None), ("cola", dev_texts, None), ("stsb", *sts_pairs)):
        info = res["tasks"][name]["info"]
        want = predict_proba(mt.task_model(name), tok, texts, pairs, info)
        got = Predictor([str(out / name)])(texts, pairs)                 # what predict.py and serve.py run
        assert np.allclose(got, want, atol=1e-6), name
        assert json.loads((out / name / "metrics.json").read_text())["name"] == name
    # one encoder: the same encoder weights in every folder; one head per task: different heads
    sst2, cola = load_finetuned(out / "sst2")[0].state_dict(), load_finetuned(out / "cola")[0].state_dict()
    assert all(torch.equal(sst2[k], cola[k]) for k in sst2 if not k.startswith("classifier."))
    assert not torch.equal(sst2["classifier.weight"], cola["classifier.weight"])

    cli = subprocess.run([sys.executable, str(ROOT / "predict.py"), str(out), "a film"], capture_output=True,
                         text=True, cwd=ROOT, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert cli.returncode == 2 and "multi-task output" in cli.stderr and str(out / "sst2") in cli.stderr


def tiny_tasks(tmp_path):
    """A binary task and a regression task over the built-in sample's words (the tiny BERT's vocabulary)."""
    rows = sample_binary(72)
    (tmp_path / "bin.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows[:40]))
    (tmp_path / "sts.tsv").write_text("sentence1\tsentence2\tscore\n" + "".join(
        f"{a}\t{b}\t{i % 6}.0\n" for i, ((a, _), (b, _)) in enumerate(zip(rows[40:], rows[41:]))))
    return [f"bin:binary:{tmp_path / 'bin.tsv'}:{tmp_path / 'bin.tsv'}", f"sts:regression:{tmp_path / 'sts.tsv'}"]


def test_multitask_resume_is_exact(tiny_init, tmp_path, capsys):  # noqa: F811
    """Pre-empted: exit 75 and no per-task folder; a resume with other task sampling is refused by name;
    the true resume ends where the straight run ends."""
    specs = tiny_tasks(tmp_path)
    common = ["--init", str(tiny_init), "--tasks", *specs, *FAST, "--max-steps", "10", "--eval-every", "5",
              "--task-sampling", "temperature", "--sampling-temperature", "3"]
    finetune.run([*common, "--out", str(tmp_path / "straight")])
    assert finetune.main([*common, "--out", str(tmp_path / "split"), "--stop-at-step", "4"]) == EX_TEMPFAIL
    assert not (tmp_path / "split" / "bin").exists() and not (tmp_path / "split" / "metrics.json").exists()
    capsys.readouterr()
    assert finetune.main([*common[:-1], "5", "--out", str(tmp_path / "split"), "--resume"]) == 2
    assert "sampling_temperature (saved: 3.0, now: 5.0)" in capsys.readouterr().err
    finetune.run([*common, "--out", str(tmp_path / "split"), "--resume"])
    load = lambda d: torch.load(tmp_path / d / "checkpoint.pt", weights_only=True)["model"]
    a, b = load("straight"), load("split")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), "parameters differ after resume"
    log = lambda d: [json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
    assert log("straight") == [{**r, "tokens_per_s": x["tokens_per_s"]} if "tokens_per_s" in r else r
                               for r, x in zip(log("split"), log("straight"))]
    m = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("straight", "split")]
    assert m[0]["evaluations"] == m[1]["evaluations"] and [e["step"] for e in m[0]["evaluations"]] == [5, 10]
    assert {n: t["steps"] for n, t in m[0]["tasks"].items()} == {n: t["steps"] for n, t in m[1]["tasks"].items()}


@pytest.mark.parametrize("args, expected", [
    (["--tasks", "a:binary:x.tsv"], "expected two or more tasks"),
    (["--tasks", "a:binary", "b:binary:y.tsv"], "expected NAME:KIND:TRAIN[:DEV]"),
    (["--tasks", "a:simcse:x.tsv", "b:binary:y.tsv"], "the kind 'simcse' must be one of"),
    (["--tasks", "a:binary:x.tsv", "a:binary:y.tsv"], "the name 'a' is given twice"),
    (["--tasks", "A/b:binary:x.tsv", "b:binary:y.tsv"], "must be lower-case letters"),
    (["--tasks", "a:binary:x.tsv", "b:binary:y.tsv", "--train", "z.tsv"], "not combined with --train"),
    (["--tasks", "a:binary:x.tsv", "b:binary:y.tsv", "--task-sampling", "temperature",
      "--sampling-temperature", "-1"], "--sampling-temperature"),
])
def test_bad_multitask_flags_give_one_clear_error(tiny_init, tmp_path, capsys, args, expected):  # noqa: F811
    for name in ("x.tsv", "y.tsv"):
        (tmp_path / name).write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in sample_binary(8)))
    args = [str(tmp_path / a) if a.endswith(".tsv") and ":" not in a else
            ":".join(str(tmp_path / p) if p.endswith(".tsv") else p for p in a.split(":")) for a in args]
    assert finetune.main(["--init", str(tiny_init), "--out", str(tmp_path / "o"), *FAST, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert expected in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_parse_tasks_reads_comma_separated_files():
    a, b = parse_tasks(["cola:binary:tr.tsv:in.tsv,out.tsv", "stsb:regression:s.tsv"])
    assert (a.name, a.kind, a.train, a.dev) == ("cola", "binary", ["tr.tsv"], ["in.tsv", "out.tsv"])
    assert (b.name, b.kind, b.train, b.dev) == ("stsb", "regression", ["s.tsv"], None)


def test_every_task_of_a_multitask_run_learns_past_chance(tiny_init, tmp_path):  # noqa: F811
    """The guard against a run that trains but learns nothing (a head wired to the wrong task, a loss or a
    metric on the wrong rows): a binary task and a regression task on held-out rows, each learnable from
    the sentiment words, and one multi-task run that learns both well past chance (accuracy 0.5, Spearman 0).
    Each task gets ~200 steps at lr 3e-3: what its single-task run needs on the tiny model (alone, 60 steps
    at lr 1e-3 leave both at chance, as 20 steps left all-MiniLM-L6-v2 in README's first smoke test)."""
    rows = sample_binary(400, seed=3)
    tsv = lambda part: "sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in part)
    pairs = lambda part: "sentence1\tsentence2\tscore\n" + "".join(   # the score follows the first sentence
        f"{a}\t{b}\t{1 + 3 * y:.1f}\n" for (a, y), (b, _) in zip(part, part[1:] + part[:1]))
    for name, text in {"bin_train": tsv(rows[:160]), "bin_dev": tsv(rows[160:200]),
                       "sts_train": pairs(rows[200:360]), "sts_dev": pairs(rows[360:])}.items():
        (tmp_path / f"{name}.tsv").write_text(text)
    specs = [f"{n}:{k}:{tmp_path / f'{n}_train.tsv'}:{tmp_path / f'{n}_dev.tsv'}" for n, k in
             (("bin", "binary"), ("sts", "regression"))]
    res = finetune.run(["--init", str(tiny_init), "--tasks", *specs, *FAST, "--max-steps", "400", "--eval-every", "0",
                        "--lr", "3e-3", "--out", str(tmp_path / "mt")])
    tasks = res["metrics"]["tasks"]
    assert 160 <= tasks["bin"]["steps"] <= 240 and tasks["bin"]["steps"] + tasks["sts"]["steps"] == 400
    assert tasks["bin"]["dev"]["accuracy"] >= 0.9, tasks["bin"]["dev"]
    # two gold values (1 and 4), half each: a perfect ranking has Spearman sqrt(3)/2 = 0.866 (ties)
    assert tasks["sts"]["dev"]["spearman"] >= 0.8 and tasks["sts"]["dev"]["pearson"] >= 0.9, tasks["sts"]["dev"]


def test_a_binary_head_trains_at_twice_the_lr_in_a_multitask_run_as_it_does_alone(tiny_init, tmp_path, monkeypatch):  # noqa: F811
    """Binary's one logit steps as transformers' two-logit head at 2x the lr (finetune.HEAD_LR_SCALE); the
    other kinds' heads and the shared encoder at 1x; --head-lr-scale sets every head."""
    import trainer
    seen, real = [], trainer.build_optimizer

    def spy(model, *args, **kw):
        opt = real(model, *args, **kw)
        names = {id(p): n for n, p in model.named_parameters()}
        seen.append({names[id(p)]: g["lr_scale"] for g in opt.param_groups for p in g["params"]})
        return opt
    monkeypatch.setattr(trainer, "build_optimizer", spy)
    specs = tiny_tasks(tmp_path)
    for extra in ([], ["--head-lr-scale", "3"]):
        finetune.run(["--init", str(tiny_init), "--tasks", *specs, *FAST, "--max-steps", "2", *extra,
                      "--out", str(tmp_path / f"o{len(extra)}")])
    kinds = {s.split(":")[0]: s.split(":")[1] for s in specs}
    for scales, head in zip(seen, (lambda kind: 2.0 if kind == "binary" else 1.0, lambda kind: 3.0)):
        heads = {n: s for n, s in scales.items() if n.startswith("heads.")}
        assert heads and all(s == head(kinds[n.split(".")[1]]) for n, s in heads.items()), heads
        assert all(s == 1.0 for n, s in scales.items() if not n.startswith("heads."))
    assert "binary" in kinds.values() and len(set(kinds.values())) > 1, "the point: a binary and another kind"


def test_a_multitask_run_chooses_its_lr_for_its_own_number_of_steps(tiny_init, tmp_path, monkeypatch):  # noqa: F811
    """recipe_lr shrinks a pre-trained model's lr on long schedules: a multi-task run passes it its step count."""
    seen, real = [], finetune.recipe_lr

    def spy(a, task, model, steps):
        seen.append(steps)
        return real(a, task, model, steps)
    monkeypatch.setattr(finetune, "recipe_lr", spy)
    finetune.run(["--init", str(tiny_init), "--tasks", *tiny_tasks(tmp_path), *FAST, "--max-steps", "3",
                  "--out", str(tmp_path / "o")])
    assert seen == [3]
