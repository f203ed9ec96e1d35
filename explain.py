"""Why did the classifier say that? Integrated gradients per word, and one head's attention map.

    python predict.py out/sst2 --explain "a gripping, funny film" --ig-steps 64 --baseline mask --explain-html a.html

Read beside docs/interpretability.md. Integrated gradients (Sundararajan et al. 2017) attributes the output
f(x) to the input token embeddings x_t: along the straight path from a baseline x' (the same sentence with
every ordinary token replaced by [PAD] or [MASK]; [CLS] and [SEP] stay) to x, the gradient of f is averaged
and multiplied by x - x'. The attributions add up to f(x) - f(x') (completeness) up to the error of the
numerical integral, which `integrated_gradients` reports and which shrinks as --ig-steps grows. A word's
score is the sum of its sub-word pieces' scores.

f is the output for the explained class: the logit z for class 1 of a binary model (-z for class 0, whose
logit is -z against class 1), the class's logit for softmax tasks, the score for regression. The attention
map is softmax(Q K^T / sqrt(d) + M) of one layer and head (SelfAttention.record), rows = queries.
"""
from __future__ import annotations

import html
from dataclasses import asdict, dataclass

import torch


class ExplainError(ValueError):
    """A bad layer/head/steps/baseline or a model that cannot be explained; the message names the flag."""


@dataclass
class Explanation:
    label: str                     # the explained class (the predicted one unless asked), or "score"
    tokens: list[str]              # the pieces, [CLS] ... [SEP]
    token_scores: list[float]      # integrated gradients of each piece (0 for [CLS]/[SEP]: baseline = input)
    words: list[str]
    word_scores: list[float]       # the sum over each word's pieces
    f_input: float                 # f(x)
    f_baseline: float              # f(x')
    completeness_gap: float        # sum of attributions - (f(x) - f(x')): the integral's error
    layer: int
    head: int
    attention: list[list[float]]   # (T, T): row t = how token t's query spreads over the keys

    def to_dict(self) -> dict:
        return asdict(self)


def output_of(task: str, outputs: torch.Tensor, target: int) -> torch.Tensor:
    """The explained scalar f per row of outputs (B, K): see the module docstring."""
    if task == "binary":
        return outputs[:, 0] if target == 1 else -outputs[:, 0]
    if task == "regression":
        return outputs[:, 0]
    return outputs[:, target]


def integrated_gradients(model, input_ids, token_type_ids, baseline_ids, f, steps: int = 50, chunk: int = 32):
    """(attributions (T,), f(x), f(x')) for one sequence input_ids (1, T): the path integral of
    grad f along x' + a (x - x'), a in [0, 1], over the token embeddings, by the trapezoidal rule on
    `steps` intervals (error O(1/steps^2) for a smooth f). f: outputs (B, K) -> (B,)."""
    tok = model.encoder.embed.tok
    with torch.no_grad():
        x, x0 = tok(input_ids), tok(baseline_ids)                          # (1, T, C) each
    alphas = torch.linspace(0, 1, steps + 1, dtype=x.dtype)                # the steps + 1 points of the path
    weights = torch.full((steps + 1,), 1.0 / steps, dtype=x.dtype)
    weights[0] = weights[-1] = 0.5 / steps                                 # trapezoid: half weight at the ends
    total, ends = torch.zeros_like(x[0]), {}
    for start in range(0, steps + 1, chunk):
        a = alphas[start:start + chunk]
        # lerp hits both ends exactly (x' + 1 (x - x') need not round to x): f(x) is the model's own output
        path = torch.lerp(x0, x, a[:, None, None]).requires_grad_(True)   # (k, T, C)
        handle = tok.register_forward_hook(lambda module, inputs, out: path)   # the embedding lookup -> the path
        try:
            k, T = path.shape[:2]
            out = f(model(input_ids.expand(k, T), torch.ones(k, T, dtype=torch.long), token_type_ids.expand(k, T)))
        finally:
            handle.remove()
        grads, = torch.autograd.grad(out.sum(), path)                      # (k, T, C): df/dx at each point
        total += (weights[start:start + chunk, None, None] * grads).sum(0)
        if start == 0:
            ends["baseline"] = float(out[0].detach())
        if start + len(a) == steps + 1:
            ends["input"] = float(out[-1].detach())
    # IG_t = sum_c (x - x')_tc * integral_0^1 df/dx_tc (x' + a (x - x')) da  [eq:integrated-gradients]
    attributions = ((x[0] - x0[0]) * total).sum(-1)                        # (T,)
    return attributions, ends["input"], ends["baseline"]


def attention_map(model, input_ids, token_type_ids, layer: int, head: int) -> torch.Tensor:
    """(T, T) attention probabilities of one layer and head for one sequence."""
    blocks = model.encoder.blocks
    if not -len(blocks) <= layer < len(blocks):
        raise ExplainError(f"--layer {layer}: the model has {len(blocks)} layers (0..{len(blocks) - 1}, or -1 for the last)")
    attn = blocks[layer].attn
    if not 0 <= head < attn.num_heads:
        raise ExplainError(f"--head {head}: layer {layer} has {attn.num_heads} heads (0..{attn.num_heads - 1})")
    seen = []
    attn.record = seen.append
    try:
        with torch.no_grad():
            model(input_ids, torch.ones_like(input_ids), token_type_ids)
    finally:
        attn.record = None
    P = seen[0].shape[-1] - input_ids.shape[1]                             # prefix tuning's keys come first
    return seen[0][0, head, :, P:]


def words_of(tokenizer, ids: list[int]) -> tuple[list[str], list[int | None]]:
    """Pieces -> words: (the words, the word index of each piece; None for special tokens). A WordPiece
    '##' piece continues the word before it; with SentencePiece a '▁' piece starts a word."""
    pieces = [tokenizer.id_to_token(i) for i in ids]
    sentencepiece = any(p.startswith("\u2581") for p in pieces)
    words, of = [], []
    for i, p in zip(ids, pieces):
        if i in tokenizer.special_ids and i != tokenizer.unk_id:
            of.append(None)
            continue
        starts = p.startswith("\u2581") if sentencepiece else not p.startswith("##")
        text = p.lstrip("\u2581") if sentencepiece else p[2:] if p.startswith("##") else p
        if starts or not words or of[-1] is None:
            words.append(text)
        else:
            words[-1] += text
        of.append(len(words) - 1)
    return words, of


def explain(model, tokenizer, info, text: str, pair: str | None = None, target: str | None = None, steps: int = 50,
            baseline: str = "pad", layer: int = -1, head: int = 0) -> Explanation:
    """One text's word attributions and attention map, for a float model from finetuned.load_finetuned."""
    task = info["task"]
    if task not in ("binary", "multiclass", "pair", "regression", "prompt"):
        raise ExplainError(f"--explain: explains classifiers and regressors, not a {task} model")
    if steps < 1:
        raise ExplainError(f"--ig-steps: expected a positive integer, got {steps}")
    if baseline not in ("pad", "mask"):
        raise ExplainError(f"--baseline: expected pad or mask, got {baseline!r}")
    if any(not p.is_floating_point() for p in model.parameters()) or not hasattr(model.encoder.embed, "tok") \
            or not isinstance(model.encoder.embed.tok, torch.nn.Embedding):
        raise ExplainError("--explain: needs a float model (explain the folder export.py started from, not an int8 one)")
    enc = tokenizer([text], None if pair is None else [pair], max_length=info["max_length"])
    ids, types = enc["input_ids"], enc["token_type_ids"]                  # (1, T)
    model.eval()
    with torch.no_grad():
        outputs = model(ids, torch.ones_like(ids), types)
    labels = list(info.get("labels") or [])
    if task == "regression":
        index, label = 0, "score"
    else:
        predicted = int(outputs[0, 0] > 0) if task == "binary" else int(outputs[0].argmax())
        if target is not None and target not in labels:
            raise ExplainError(f"--target {target!r}: not one of the model's labels {labels}")
        index = labels.index(target) if target is not None else predicted
        label = labels[index] if labels else str(index)
    fill = tokenizer.pad_id if baseline == "pad" else tokenizer.mask_id
    special = torch.tensor([[i in tokenizer.special_ids for i in ids[0].tolist()]])
    baseline_ids = torch.where(special, ids, torch.full_like(ids, fill))  # x': the same layout, no content
    scores, f_x, f_b = integrated_gradients(model, ids, types, baseline_ids, lambda out: output_of(task, out, index), steps)
    words, of = words_of(tokenizer, ids[0].tolist())
    word_scores = [0.0] * len(words)
    for s, w in zip(scores.tolist(), of):
        if w is not None:
            word_scores[w] += s                                            # a word = the sum of its pieces
    layer = layer if layer >= 0 else len(model.encoder.blocks) + layer
    att = attention_map(model, ids, types, layer, head)
    return Explanation(label, [tokenizer.id_to_token(i) for i in ids[0].tolist()], scores.tolist(), words, word_scores,
                       f_x, f_b, float(scores.sum()) - (f_x - f_b), layer, head, att.tolist())


# -----------------------------------------------------------------------------------------------------
# the view


def _colour(score: float, scale: float) -> str:
    """Green for evidence for the class, red against, stronger with |score| / scale."""
    a = min(abs(score) / scale, 1.0) if scale > 0 else 0.0
    return f"rgba(0, 160, 0, {a:.3f})" if score >= 0 else f"rgba(220, 0, 0, {a:.3f})"


def to_html(explanations: list[Explanation], texts: list[str]) -> str:
    """A self-contained page: each sentence's words shaded by their scores (hover: the number), then the
    attention map of the chosen layer and head as a grey-scale table."""
    parts = ["<!doctype html><meta charset='utf-8'><title>plainbert explanations</title>",
             "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}span.w{padding:2px 3px;margin:1px;"
             "border-radius:3px}table{border-collapse:collapse;font-size:11px}td,th{padding:2px 4px}"
             "th{font-weight:normal}</style>"]
    for text, e in zip(texts, explanations):
        scale = max((abs(s) for s in e.word_scores), default=0.0)
        words = " ".join(f"<span class='w' style='background:{_colour(s, scale)}' title='{s:+.4f}'>"
                         f"{html.escape(w)}</span>" for w, s in zip(e.words, e.word_scores))
        parts.append(f"<h3>{html.escape(text)}</h3><p>class <b>{html.escape(e.label)}</b>: f(x) = {e.f_input:.4f}, "
                     f"f(baseline) = {e.f_baseline:.4f}, attributions sum to {sum(e.token_scores):.4f} "
                     f"(gap {e.completeness_gap:+.2e})</p><p style='font-size:1.3em;line-height:1.8'>{words}</p>")
        head = "".join(f"<th>{html.escape(t)}</th>" for t in e.tokens)
        rows = "".join(f"<tr><th>{html.escape(t)}</th>" + "".join(
            f"<td style='background:rgba(0,0,0,{p:.3f});color:{'#fff' if p > 0.5 else '#000'}'>{p:.2f}</td>" for p in row)
            + "</tr>" for t, row in zip(e.tokens, e.attention))
        parts.append(f"<details><summary>attention, layer {e.layer} head {e.head} (rows: queries)</summary>"
                     f"<table><tr><th></th>{head}</tr>{rows}</table></details>")
    return "\n".join(parts) + "\n"
