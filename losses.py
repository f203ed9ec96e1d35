"""Every loss as its equation, in a few lines each. Read beside docs/losses.md (labels like eq:cross-entropy).

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
    # counting the kept rows is a device-to-host sync on GPU: only the mean needs it
    return _reduce(nll, reduction, count=int(keep.sum()) if reduction == "mean" else None)


def binary_cross_entropy_with_logits(logits, targets, reduction="mean"):
    """BCE(z, y) = -[y log s(z) + (1 - y) log(1 - s(z))], s the sigmoid.  [eq:bce]

    s(z) is the softmax of the two logits (0, z), so both log-probabilities come from log_softmax above:
    stable for any |z|, and with the exact gradient s(z) - y everywhere (the shortcut
    max(z, 0) - z y + log(1 + exp(-|z|)) has the right value but a wrong subgradient at z = 0, exactly
    where a zero-initialised head starts).  [eq:bce-grad]
    """
    z = _at_least_fp32(logits)
    y = targets.to(z.dtype)
    logp = log_softmax(torch.stack([torch.zeros_like(z), z], dim=-1))   # (..., 2): log(1 - s(z)), log s(z)
    per_item = -(y * logp[..., 1] + (1 - y) * logp[..., 0])
    return _reduce(per_item, reduction)


def mse(predictions, targets, reduction="mean"):
    """MSE = (1/N) sum_i (yhat_i - y_i)^2; gradient 2 (yhat - y) / N.  [eq:mse]"""
    p = _at_least_fp32(predictions)
    per_item = (p - targets.to(p.dtype)) ** 2
    return _reduce(per_item, reduction)


# -----------------------------------------------------------------------------------------------------
# fine-tuning: R-Drop and contrastive losses (docs/finetuning.md)


def symmetric_kl(logits_a, logits_b, reduction="sum"):
    """R-Drop (Liang et al. 2021): the same batch run twice (two dropout masks), p and q its two predictions.

    1/2 [KL(p||q) + KL(q||p)] = 1/2 sum_k (p_k - q_k)(log p_k - log q_k), per row   [eq:symmetric-kl]
    Gradients flow into both passes, as in the paper.
    """
    log_p, log_q = log_softmax(_at_least_fp32(logits_a)), log_softmax(_at_least_fp32(logits_b))   # (N, K)
    per_row = 0.5 * ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(dim=-1)
    return _reduce(per_row, reduction)


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradient of the gathered rows over ranks and keeps this rank's.

    Putting only the local tensor back into an all_gather lets each rank backpropagate its own loss into its
    rows, but drops what the other ranks' losses say about them (they used those rows as negatives). Summing
    over ranks gives the exact gradient of the total loss; the forward is the same.
    """

    @staticmethod
    def forward(ctx, z, sizes, offset):
        import torch.distributed as dist
        padded = torch.zeros(max(sizes), *z.shape[1:], dtype=z.dtype, device=z.device)
        padded[: len(z)] = z
        parts = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(parts, padded)
        ctx.span = (offset, offset + len(z))
        return torch.cat([part[:n] for part, n in zip(parts, sizes)])          # (sum of sizes, D)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist
        grad = grad.contiguous()
        dist.all_reduce(grad)                                                  # every rank's loss, summed
        return grad[ctx.span[0]: ctx.span[1]], None, None


def gather_with_grad(z):
    """(rows of every rank concatenated in rank order, where this rank's rows start). Gradients flow back
    into the local rows. Without torch.distributed (or with one rank): (z, 0). Ranks may hold different
    numbers of rows."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return z, 0
    size = torch.tensor([len(z)], device=z.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    sizes = [int(s) for s in sizes]
    offset = sum(sizes[: dist.get_rank()])
    return _GatherWithGrad.apply(z, sizes, offset), offset


def info_nce(z1, z2, temperature=0.05, reduction="sum"):
    """InfoNCE with in-batch negatives, as in SimCSE (Gao et al. 2021). z1, z2: (N, D), row i of z1 and
    row i of z2 are two views of one sentence; every other row of z2 (on every rank) is a negative.

    l_i = -log( exp(cos(z1_i, z2_i) / tau) / sum_j exp(cos(z1_i, z2_j) / tau) )   [eq:info-nce]
    That is cross-entropy over the similarity matrix with the diagonal as the targets.
    """
    z1 = torch.nn.functional.normalize(_at_least_fp32(z1), dim=-1)
    z2 = torch.nn.functional.normalize(_at_least_fp32(z2), dim=-1)
    z2, offset = gather_with_grad(z2)                                          # (N_all, D)
    sim = z1 @ z2.T / temperature                                              # (N, N_all) cosines / tau
    targets = torch.arange(len(z1), device=z1.device) + offset
    return cross_entropy(sim, targets, reduction=reduction)


def supervised_contrastive(z, labels, temperature=0.1, reduction="sum"):
    """Supervised contrastive loss (Khosla et al. 2020, the L_out form). z: (N, D), labels: (N,).
    For anchor i, A(i) = every other row, P(i) = the rows of A(i) with its label, s = cosine similarity:

    l_i = -1/|P(i)| sum_{p in P(i)} log( exp(s_ip / tau) / sum_{a in A(i)} exp(s_ia / tau) )   [eq:supcon]
    Anchors without a positive are skipped: 0 in "none", not counted by "mean".
    """
    z = torch.nn.functional.normalize(_at_least_fp32(z), dim=-1)
    itself = torch.eye(len(z), dtype=torch.bool, device=z.device)
    # the anchor is no candidate of its own: the lowest finite value (not -inf, which gives NaN when N = 1)
    sim = (z @ z.T / temperature).masked_fill(itself, torch.finfo(z.dtype).min)   # (N, N)
    log_prob = log_softmax(sim)                                                # over A(i), row by row
    positive = (labels[:, None] == labels[None, :]) & ~itself                  # (N, N)
    n_pos = positive.sum(dim=-1)
    per_anchor = -log_prob.masked_fill(~positive, 0.0).sum(dim=-1) / n_pos.clamp(min=1)
    return _reduce(per_anchor, reduction, count=int((n_pos > 0).sum()))
