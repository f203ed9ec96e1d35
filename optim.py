"""Adafactor (Shazeer & Stern 2018), written out. Read beside docs/optimization.md (section "Adafactor").

AdamW keeps two full-size tensors per parameter (m and v: 8 bytes per fp32 weight). Adafactor keeps, for a
weight matrix of n rows and m columns, only a row statistic (n) and a column statistic (m) of the squared
gradients, from which it rebuilds a rank-1 estimate of v, and no first moment unless asked: for BERT-base
the optimizer state falls from 2 x 110 M floats to under 0.2 M (bench.py --optimizer prints both).
What it gives up is made back by three stabilisers: update clipping, a beta2 that rises with the step, and
step sizes relative to the size of each weight.

tests/test_optim.py checks it step for step against torch.optim.Adafactor where the two definitions agree.
"""
from __future__ import annotations

import math

import torch


class Adafactor(torch.optim.Optimizer):
    """Adafactor with factored second moments for tensors of >= 2 dims (over their last two dims).

    lr: with relative_step, the cap on the relative step size (the paper's 1e-2); without, the step size.
        The trainer sets it every step from the schedule, so a warm-up still applies.
    beta1: None (the paper's default, no first moment: the memory saving) or a momentum on the updates.
    decay_rate: c in beta2_t = 1 - t^-c (0.8).
    eps1: added to the squared gradient (1e-30); eps2: the least parameter scale (1e-3).
    clip_threshold: d, the RMS an update may have before it is scaled down (1).
    relative_step: rho_t = min(lr, 1/sqrt(t)) instead of lr.
    scale_parameter: multiply the step by max(eps2, RMS(X)), the size of the weight it moves.
    weight_decay: decoupled, X <- X (1 - lr * weight_decay), as torch's AdamW and Adafactor do.
    """

    def __init__(self, params, lr: float = 1e-2, beta1: float | None = None, decay_rate: float = 0.8,
                 eps1: float = 1e-30, eps2: float = 1e-3, clip_threshold: float = 1.0, relative_step: bool = True,
                 scale_parameter: bool = True, weight_decay: float = 0.0):
        if lr < 0 or not 0 < decay_rate <= 1 or clip_threshold < 1 or weight_decay < 0:
            raise ValueError(f"Adafactor: expected lr >= 0, 0 < decay_rate <= 1, clip_threshold >= 1, "
                             f"weight_decay >= 0; got {lr}, {decay_rate}, {clip_threshold}, {weight_decay}")
        if beta1 is not None and not 0 <= beta1 < 1:
            raise ValueError(f"Adafactor: beta1 must be None or in [0, 1), got {beta1}")
        defaults = dict(lr=lr, beta1=beta1, decay_rate=decay_rate, eps1=eps1, eps2=eps2,
                        clip_threshold=clip_threshold, relative_step=relative_step,
                        scale_parameter=scale_parameter, weight_decay=weight_decay)
        super().__init__(params, defaults)

    @staticmethod
    def factored(p: torch.Tensor) -> bool:
        return p.dim() >= 2

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Adafactor does not support sparse gradients")
                self._update(p, p.grad.float(), self.state[p], group)
        return loss

    def _update(self, p, g, state, group):
        if not state:
            state["step"] = 0
            if self.factored(p):
                state["row"] = g.new_zeros(g.shape[:-1])                 # (..., n): mean over each row
                state["col"] = g.new_zeros(g.shape[:-2] + g.shape[-1:])  # (..., m): mean over each column
            else:
                state["v"] = torch.zeros_like(g)
            if group["beta1"] is not None:
                state["m"] = torch.zeros_like(g)
        state["step"] += 1
        t, x = state["step"], p.float()

        # beta2 rises towards 1: the first steps average few gradients, late steps many  [eq:adafactor-beta2]
        beta2 = 1.0 - t ** -group["decay_rate"]
        # step size: relative to the weight's own scale, capped by lr and by 1/sqrt(t)  [eq:adafactor-step]
        rho = min(group["lr"], 1.0 / math.sqrt(t)) if group["relative_step"] else group["lr"]
        alpha = max(group["eps2"], rms(x).item()) * rho if group["scale_parameter"] else rho

        g2 = g * g + group["eps1"]
        if self.factored(p):
            # R, C: running means of g^2 over each row and each column; V_hat = R C / mean(R), the rank-1
            # matrix with those row and column means  [eq:adafactor-factored]
            state["row"].lerp_(g2.mean(-1), 1.0 - beta2)
            state["col"].lerp_(g2.mean(-2), 1.0 - beta2)
            row, col = state["row"], state["col"]
            v_hat = row.unsqueeze(-1) * col.unsqueeze(-2) / row.mean(-1, keepdim=True).unsqueeze(-1)  # (..., n, m)
        else:
            state["v"].lerp_(g2, 1.0 - beta2)
            v_hat = state["v"]
        u = g / v_hat.sqrt()
        # update clipping: an update whose RMS exceeds d is scaled back to RMS d  [eq:adafactor-clip]
        u = u / max(1.0, rms(u).item() / group["clip_threshold"])
        if group["beta1"] is not None:
            state["m"].lerp_(alpha * u, 1.0 - group["beta1"])
            delta = state["m"]
        else:
            delta = alpha * u
        # X_t = X_{t-1} (1 - lr wd) - alpha_t U_hat_t  (or the momentum of it)  [eq:adafactor-update]
        if group["weight_decay"]:
            p.mul_(1.0 - group["lr"] * group["weight_decay"])
        p.sub_(delta.to(p.dtype))


def rms(x: torch.Tensor) -> torch.Tensor:
    """Root mean square of all entries: ||x||_2 / sqrt(numel)."""
    return x.norm() / math.sqrt(x.numel())


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes held in the optimizer's per-parameter state tensors (not the parameters, not the gradients)."""
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
