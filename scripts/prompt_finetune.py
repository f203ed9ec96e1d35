"""Prompt-based fine-tuning: classify with the masked-LM head the encoder was pre-trained with.

A classifier head starts from random weights, so with few labels it must learn from them alone what the
pre-trained features mean for the task. Prompt-based fine-tuning (PET, Schick & Schütze 2021; LM-BFF, Gao et
al. 2021) asks the task as a cloze instead: each sentence is wrapped in a template with one [MASK], and the
class scores are the masked LM's scores of one word per class (the verbalizer) at that [MASK]:

    x' = [CLS] x It was [MASK] . [SEP]
    s_c = LMHead(h_[MASK])[v_c]                       v = (terrible, great): one vocabulary id per class
    p(c | x) = softmax_c(s)                           loss = cross-entropy(s, y), every weight fine-tuned

so the "head" is the pre-trained LM head and the verbalizer rows of the tied word embeddings: nothing new
starts at random. A random-weight copy of the same architecture (--random) is the control: its LM head knows
nothing, which makes it an ordinary freshly initialised two-way head.

The recipe matches learning_curve.py's rows (AdamW, betas 0.9/0.999, weight decay 0.01, linear warm-up over
10 % then decay, clipping at 1.0, dropout 0.1, batch 32, the last step's model judged on dev), so a run here
sits beside that table's rows for the same subset and seed:

    python scripts/prompt_finetune.py --init out/cpu-mini-bf16 --train out/curve/subsets/train_1000.tsv \\
        --dev ../shared/data/sst2/dev.tsv --steps 300 --lr 3e-4 --seed 0 --out out/prompt/n1000-seed0.json

Binary or multi-class TSV files that finetune.py reads; labels are matched to the verbalizer in sorted order
(SST-2's 0, 1 -> terrible, great).
"""
import argparse
import json
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The cloze and its words for SST-2-like sentiment; learning_curve.py's prompt row takes its defaults from here.
TEMPLATE = "{text} It was [MASK] ."
VERBALIZER = "terrible,great"


def add_prompt_args(parser):
    """--template and --verbalizer, written once for this script and learning_curve.py's prompt row."""
    parser.add_argument("--template", default=TEMPLATE, help="the cloze each sentence is put in")
    parser.add_argument("--verbalizer", default=VERBALIZER, help="one word per class, in sorted label order")


def template_problem(template: str) -> str | None:
    """Why --template cannot be used (None when it can): the sentence and the [MASK] go in exactly once."""
    if template.count("{text}") != 1 or template.count("[MASK]") != 1:
        return f"--template {template!r}: expected {{text}} once and [MASK] once"
    return None


def prompt_ids(tokenizer, texts: list[str], template: str, max_length: int) -> list[list[int]]:
    """[CLS] + template with {text} filled + [SEP], one [MASK] in each; the sentence (never the template) is
    cut when the whole would pass max_length."""
    before, after = template.split("{text}")
    head, tail = tokenizer.encode(before) if before.strip() else [], tokenizer.encode(after)
    budget = max_length - 2 - len(head) - len(tail)
    if budget < 1:
        raise SystemExit(f"error: --template {template!r} leaves no room for the sentence in --max-length {max_length}")
    return [[tokenizer.cls_id] + head + ids[:budget] + tail + [tokenizer.sep_id]
            for ids in tokenizer.encode_batch(texts)]


def verbalizer_ids(tokenizer, words: list[str]) -> list[int]:
    """One vocabulary id per class word; a word the tokenizer splits has no single score, so it is refused."""
    ids = []
    for w in words:
        pieces = tokenizer.encode(w)
        if len(pieces) != 1:
            raise SystemExit(f"error: --verbalizer word {w!r} is {len(pieces)} tokens "
                             f"({' '.join(tokenizer.id_to_token(i) for i in pieces)}); each word must be one token")
        ids.append(pieces[0])
    return ids


def class_word_ids(tokenizer, verbalizer: str, classes: list[str], train: str) -> list[int]:
    """--verbalizer checked against the training file's classes (sorted) and the tokenizer: one id per class."""
    words = verbalizer.split(",")
    if len(words) != len(classes):
        raise SystemExit(f"error: --verbalizer {verbalizer!r} has {len(words)} words, {train} has {len(classes)} "
                         f"classes ({', '.join(classes)}); one word per class, in sorted label order")
    return verbalizer_ids(tokenizer, words)


def class_scores(model, batch: dict, mask_id: int, words):
    """(B, K): the masked LM's scores of the verbalizer words at each example's [MASK]."""
    flat = batch["input_ids"].reshape(-1)
    positions = (flat == mask_id).nonzero().squeeze(1)                                  # (B,) one per row
    logits = model(batch["input_ids"], batch["attention_mask"], positions=positions)   # (B, V): the head on B rows
    return logits[:, words]                                                             # (B, K)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--init", required=True, help="a pretrain.py output (an MLM head is needed)")
    p.add_argument("--random", action="store_true", help="the same architecture and tokenizer, fresh weights")
    p.add_argument("--train", required=True)
    p.add_argument("--dev", required=True)
    add_prompt_args(p)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--warmup", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (0: off)")
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="default: cuda when there is one, else cpu")
    p.add_argument("--out", required=True, help="JSON file for the result")
    a = p.parse_args(argv)
    if template_problem(a.template):
        p.error(template_problem(a.template))

    import torch
    import torch.nn.functional as F
    from atomic import write_json
    from data.tasks import TaskDataError, pad_batch, read_examples
    from model import CheckpointError, from_hf_bert, init_weights
    from tokenizer import load_tokenizer
    from trainer import build_optimizer, lr_at, set_lr

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:                                       # a bad folder or file: one line naming it, not a traceback
        tokenizer = load_tokenizer(a.init)
        model = from_hf_bert(a.init, head="mlm", dropout=a.dropout)
        train, dev = read_examples([a.train]), read_examples([a.dev])
    except (CheckpointError, TaskDataError, OSError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    if a.random:
        torch.manual_seed(a.seed)
        model.apply(init_weights)
    model.to(device)
    torch.manual_seed(a.seed)
    classes = sorted(set(train.labels))
    words = class_word_ids(tokenizer, a.verbalizer, classes, a.train)
    index = {c: i for i, c in enumerate(classes)}
    unseen = sorted(set(dev.labels) - set(classes))
    if unseen:
        p.error(f"--dev {a.dev}: labels {', '.join(unseen)} are not among {a.train}'s ({', '.join(classes)})")
    x_train, y_train = prompt_ids(tokenizer, train.texts, a.template, a.max_length), [index[c] for c in train.labels]
    x_dev, y_dev = prompt_ids(tokenizer, dev.texts, a.template, a.max_length), [index[c] for c in dev.labels]
    batch_of = lambda xs, rows: {k: v.to(device) for k, v in pad_batch(
        [xs[i] for i in rows], [[0] * len(xs[i]) for i in rows], tokenizer.pad_id).items()}

    @torch.no_grad()
    def accuracy():
        model.eval()
        right = 0
        for start in range(0, len(x_dev), 128):
            rows = list(range(start, min(start + 128, len(x_dev))))
            pred = class_scores(model, batch_of(x_dev, rows), tokenizer.mask_id, words).argmax(1)
            right += sum(int(pred[i]) == y_dev[r] for i, r in enumerate(rows))
        model.train()
        return right / len(x_dev)

    before = accuracy()                        # zero-shot: the cloze as the pre-trained LM answers it
    opt = build_optimizer(model, a.lr, weight_decay=0.01, betas=(0.9, 0.999))
    rng = torch.Generator().manual_seed(a.seed)
    order, at = torch.randperm(len(x_train), generator=rng).tolist(), 0
    warmup = math.ceil(a.warmup * a.steps)
    labels = torch.tensor(y_train, device=device)
    model.train()
    for step in range(a.steps):
        if at + a.batch_size > len(order):     # a new epoch: a new shuffle
            order, at = torch.randperm(len(x_train), generator=rng).tolist(), 0
        rows, at = order[at:at + a.batch_size], at + a.batch_size
        set_lr(opt, lr_at(step, a.lr, warmup, a.steps))
        loss = F.cross_entropy(class_scores(model, batch_of(x_train, rows), tokenizer.mask_id, words), labels[rows])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if a.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), a.clip)
        opt.step()
    result = {"accuracy": accuracy(), "zero_shot_accuracy": before, "train_examples": len(x_train),
              "steps": a.steps, "settings": {k: v for k, v in vars(a).items() if k != "out"}}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    write_json(a.out, result)
    print(json.dumps({k: result[k] for k in ("accuracy", "zero_shot_accuracy", "train_examples", "steps")}))


if __name__ == "__main__":
    main()
