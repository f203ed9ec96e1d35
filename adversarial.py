"""Adversarial training on the embedding output: FGM (Miyato et al. 2017), PGD (Madry et al. 2018) and
FreeLB (Zhu et al. 2020). Read beside docs/finetuning.md.

Unlike losses.py these take the model: the perturbation follows the loss's gradient with respect to the
embeddings. They call no .backward(): gradients with respect to delta come from torch.autograd.grad, and the
parameter gradients from the returned loss, when the trainer backpropagates it.

    adversarial_loss(model, batch, loss_of_logits, method)   clean loss + the loss under attack (training)
    pgd_attack(model, batch, loss_of_logits, eps)            attacked embeddings (robust accuracy)
"""
import torch

from model import unwrap

ADVERSARIAL_METHODS = ("fgm", "pgd", "freelb")


def _norm_per_example(x):
    return x.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, 1, 1)           # (B, 1, 1): over (T, C)


def _project(delta, eps):
    """Pull each example's delta back onto the ball ||delta||_2 <= eps when it left it."""
    return delta * (eps / _norm_per_example(delta)).clamp(max=1.0)


def _ascent_direction(loss, delta, mask, retain_graph=False):
    """g / ||g||_2 per example, g = d loss / d delta, zero on padding."""
    (g,) = torch.autograd.grad(loss, delta, retain_graph=retain_graph)
    g = g * mask
    return g / _norm_per_example(g)


def _random_start(embeds, mask, eps):
    """A random direction at a uniformly drawn radius in [0, eps), zero on padding."""
    d = torch.randn_like(embeds) * mask
    return d / _norm_per_example(d) * eps * torch.rand(len(d), 1, 1, device=d.device, dtype=d.dtype)


def _embed(model, batch):
    """(unwrapped model, embedding output (B, T, C), real-token mask (B, T, 1))."""
    net = unwrap(model)
    embeds = net.encoder.embed(batch["input_ids"], batch.get("token_type_ids"))
    mask = batch.get("attention_mask")
    mask = torch.ones_like(batch["input_ids"]) if mask is None else mask
    return net, embeds, mask[:, :, None].to(embeds.dtype)


def _logits(model, batch, embeddings):
    return model(batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids"), embeddings=embeddings)


def _check_attack(method, eps, steps):
    if method not in ADVERSARIAL_METHODS:
        raise ValueError(f"adversarial method must be one of {', '.join(ADVERSARIAL_METHODS)}, got {method!r}")
    if not eps > 0 or int(steps) < 1:
        raise ValueError(f"adversarial eps must be > 0 and steps >= 1, got eps={eps}, steps={steps}")


def _pgd(net, batch, embeds, mask, loss_of_logits, eps, alpha, steps):
    """K steps of normalised gradient ascent from a random start, each projected back onto the eps-ball."""
    delta = _random_start(embeds, mask, eps)
    for _ in range(steps):
        delta.requires_grad_(True)
        loss = loss_of_logits(_logits(net, batch, embeds + delta))
        # delta <- Proj_{||delta|| <= eps}(delta + alpha g / ||g||_2), per example  [eq:pgd]
        delta = _project(delta.detach() + alpha * _ascent_direction(loss, delta, mask), eps)
    return delta.detach()


def adversarial_loss(model, batch, loss_of_logits, method="fgm", eps=1e-2, alpha=None, steps=3):
    """Clean loss + loss under a worst-case perturbation delta of the embedding output, ||delta||_2 <= eps
    per example over (T, C), delta = 0 on padding. `model`: a SequenceClassifier, possibly wrapped by DDP or
    torch.compile; `loss_of_logits(logits)` -> summed loss. alpha (the ascent step) defaults to 2.5 eps / K.

    fgm: one step to the ball's surface along the gradient. pgd: K projected steps from a random start, loss
    at the last delta. freelb: K projected steps, the mean of the K losses met on the way.
    """
    _check_attack(method, eps, steps)
    alpha = 2.5 * eps / steps if alpha is None else alpha
    net, embeds, mask = _embed(model, batch)                                   # embeds keeps its graph
    # the clean pass goes through the wrapper once: DDP arms its gradient all-reduce in forward. FGM takes
    # its gradient at a zero delta, which requires grad even when the embeddings are frozen (PEFT).
    zero = torch.zeros_like(embeds, requires_grad=method == "fgm")
    clean = loss_of_logits(_logits(model, batch, embeds + zero))
    if method == "fgm":
        # delta = eps g / ||g||_2 per example, g = d L / d e at the clean embeddings  [eq:fgm]
        delta = eps * _ascent_direction(clean, zero, mask, retain_graph=True)
        return clean + loss_of_logits(_logits(net, batch, embeds + delta))
    if method == "pgd":
        delta = _pgd(net, batch, embeds.detach(), mask, loss_of_logits, eps, alpha, steps)
        return clean + loss_of_logits(_logits(net, batch, embeds + delta))
    delta, adv = _random_start(embeds.detach(), mask, eps), 0.0
    for k in range(steps):
        delta.requires_grad_(True)
        step_loss = loss_of_logits(_logits(net, batch, embeds + delta))
        # L_adv = (1/K) sum_k L(e + delta_k): every step's parameter gradient counts  [eq:freelb]
        adv = adv + step_loss / steps
        if k < steps - 1:                   # the same update as pgd; the last one would go unused
            delta = _project(delta.detach() + alpha * _ascent_direction(step_loss, delta, mask, True), eps)
    return clean + adv


def pgd_attack(model, batch, loss_of_logits, eps, alpha=None, steps=10):
    """Embeddings perturbed by a K-step PGD attack, detached: (B, T, C), for robust accuracy with
    model(..., embeddings=...). Runs under an evaluation's torch.no_grad too; parameter .grad is untouched."""
    _check_attack("pgd", eps, steps)
    alpha = 2.5 * eps / steps if alpha is None else alpha
    with torch.enable_grad():
        net, embeds, mask = _embed(model, batch)
        embeds = embeds.detach()
        return embeds + _pgd(net, batch, embeds, mask, loss_of_logits, eps, alpha, steps)
