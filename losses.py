"""Every loss as its equation, in a few lines each. Read beside docs/losses.md (labels like [eq:cross-entropy]).

No state, no modules: plain functions of tensors. Gradients come from autograd; tests/test_losses.py checks
them against the closed forms in the docs (softmax - one-hot, sigmoid - y) and against torch's own kernels.

Reductions: "mean" averages over real targets (ignored ones excluded), "sum" adds them up (the training loop
divides by the number of real targets over all micro-batches and ranks), "none" returns one value per row.
"""
import torch


def _at_least_fp32(x):
    """Losses accumulate in fp32 even under fp16/bf16 autocast; float64 stays float64 (for gradcheck)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) or not x.is_floating_point() else x


def _reduce(per_item, reduction, count=None):
    if reduction == "none":
        return per_item
    if reduction == "sum":
        return per_item.sum()
    if reduction == "mean":
        n = per_item.numel() if count is None else count
        return per_item.sum() / max(n, 1)     # no targets at all: 0, not 0/0
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def log_softmax(logits):
    """log p_k = z_k - logsumexp(z), logsumexp(z) = m + log sum_j exp(z_j - m), m = max_j z_j.  [eq:logsumexp]

    Subtracting the max keeps every exp() in (0, 1]: no overflow for logits of 1e4, no log(0).
    """
    m = logits.max(dim=-1, keepdim=True).values.detach()   # a constant shift: it cancels in the gradient
    lse = m + (logits - m).exp().sum(dim=-1, keepdim=True).log()
    return logits - lse


def cross_entropy(logits, targets, ignore_index=-100, label_smoothing=0.0, reduction="mean"):
    """logits (N, K), targets (N,) class ids, ignore_index rows skipped.

    CE = -(1 - eps) log p_y - (eps / K) sum_k log p_k          (eps = 0: plain -log p_y)  [eq:cross-entropy]
    Its gradient with respect to the logits is p - q, q the (smoothed) target distribution  [eq:ce-grad]
    """
    logits = _at_least_fp32(logits)
    keep = targets != ignore_index
    safe_targets = targets.masked_fill(~keep, 0)           # any valid id; the row is zeroed below
    logp = log_softmax(logits)                             # (N, K)
    nll = -logp.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1)   # (N,)
    if label_smoothing:
        nll = (1.0 - label_smoothing) * nll - label_smoothing * logp.mean(dim=-1)
    nll = nll * keep
    return _reduce(nll, reduction, count=int(keep.sum()))


def binary_cross_entropy_with_logits(logits, targets, reduction="mean"):
    """BCE(z, y) = -[y log s(z) + (1 - y) log(1 - s(z))], s the sigmoid, written in the stable form
    max(z, 0) - z y + log(1 + exp(-|z|)), which never takes exp of a large positive number.  [eq:bce]
    Its gradient is s(z) - y.  [eq:bce-grad]
    """
    z = _at_least_fp32(logits)
    y = targets.to(z.dtype)
    per_item = z.clamp(min=0) - z * y + torch.log1p(torch.exp(-z.abs()))
    return _reduce(per_item, reduction)


def mse(predictions, targets, reduction="mean"):
    """MSE = (1/N) sum_i (yhat_i - y_i)^2; gradient 2 (yhat - y) / N.  [eq:mse]"""
    p = _at_least_fp32(predictions)
    per_item = (p - targets.to(p.dtype)) ** 2
    return _reduce(per_item, reduction)
