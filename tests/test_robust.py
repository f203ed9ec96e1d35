"""R-Drop, contrastive (losses.py, end) and adversarial losses (adversarial.py) as a specification: each equals a direct
computation and passes float64 gradcheck; gathering across ranks gives the single-process loss and exact
gradients; adversarial perturbations stay in the eps-ball, are zero on padding, raise the loss, and the
returned loss trains the model through the shared training loop."""
import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import adversarial
import losses
import peft
import trainer
from model import EncoderConfig, SequenceClassifier


def double(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64, requires_grad=True)


# -----------------------------------------------------------------------------------------------------
# R-Drop


def test_symmetric_kl_is_the_mean_of_both_kl_directions():
    a, b = double(6, 5, seed=0), double(6, 5, seed=1)
    log_p, log_q = F.log_softmax(a, -1), F.log_softmax(b, -1)
    kl_pq = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)   # KL(p || q)
    kl_qp = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
    assert torch.allclose(losses.symmetric_kl(a, b, reduction="none"), 0.5 * (kl_pq + kl_qp))
    assert torch.allclose(losses.symmetric_kl(a, b), 0.5 * (kl_pq + kl_qp).sum())
    assert losses.symmetric_kl(a, a).item() == 0.0


def test_symmetric_kl_gradcheck():
    assert torch.autograd.gradcheck(lambda a, b: losses.symmetric_kl(a, b), (double(4, 3, seed=0), double(4, 3, seed=1)))


# -----------------------------------------------------------------------------------------------------
# InfoNCE (SimCSE) and the supervised contrastive loss


def test_info_nce_equals_cross_entropy_over_cosine_similarities():
    z1, z2, tau = double(8, 6, seed=0), double(8, 6, seed=1), 0.05
    sim = F.cosine_similarity(z1[:, None, :], z2[None, :, :], dim=-1) / tau       # (8, 8)
    for reduction in ("sum", "mean", "none"):
        expected = F.cross_entropy(sim, torch.arange(8), reduction=reduction)
        assert torch.allclose(losses.info_nce(z1, z2, tau, reduction=reduction), expected)


def test_info_nce_gradcheck():
    assert torch.autograd.gradcheck(lambda a, b: losses.info_nce(a, b, 0.5), (double(5, 4, seed=0), double(5, 4, seed=1)))


def supcon_by_loops(z, labels, tau):
    z = F.normalize(z, dim=-1)
    total, anchors = 0.0, 0
    for i in range(len(z)):
        others = [a for a in range(len(z)) if a != i]
        positives = [p for p in others if labels[p] == labels[i]]
        if not positives:
            continue
        denominator = torch.logsumexp(torch.stack([z[i] @ z[a] / tau for a in others]), 0)
        total = total - sum(z[i] @ z[p] / tau - denominator for p in positives) / len(positives)
        anchors += 1
    return total, anchors


def test_supervised_contrastive_equals_the_loop_definition_and_skips_lonely_anchors():
    z, labels, tau = double(7, 5), torch.tensor([0, 1, 0, 2, 1, 0, 3]), 0.1   # labels 2 and 3: no positive
    total, anchors = supcon_by_loops(z, labels, tau)
    assert anchors == 5
    assert torch.allclose(losses.supervised_contrastive(z, labels, tau), total)
    assert torch.allclose(losses.supervised_contrastive(z, labels, tau, reduction="mean"), total / anchors)
    per = losses.supervised_contrastive(z, labels, tau, reduction="none")
    assert per[3].item() == 0.0 and per[6].item() == 0.0


def test_supervised_contrastive_gradcheck_and_no_nan_without_positives():
    labels = torch.tensor([0, 1, 0, 1, 2])
    assert torch.autograd.gradcheck(lambda z: losses.supervised_contrastive(z, labels, 0.5), (double(5, 3),))
    z = double(1, 3)
    loss = losses.supervised_contrastive(z, torch.tensor([0]), reduction="mean")
    loss.backward()
    assert loss.item() == 0.0 and torch.isfinite(z.grad).all()


def test_gather_with_grad_without_distributed_is_the_identity():
    z = double(3, 2)
    assert losses.gather_with_grad(z) == (z, 0)


def _info_nce_rank(rank, world, init_file, z1, z2, sizes, results):
    import torch.distributed as dist
    torch.set_num_threads(1)                              # a forked child: no thread pool inherited
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    start = sum(sizes[:rank])
    a = z1[start: start + sizes[rank]].clone().requires_grad_()
    b = z2[start: start + sizes[rank]].clone().requires_grad_()
    loss = losses.info_nce(a, b, temperature=0.3)
    loss.backward()
    results[rank] = (loss.detach(), a.grad, b.grad)
    dist.destroy_process_group()


def test_info_nce_across_two_ranks_equals_one_process_with_exact_gradients(tmp_path):
    """Ranks of 3 and 2 rows: the per-rank losses sum to the loss of all 5 rows in one process, and each
    rank's rows get the gradient of that total, including what the other rank's anchors contribute."""
    z1, z2, sizes = torch.randn(5, 4), torch.randn(5, 4), [3, 2]
    with mp.Manager() as manager:
        results = manager.dict()
        mp.start_processes(_info_nce_rank, args=(2, str(tmp_path / "init"), z1, z2, sizes, results), nprocs=2,
                           start_method="fork")
        results = dict(results)
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    full = losses.info_nce(a, b, temperature=0.3)
    full.backward()
    assert torch.allclose(results[0][0] + results[1][0], full, atol=1e-5)
    assert torch.allclose(torch.cat([results[0][1], results[1][1]]), a.grad, atol=1e-5)
    assert torch.allclose(torch.cat([results[0][2], results[1][2]]), b.grad, atol=1e-5)


# -----------------------------------------------------------------------------------------------------
# adversarial training


def tiny_classifier(seed=0):
    torch.manual_seed(seed)
    cfg = EncoderConfig(vocab_size=40, hidden_size=16, num_layers=2, num_heads=2, dropout=0.0, attention_dropout=0.0)
    return SequenceClassifier(cfg, num_labels=2).double().eval()


def tiny_batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 40, (4, 6), generator=g)
    mask = torch.ones(4, 6, dtype=torch.long)
    mask[1, 3:] = 0
    mask[3, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
            "labels": torch.tensor([0, 1, 1, 0])}


def ce_of(batch):
    return lambda logits: losses.cross_entropy(logits, batch["labels"], reduction="sum")


class Wrapped(nn.Module):
    """Stands in for DDP: the model behind `.module`, reached by trainer.unwrap."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def perturbations_seen(model, batch, call):
    """Every delta the encoder was run with: the embeddings it was given minus the clean embeddings."""
    clean = model.encoder.embed(batch["input_ids"], batch["token_type_ids"]).detach()
    seen = []
    hook = model.encoder.register_forward_pre_hook(
        lambda module, args: seen.append(args[3].detach() - clean) if args[3] is not None else None)
    try:
        call()
    finally:
        hook.remove()
    return seen


@pytest.mark.parametrize("method", adversarial.ADVERSARIAL_METHODS)
def test_perturbations_stay_in_the_eps_ball_and_are_zero_on_padding(method):
    model, b, eps = tiny_classifier(), tiny_batch(), 0.3
    seen = perturbations_seen(model, b, lambda: adversarial.adversarial_loss(
        Wrapped(model), b, ce_of(b), method=method, eps=eps, alpha=0.5, steps=4))   # alpha > eps: projection works
    seen = [d for d in seen if d.abs().sum() > 0]       # the clean pass has delta = 0
    assert len(seen) == {"fgm": 1, "pgd": 4 + 1, "freelb": 4}[method]
    padding = b["attention_mask"] == 0
    for delta in seen:
        assert (delta.flatten(1).norm(dim=1) <= eps + 1e-6).all()
        assert (delta[padding] == 0).all()
    if method == "fgm":                                  # one step right to the sphere
        assert torch.allclose(seen[0].flatten(1).norm(dim=1), torch.full((4,), eps, dtype=torch.float64))


def test_fgm_increases_the_loss():
    model, b = tiny_classifier(), tiny_batch()
    clean = ce_of(b)(model(b["input_ids"], b["attention_mask"], b["token_type_ids"]))
    total = adversarial.adversarial_loss(model, b, ce_of(b), method="fgm", eps=0.5)
    assert total - clean > clean


@pytest.mark.parametrize("tuning", ["full", "lora"])
@pytest.mark.parametrize("method", adversarial.ADVERSARIAL_METHODS)
def test_adversarial_loss_backpropagates_into_the_trainable_parameters(method, tuning):
    """With LoRA the embeddings are frozen: the perturbation is still found, and only A, B and the head learn."""
    model, b = tiny_classifier(), tiny_batch()
    peft.apply_peft(model, tuning, lora_r=2)
    model.double()
    loss = adversarial.adversarial_loss(Wrapped(model), b, ce_of(b), method=method, eps=0.1)
    assert all(p.grad is None for p in model.parameters())   # no backward inside
    loss.backward()
    assert all((p.grad is not None) == p.requires_grad for p in model.parameters())
    if tuning == "full":
        assert model.encoder.embed.tok.weight.grad.abs().sum() > 0


def test_pgd_attack_under_no_grad_returns_bounded_embeddings_and_leaves_grads_alone():
    model, b, eps = tiny_classifier(), tiny_batch(), 0.2
    clean = model.encoder.embed(b["input_ids"], b["token_type_ids"])
    with torch.no_grad():
        attacked = adversarial.pgd_attack(model, b, ce_of(b), eps=eps, steps=5)
        worse = ce_of(b)(model(b["input_ids"], b["attention_mask"], b["token_type_ids"], embeddings=attacked))
        base = ce_of(b)(model(b["input_ids"], b["attention_mask"], b["token_type_ids"]))
    delta = attacked - clean
    assert not attacked.requires_grad and all(p.grad is None for p in model.parameters())
    assert (delta.flatten(1).norm(dim=1) <= eps + 1e-6).all() and (delta[b["attention_mask"] == 0] == 0).all()
    assert worse > base


def test_bad_adversarial_options_are_errors():
    model, b = tiny_classifier(), tiny_batch()
    with pytest.raises(ValueError, match="adversarial method must be one of fgm, pgd, freelb"):
        adversarial.adversarial_loss(model, b, ce_of(b), method="pgm")
    with pytest.raises(ValueError, match="eps must be > 0"):
        adversarial.pgd_attack(model, b, ce_of(b), eps=0.0)


class Task:
    """A pure function of (step, index): the same 8 examples, labelled by whether token 1 occurs."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(2, 40, (8, 6), generator=g)
        self.ids[::2, 2] = 1
        self.labels = (self.ids == 1).any(1).long()

    def micro_batch(self, step, index):
        return {"input_ids": self.ids, "attention_mask": torch.ones_like(self.ids),
                "token_type_ids": torch.zeros_like(self.ids), "labels": self.labels, "num_targets": 8}


def test_lora_with_freelb_trains_in_the_shared_loop_and_leaves_the_base_alone(tmp_path):
    torch.manual_seed(0)
    cfg = EncoderConfig(vocab_size=40, hidden_size=16, num_layers=2, num_heads=2)
    model = SequenceClassifier(cfg, num_labels=2)
    peft.apply_peft(model, "lora", lora_r=2)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    b0 = model.encoder.blocks[0].attn.qkv.lora_B.detach().clone()

    def loss_fn(m, batch):
        return adversarial.adversarial_loss(m, batch, lambda z: losses.cross_entropy(z, batch["labels"], reduction="sum"),
                                       method="freelb", eps=0.05, steps=2)

    cfg = trainer.TrainConfig(out=str(tmp_path), max_steps=3, lr=1e-2, warmup=0, eval_every=0, save_every=0,
                              device="cpu", no_progress=True, log_every=1)
    trainer.train(model, loss_fn, Task(), cfg, trainer.Dist("cpu"))
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert not torch.equal(model.encoder.blocks[0].attn.qkv.lora_B, b0)
    assert os.path.exists(tmp_path / "metrics.jsonl")
