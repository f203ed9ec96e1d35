"""Continue prompts with a causal language model written by `pretrain.py --objective clm`.

    python generate.py out/clm "The os module" "A list is"               # top-p 0.9 sampling, seed 0
    python generate.py out/clm --greedy --max-new-tokens 30 "The os module"
    python generate.py out/clm --file prompts.txt --temperature 0.7 --top-k 50 --repetition-penalty 1.2
    echo "A dictionary maps" | python generate.py out/clm --format jsonl

Read beside docs/generation.md. One step of decoding: the model scores the next token (with a KV cache,
model.KVCache, only the newest token is run through the stack), `process_logits` reshapes those scores
(repetition penalty, temperature, top-k, top-p) and `pick` takes the argmax or samples. Prompts of different
lengths run as one batch, left-padded, so every row's next token sits in the same last column.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from config import fail

# -----------------------------------------------------------------------------------------------------
# the command line first: --help and a bad flag are answered before the imports below load torch (seconds)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="folder from pretrain.py --objective clm")
    p.add_argument("prompts", nargs="*", help="texts to continue (else --file, else stdin)")
    p.add_argument("--file", help="prompts, one per line")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--greedy", action="store_true", help="always the most likely token (same as --temperature 0)")
    p.add_argument("--temperature", type=float, default=1.0, help="divide the scores by this; 0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=0.9, help="sample from the smallest set holding this mass (1: all)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages tokens already present")
    p.add_argument("--no-stop", action="store_true", help="keep going past [SEP] (the end of a document)")
    p.add_argument("--seed", type=int, default=0, help="fixes the sampled tokens")
    p.add_argument("--batch-size", type=int, default=16, help="prompts decoded together (left-padded)")
    p.add_argument("--no-cache", action="store_true", help="re-run the whole sequence each step (slow; for checks)")
    p.add_argument("--format", choices=["text", "jsonl"], default="text")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    args = p.parse_intermixed_args(argv)                    # prompts may come after the flags
    checks = [(args.max_new_tokens >= 1, f"--max-new-tokens {args.max_new_tokens}: expected at least 1"),
              (args.temperature >= 0, f"--temperature {args.temperature}: expected 0 (greedy) or more"),
              (args.top_k >= 0, f"--top-k {args.top_k}: expected 0 (off) or a positive count"),
              (0 < args.top_p <= 1, f"--top-p {args.top_p}: expected a probability mass in (0, 1]"),
              (args.repetition_penalty > 0, f"--repetition-penalty {args.repetition_penalty}: expected > 0 (1: off)"),
              (args.batch_size >= 1, f"--batch-size {args.batch_size}: expected at least 1"),
              (args.seed >= 0, f"--seed {args.seed}: expected a non-negative integer")]
    for ok, msg in checks:
        if not ok:
            fail(msg)
    if args.greedy:
        args.temperature = 0.0
    return args


if __name__ == "__main__":
    ARGS = parse_args()

import torch  # noqa: E402  (the heavy imports come after the command line, on purpose)

from model import KVCache, left_padded_positions  # noqa: E402

# -----------------------------------------------------------------------------------------------------
# one decoding step: scores -> the next token


def process_logits(logits, seen, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0):
    """Reshape next-token scores (B, V) in the order Hugging Face applies them; removed tokens get -inf.

    seen (B, V) bool: the tokens already in each row (prompt and generated), for the repetition penalty.
    temperature 0 (greedy) leaves the scores unscaled: `pick` then takes their argmax."""
    if repetition_penalty != 1.0:
        # CTRL (Keskar et al. 2019): shrink the score of every token already present, towards "less likely"
        # on either side of 0: z / theta if z > 0, z * theta if z <= 0  [eq:repetition-penalty]
        penalised = torch.where(logits > 0, logits / repetition_penalty, logits * repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if temperature > 0:
        logits = logits / temperature                                    # p = softmax(z / tau)  [eq:temperature]
    if top_k > 0:
        # keep the k highest scores (ties with the k-th kept too)  [eq:top-k]
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[..., -1:]    # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        # nucleus: the smallest set of most probable tokens whose mass reaches p; a token is dropped when the
        # tokens more probable than it already hold p  [eq:top-p]
        probs, order = logits.softmax(-1).sort(-1, descending=True)     # (B, V) each, most probable first
        drop_sorted = probs.cumsum(-1) - probs >= top_p                  # mass strictly before; the top stays
        drop = drop_sorted.scatter(-1, order, drop_sorted)               # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def pick(logits, temperature, generator=None):
    """The next token of each row, (B,): the argmax when temperature is 0, else a draw from softmax(logits)."""
    if temperature == 0:
        return logits.argmax(-1)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(1)


# -----------------------------------------------------------------------------------------------------
# the loop


def left_pad(prompts, pad_id, device=None):
    """Token lists -> input_ids and attention_mask (B, L), each prompt pushed to the right end."""
    L = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), L, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, L - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[b, L - len(p):] = 1
    return ids.to(device), mask.to(device)


@torch.no_grad()
def generate(model, prompts, max_new_tokens=40, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0,
             stop_id=None, generator=None, use_cache=True, return_logits=False):
    """Continue each prompt (a list of token ids) by up to max_new_tokens tokens; returns the new ids of each,
    cut before stop_id (e.g. [SEP], the end of a document) when it comes. return_logits: also the model's raw
    next-token scores at every step, (B, steps, V), which must not depend on use_cache (tests check it)."""
    cfg, dev = model.config, next(model.parameters()).device
    if not cfg.causal:
        raise ValueError("generation needs a causal LM (config.causal=True); a masked LM sees both sides")
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max(map(len, prompts)) + max_new_tokens - 1 > cfg.max_position:
        raise ValueError(f"a {max(map(len, prompts))}-token prompt plus {max_new_tokens} new tokens exceeds the "
                         f"model's {cfg.max_position} positions")
    ids, mask = left_pad(prompts, cfg.pad_id, dev)                       # (B, L) each
    B = ids.shape[0]
    seen = torch.zeros(B, cfg.vocab_size, device=dev).scatter_add_(1, ids, mask.float()) > 0   # (B, V)
    cache = KVCache(cfg) if use_cache else None
    step_ids, step_mask = ids, mask                                      # what the model reads this step
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    new, raw = [], []
    for _ in range(max_new_tokens):
        T = step_ids.shape[1]
        last = torch.arange(B, device=dev) * T + T - 1                   # flat index of each row's last token
        if cache is not None:                                            # the new tokens only: (B, T)
            logits = model(step_ids, step_mask, positions=last, cache=cache)                      # (B, V)
        else:                                                            # the whole sequence again
            logits = model(step_ids, step_mask, positions=last, position_ids=left_padded_positions(step_mask))
        logits = logits.float()
        raw.append(logits)
        scores = process_logits(logits, seen, temperature, top_k, top_p, repetition_penalty)
        token = pick(scores, temperature, generator).masked_fill(finished, cfg.pad_id)   # (B,)
        new.append(token)
        if stop_id is not None:
            finished |= token == stop_id
            if finished.all():
                break
        seen[torch.arange(B, device=dev), token] = True
        ids, mask = torch.cat([ids, token[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        step_ids, step_mask = (token[:, None], mask[:, -1:]) if cache is not None else (ids, mask)
    out = []
    for row in torch.stack(new, 1).tolist():                             # (B, steps)
        out.append(row[:row.index(stop_id)] if stop_id is not None and stop_id in row else row)
    return (out, torch.stack(raw, 1)) if return_logits else out


# -----------------------------------------------------------------------------------------------------
# evaluation during CLM pre-training (pretrain.py --eval-generate K)


def continuation_scores(model, windows, prompt_len, tokenizer, new_tokens=None):
    """Greedy-continue the first prompt_len tokens of each window (N, T) and score the continuation against
    the window's true next tokens: corpus BLEU (sacrebleu's 13a, 0-100) and mean ROUGE-L F1 (0-1) of the
    decoded texts. new_tokens defaults to prompt_len (the window must hold both)."""
    from metrics import corpus_bleu, rouge
    new_tokens = new_tokens or prompt_len
    rows = windows[:, :prompt_len + new_tokens].tolist()
    outs = generate(model, [r[:prompt_len] for r in rows], new_tokens, temperature=0)
    hyps = [tokenizer.decode(o) for o in outs]
    refs = [tokenizer.decode(r[prompt_len:]) for r in rows]
    return {"gen_bleu": corpus_bleu(hyps, [refs])["bleu"], "gen_rougeL": rouge(hyps, refs)["rougeL"]}


# -----------------------------------------------------------------------------------------------------
# the command line


def load_causal_lm(path: str):
    """(model in eval mode, tokenizer) from a folder written by pretrain.py --objective clm."""
    from model import from_hf_bert
    from tokenizer import load_tokenizer
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise ValueError(f"{path}: not a folder (expected a model folder from pretrain.py --objective clm)")
    if not os.path.isfile(cfg_file):
        raise ValueError(f"{path}: no config.json (expected a model folder from pretrain.py --objective clm)")
    with open(cfg_file) as f:
        try:
            causal = bool(json.load(f).get("is_decoder", False))
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_file}: not valid JSON ({e})") from None
    if not causal:
        raise ValueError(f"{path}: not a causal LM ({cfg_file} has no \"is_decoder\": true); generation needs "
                         "a model from pretrain.py --objective clm, not a masked LM or a fine-tuned classifier")
    return from_hf_bert(path, head="clm").eval(), load_tokenizer(path)


def read_prompts(args) -> list[str]:
    """From the arguments, else --file, else stdin; one prompt per line in a file (blank lines skipped)."""
    if args.prompts:
        for i, p in enumerate(args.prompts, 1):
            if not p.strip():
                raise ValueError(f"prompt {i} is empty: give some text to continue")
        return args.prompts
    if args.file:
        if not os.path.isfile(args.file):
            raise ValueError(f"--file {args.file}: no such file")
        with open(args.file, encoding="utf-8") as f:
            lines, where = f.read().splitlines(), f"--file {args.file}"
    else:
        if sys.stdin.isatty():
            raise ValueError("no prompts: give them as arguments, with --file, or on stdin")
        lines, where = sys.stdin.read().splitlines(), "stdin"
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"{where}: no prompts (every line is empty)")
    return prompts


def main(argv=None, args=None):
    args = args or parse_args(argv)          # the script parsed its flags before the heavy imports
    try:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {args.device}: CUDA is not available here")
        prompts = read_prompts(args)
        model, tok = load_causal_lm(args.model)
        model.to(device)
        generator = torch.Generator(device).manual_seed(args.seed)
        encoded = [[tok.cls_id] + tok.encode(p) for p in prompts]        # pre-training windows start with [CLS]
        for i in range(0, len(encoded), args.batch_size):
            batch = encoded[i:i + args.batch_size]
            outs = generate(model, batch, args.max_new_tokens, args.temperature, args.top_k, args.top_p,
                            args.repetition_penalty, stop_id=None if args.no_stop else tok.sep_id,
                            generator=generator, use_cache=not args.no_cache)
            for prompt, ids, new in zip(prompts[i:i + args.batch_size], batch, outs):
                head, full = tok.decode(ids), tok.decode(ids + new)
                continuation = full[len(head):] if full.startswith(head) else " " + tok.decode(new)
                if args.format == "jsonl":
                    print(json.dumps({"prompt": prompt, "continuation": continuation, "new_tokens": len(new)}))
                else:
                    print(prompt + continuation + "\n")
    except ValueError as e:                 # bad folder, prompt or flag value: one line, no traceback
        fail(str(e))


if __name__ == "__main__":
    main(args=ARGS)
