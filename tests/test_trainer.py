"""trainer.py's pieces as a specification, one at a time (the whole loop is pinned by test_pretrain.py)."""
import math

import pytest

import trainer


def test_lr_warms_up_linearly_from_zero_to_the_peak():
    # step s < warmup gives max_lr (s + 1) / warmup: the first step is already above 0, the last one at the peak
    assert [trainer.lr_at(s, 1.0, 4, 100) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]


def test_linear_decay_reaches_zero_at_max_steps_and_stays_there():
    lrs = [trainer.lr_at(s, 2.0, 10, 110) for s in (10, 60, 110, 200)]
    assert lrs == [2.0, 1.0, 0.0, 0.0]


def test_cosine_decay_passes_half_the_peak_halfway():
    assert trainer.lr_at(10, 1.0, 10, 110, "cosine") == 1.0
    assert trainer.lr_at(60, 1.0, 10, 110, "cosine") == pytest.approx(0.5)
    assert trainer.lr_at(35, 1.0, 10, 110, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert trainer.lr_at(110, 1.0, 10, 110, "cosine") == pytest.approx(0.0)


def test_min_ratio_is_the_floor_of_the_decay():
    assert trainer.lr_at(110, 1.0, 10, 110, "linear", min_ratio=0.1) == pytest.approx(0.1)
    assert trainer.lr_at(60, 1.0, 10, 110, "linear", min_ratio=0.1) == pytest.approx(0.55)
    assert trainer.lr_at(110, 1.0, 10, 110, "cosine", min_ratio=0.1) == pytest.approx(0.1)


def test_constant_schedule_holds_the_peak_after_warm_up():
    assert [trainer.lr_at(s, 3e-4, 2, 10, "constant") for s in (0, 1, 2, 9, 50)] == [1.5e-4, 3e-4, 3e-4, 3e-4, 3e-4]


def test_wsd_holds_the_peak_then_decays_linearly_over_the_last_cooldown_steps():
    # warm-up 10, stable to step 90, cool-down 20: half the peak at 100, 0 at 110 and after
    lrs = [trainer.lr_at(s, 1.0, 10, 110, "wsd", cooldown=20) for s in (0, 9, 10, 50, 89, 90, 100, 105, 110, 200)]
    assert lrs == pytest.approx([0.1, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.25, 0.0, 0.0])
    assert trainer.lr_at(110, 1.0, 10, 110, "wsd", min_ratio=0.1, cooldown=20) == pytest.approx(0.1)


def test_wsd_trained_longer_in_its_stable_phase_keeps_every_past_lr():
    # the point of the stable phase: steps 0-59 have the same lr whether the run ends at 110 or at 500
    short = [trainer.lr_at(s, 1.0, 10, 110, "wsd", cooldown=20) for s in range(90)]
    assert short == [trainer.lr_at(s, 1.0, 10, 500, "wsd", cooldown=20) for s in range(90)]


def test_wsd_sqrt_cools_down_as_one_minus_the_square_root_of_the_progress():
    # the same stable phase as wsd; a quarter of the way into the cool-down the rate is already 1 - 1/2
    lrs = [trainer.lr_at(s, 1.0, 10, 110, "wsd-sqrt", cooldown=20) for s in (9, 89, 90, 95, 100, 110)]
    assert lrs == pytest.approx([1.0, 1.0, 1.0, 0.5, 1 - 0.5 ** 0.5, 0.0])
    wsd, sqrt = ([trainer.lr_at(s, 1.0, 10, 110, name, cooldown=20) for s in range(120)] for name in ("wsd", "wsd-sqrt"))
    assert sqrt[:91] == wsd[:91], "until the cool-down the two are one schedule: a run may switch while stable"
    assert all(b <= a for a, b in zip(wsd, sqrt))
    assert trainer.schedule_steps(trainer.TrainConfig(max_steps=100, schedule="wsd-sqrt", cooldown=0.25)) == (6, 25)


def test_wsd_with_a_cooldown_past_the_warm_up_is_the_linear_schedule():
    assert all(trainer.lr_at(s, 1.0, 10, 110, "wsd", cooldown=500) == trainer.lr_at(s, 1.0, 10, 110)
               for s in range(120))


@pytest.mark.parametrize("cooldown", [0, -3, 200])
def test_wsd_cooldown_that_does_not_fit_the_run_is_one_clear_error(cooldown, tmp_path):
    cfg = trainer.TrainConfig(out=str(tmp_path / "o"), max_steps=100, schedule="wsd", cooldown=cooldown)
    with pytest.raises(trainer.RunError, match=r"--cooldown .*: expected a fraction of --max-steps in \(0, 1\)"):
        trainer.preflight(cfg)
    assert not (tmp_path / "o").exists(), "refused before anything is written"
    assert trainer.schedule_steps(trainer.TrainConfig(max_steps=100, schedule="wsd", cooldown=0.25)) == (6, 25)


def test_no_warm_up_starts_at_the_peak():
    assert trainer.lr_at(0, 1.0, 0, 10) == 1.0
    assert trainer.lr_at(5, 1.0, 0, 10) == pytest.approx(0.5)


def test_early_stopping_stops_after_patience_evaluations_without_a_new_best():
    early = trainer.EarlyStopping("loss", "min", patience=2)
    seen = [(early.update({"loss": v}), early.should_stop) for v in (0.5, 0.4, 0.45, 0.4, 0.3, 0.35, 0.31)]
    assert seen == [(True, False), (True, False), (False, False), (False, True), (True, False), (False, False),
                    (False, True)]                          # equal to the best is no improvement
    assert early.best == 0.3


def test_early_stopping_without_a_metric_never_stops():
    early = trainer.EarlyStopping()
    assert not early.update({"accuracy": 1.0}) and not early.should_stop and early.best is None


def test_the_model_names_its_shard_units():
    import model as M
    m = M.SequenceClassifier(M.EncoderConfig(vocab_size=20, hidden_size=8, num_layers=3, num_heads=2))
    assert M.shard_units(m) == list(m.encoder.blocks)


def test_the_shared_flags_are_generated_from_train_config():
    import argparse
    import dataclasses
    p = trainer.add_training_args(argparse.ArgumentParser(), lr=1e-3)
    assert trainer.TrainConfig.from_args(p.parse_args([])) == trainer.TrainConfig(lr=1e-3)
    args = p.parse_args(["--max-steps", "7", "--amp", "bf16", "--fsdp", "--resume", "--stop-at-step", "3"])
    assert trainer.TrainConfig.from_args(args, out="o") == trainer.TrainConfig(
        out="o", lr=1e-3, max_steps=7, amp="bf16", fsdp=True, resume="auto", stop_at_step=3)
    flags = {a.dest for a in p._actions} - {"help"}
    assert flags == {f.name for f in dataclasses.fields(trainer.TrainConfig)} - {"seq_len"}   # seq_len: no flag


FSDP_EARLY_STOPPING = '''
import json, sys, torch
from model import EncoderConfig, LanguageModel
from trainer import Dist, TrainConfig, train

out = sys.argv[1]
dist_env = Dist(device="cpu")
torch.manual_seed(0)
model = LanguageModel(EncoderConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=2, max_position=16))

class Data:      # next-token-free toy objective: predict every token itself (an identity the model can learn)
    def micro_batch(self, step, index):
        ids = torch.randint(5, 64, (4, 8), generator=torch.Generator().manual_seed(1000 * step + index))
        return {"ids": ids, "num_targets": ids.numel(), "num_tokens": ids.numel()}

def loss_fn(m, b):
    return m(b["ids"], targets=b["ids"].flatten())[1]

held_out = Data().micro_batch(10**6, 0)

def eval_fn(m):  # every rank the same batch, so every rank sees the same metric
    return {"loss": loss_fn(m, held_out).item() / held_out["num_targets"]}

cfg = TrainConfig(out=out, max_steps=6, lr=3e-3, warmup=0, eval_every=2, save_every=0, fsdp=True, batch_size=4,
                  log_every=1, no_progress=True)
result = train(model, loss_fn, Data(), cfg, dist_env, eval_fn=eval_fn, monitor=("loss", "min", 5))
model.eval()
final = eval_fn(model)   # the restored weights, every rank joining the sharded forward
if dist_env.is_main:
    json.dump({"best": result["best"], "final": final}, open(out + "/result.json", "w"))
dist_env.close()
'''


def test_fsdp_early_stopping_saves_and_restores_the_best_weights_on_every_rank(tmp_path):
    """best_model.pt gathers sharded weights, a collective: every rank joins it (rank 0 alone waited forever),
    and putting the best weights back shards them again on every rank."""
    import os
    import subprocess
    import sys
    from test_pretrain import free_port
    script = tmp_path / "fsdp_early_stopping.py"
    script.write_text(FSDP_EARLY_STOPPING)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
                           str(script), str(tmp_path)], env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root),
                          capture_output=True, text=True, timeout=300, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    import json
    result = json.loads((tmp_path / "result.json").read_text())
    evals = [r["eval/loss"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
             if "eval/loss" in r]
    assert len(evals) == 3 and result["best"] == min(evals)
    assert abs(result["final"]["loss"] - result["best"]) < 1e-5          # the best weights are back
    assert (tmp_path / "best_model.pt").is_file()
