"""optim.Adafactor as a specification: the same steps as torch.optim.Adafactor where the two definitions agree,
momentum as an average of the plain updates, factored state of n + m numbers per n x m matrix."""
import copy

import pytest
import torch

import trainer
from model import EncoderConfig, LanguageModel
from optim import Adafactor, state_bytes


def tiny_lm(seed=0):
    torch.manual_seed(seed)
    return LanguageModel(EncoderConfig.preset("tiny", vocab_size=300, dropout=0.0, attention_dropout=0.0))


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(5, 300, (4, 24), generator=g) for _ in range(n)]


def groups(model, wd):
    params = list(model.parameters())
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": wd},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def clm_loss(model, ids):
    # summed, not averaged, cross-entropy: every matrix's mean squared gradient then stays far above torch's
    # eps1 (1.19e-7), where torch clamps and the paper adds (docs/optimization.md lists the differences)
    return model(ids[:, :-1], targets=ids[:, 1:].reshape(-1))[1]


@pytest.mark.parametrize("schedule", ["constant", "warmup-decay"])
def test_adafactor_matches_torch_adafactor_step_for_step(schedule):
    """Relative step, parameter scaling, beta2_t = 1 - t^-0.8, update clipping at d = 1, decoupled weight
    decay, no first moment: torch.optim.Adafactor's definition, on a tiny encoder for 25 steps."""
    ours_model, ref_model = tiny_lm(), tiny_lm()
    # torch clamps g^2 from below at eps^2 (eps = 1.19e-7, fp32's spacing at 1), the paper adds eps1 (1e-30):
    # adding eps^2 agrees with the clamp far above and far below it, and the key bias, whose gradient is 0 up
    # to rounding (softmax ignores a shift shared by all keys), lies far below it
    ours = Adafactor(groups(ours_model, 0.01), lr=1e-2, eps1=torch.finfo(torch.float32).eps ** 2)
    ref = torch.optim.Adafactor(groups(ref_model, 0.01), lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0,
                                foreach=False)
    worst = 0.0
    for step, ids in enumerate(batches(25)):
        lr = 1e-2 if schedule == "constant" else trainer.lr_at(step, 2e-2, 5, 25)   # above 1/sqrt(t) at first
        for model, opt in ((ours_model, ours), (ref_model, ref)):
            for group in opt.param_groups:
                group["lr"] = lr
            clm_loss(model, ids).backward()
            opt.step()
            opt.zero_grad()
        for (name, a), b in zip(ours_model.named_parameters(), ref_model.parameters()):
            worst = max(worst, (a - b).abs().max().item())
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), (step, name, (a - b).abs().max().item())
    moved = max((a - b).abs().max().item() for a, b in zip(ours_model.parameters(), tiny_lm().parameters()))
    assert moved > 1e-2, "the parameters must actually have moved for the comparison to mean something"
    assert worst < 1e-5


def test_adafactor_keeps_row_and_column_statistics_not_a_full_second_moment():
    model = tiny_lm()
    opt = Adafactor(groups(model, 0.0), lr=1e-2)
    clm_loss(model, batches(1)[0]).backward()
    opt.step()
    qkv = model.encoder.blocks[0].attn.qkv.weight                         # (384, 128)
    state = opt.state[qkv]
    assert set(state) == {"step", "row", "col"}
    assert state["row"].shape == (384,) and state["col"].shape == (128,)
    assert set(opt.state[model.encoder.blocks[0].attn.qkv.bias]) == {"step", "v"}     # vectors: not factored
    other = tiny_lm()
    adamw = trainer.build_optimizer(other, 1e-3, impl="plain")
    clm_loss(other, batches(1)[0]).backward()
    adamw.step()
    n_params = sum(p.numel() for p in model.parameters())
    vectors = sum(p.numel() for p in model.parameters() if p.ndim < 2)
    matrices = [p for p in model.parameters() if p.ndim >= 2]
    assert state_bytes(opt) == 4 * (vectors + sum(p.shape[0] + p.shape[1] for p in matrices))
    assert state_bytes(adamw) >= 8 * n_params and state_bytes(opt) < state_bytes(adamw) / 20


def test_adafactor_momentum_is_the_running_average_of_the_plain_updates():
    """With an absolute step (no parameter scaling) the plain update depends on the gradients alone, so
    beta1 = 0.9 must move the weights by the exponential average of the beta1 = None moves."""
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(6, 5, generator=g) for _ in range(8)]
    plain_w, mom_w = torch.nn.Parameter(torch.zeros(6, 5)), torch.nn.Parameter(torch.zeros(6, 5))
    plain = Adafactor([plain_w], lr=0.1, relative_step=False, scale_parameter=False)
    mom = Adafactor([mom_w], lr=0.1, beta1=0.9, relative_step=False, scale_parameter=False)
    avg = torch.zeros(6, 5)
    for grad in grads:
        before_p, before_m = plain_w.detach().clone(), mom_w.detach().clone()
        plain_w.grad, mom_w.grad = grad.clone(), grad.clone()
        plain.step()
        mom.step()
        avg = 0.9 * avg + 0.1 * (before_p - plain_w.detach())
        assert torch.allclose(before_m - mom_w.detach(), avg, atol=1e-7)


def test_update_clipping_bounds_the_rms_of_every_step():
    """A vector's first step has V_hat = g^2 + eps1, so U = sign(g): RMS 1, left alone by d = 1, and an
    absolute step of lr moves every entry by exactly lr. A matrix's rank-1 V_hat gives an RMS above 1,
    which clipping brings back to d exactly."""
    g = torch.Generator().manual_seed(0)
    v = torch.nn.Parameter(torch.zeros(7))
    v.grad = torch.randn(7, generator=g)
    Adafactor([v], lr=0.05, relative_step=False, scale_parameter=False).step()
    assert torch.allclose(v.detach(), -0.05 * v.grad.sign(), atol=1e-7)
    grad = torch.randn(5, 4, generator=g) * torch.tensor([1.0, 10.0, 0.1, 3.0])    # far from rank 1
    moves = {}
    for d in (1.0, 1e9):
        w = torch.nn.Parameter(torch.zeros(5, 4))
        w.grad = grad.clone()
        Adafactor([w], lr=0.05, relative_step=False, scale_parameter=False, clip_threshold=d).step()
        moves[d] = -w.detach()
    rms = lambda x: x.pow(2).mean().sqrt().item()
    assert rms(moves[1e9]) > 0.05 * 1.2                                    # unclipped: RMS(U) > 1
    assert abs(rms(moves[1.0]) - 0.05) < 1e-7                              # clipped to d = 1
    assert torch.allclose(moves[1.0] / rms(moves[1.0]), moves[1e9] / rms(moves[1e9]), atol=1e-6)   # same direction


def test_optimizer_flag_builds_adafactor_and_resumes_its_state(tmp_path):
    model = tiny_lm()
    opt = trainer.build_optimizer(model, 1e-2, name="adafactor")
    assert isinstance(opt, Adafactor)
    for ids in batches(3):
        clm_loss(model, ids).backward()
        opt.step()
        opt.zero_grad()
    trainer.atomic_save({"optimizer": opt.state_dict()}, str(tmp_path / "o.pt"))
    clone = copy.deepcopy(model)
    again = trainer.build_optimizer(clone, 1e-2, name="adafactor")
    again.load_state_dict(torch.load(tmp_path / "o.pt", weights_only=True)["optimizer"])
    ids = batches(1, seed=9)[0]
    for m, o in ((model, opt), (clone, again)):
        clm_loss(m, ids).backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), clone.parameters()))


def test_bench_measures_optimizer_state_of_adamw_and_adafactor():
    """bench.py's optimizer_state_mib: AdamW keeps m and v (8 bytes per weight); Adafactor a row and a
    column statistic per matrix and a full one per vector."""
    import bench
    model = tiny_lm()
    sizes = bench.optimizer_state_mib(model)
    n = sum(p.numel() for p in model.parameters())
    factored = sum(p.shape[0] + p.shape[1] if p.ndim >= 2 else p.numel() for p in model.parameters())
    assert abs(sizes["adamw"] - 8 * n / 2**20) < 2e-3            # (+ one 4-byte step count per tensor)
    assert sizes["adafactor"] == round(4 * factored / 2**20, 3)
    assert all(p.grad is None for p in model.parameters()), "the measurement works on a copy"
