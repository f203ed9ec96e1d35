"""Pre-train an encoder from scratch: masked-LM (BERT) or causal-LM, on token shards made by data/prepare.py.

    python pretrain.py                                   # tiny model on a corpus every Python has (pydoc_data)
    python pretrain.py --data data/wiki --model mini --max-steps 20000 --grad-accum 4
    torchrun --nproc_per_node=8 pretrain.py --data data/wiki --model base --amp bf16 --compile

Read beside docs/pretraining.md. This file owns the data side (windows from the memmapped token stream,
BERT masking) and the loss; the loop itself (accumulation, AMP, DDP, checkpoints) is trainer.train.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from config import add_shape_args, add_training_args, check_shape_args, fail

# -----------------------------------------------------------------------------------------------------
# the command line first: it needs config.py alone, so --help and a bad flag are answered before the
# imports below load torch (seconds)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--data", default=None, help="prepared folder from data/prepare.py (default: build data/pydoc "
                   "from the Python documentation shipped with every Python)")
    p.add_argument("--eval-data", nargs="*", default=[], help="more prepared folders (same tokenizer) whose "
                   "val.bin is evaluated too, e.g. WikiText test prepared with --val-only")
    p.add_argument("--objective", choices=["mlm", "clm", "electra"], default="mlm", help="masked or causal language "
                   "modelling, or ELECTRA's replaced-token detection (a small MLM generator, the encoder learns "
                   "to spot its replacements at every token)")
    p.add_argument("--generator-layers", type=int, default=None, metavar="N", help="ELECTRA: layers of the "
                   "generator, which shares the encoder's embeddings (default a quarter of the encoder's, at least 1)")
    p.add_argument("--rtd-weight", type=float, default=None, help="ELECTRA: lambda, the weight of the mean "
                   "replaced-token-detection loss against the generator's mean MLM loss (default 50, the paper's)")
    p.add_argument("--init", metavar="DIR", help="continue pre-training a BERT-layout folder (a pretrain.py output, "
                   "all-MiniLM-L6-v2, ...) instead of starting from random weights: domain/task-adaptive pre-training. "
                   "--data must be prepared with its tokenizer (data/prepare.py --tokenizer DIR)")
    add_shape_args(p, model=None, norm=None, when="; not with --init")
    p.add_argument("--attention", choices=["sdpa", "math"], default="sdpa", help="sdpa: PyTorch's fused "
                   "scaled_dot_product_attention; math: the explicit softmax(QK^T / sqrt(d)) V, to read and to check")
    p.add_argument("--freeze-embeddings", action="store_true", help="keep the word embeddings (and the LM decoder "
                   "tied to them) as --init gave them, e.g. word vectors (word_vectors.py): only the layers learn")
    p.add_argument("--dropout", type=float, default=0.1, help="dropout on hidden states and attention weights")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per window, [CLS] included")
    p.add_argument("--mask-rate", type=float, default=0.15, help="MLM: fraction of tokens to predict")
    p.add_argument("--eval-mask-rate", type=float, help="MLM: mask rate of the validation batches (default "
                   "--mask-rate; fix it, e.g. 0.15, to compare runs trained at different rates)")
    p.add_argument("--eval-batches", type=int, default=20, help="validation micro-batches per evaluation")
    p.add_argument("--sample", type=int, default=0, metavar="N", help="CLM: print N generated continuations at the end")
    p.add_argument("--eval-generate", type=int, default=None, metavar="K", help="CLM: at each evaluation, "
                   "greedy-continue the first K tokens of held-out windows by K tokens and log BLEU and ROUGE-L "
                   "against the true ones (default 16, 0: off)")
    p.add_argument("--eval-generate-windows", type=int, default=16, metavar="N", help="windows for --eval-generate")
    # defaults: a tiny model that visibly learns in a few minutes on a laptop CPU; real runs set these
    add_training_args(p, out="out/pretrain", max_steps=500, batch_size=32, lr=1e-3, warmup=0.05,
                              eval_every=100, save_every=250)
    args = p.parse_args(argv)
    for flag, rate in (("--mask-rate", args.mask_rate), ("--eval-mask-rate", args.eval_mask_rate)):
        if rate is not None and not 0 < rate < 1:
            fail(f"{flag} {rate}: expected a fraction between 0 and 1")
    if args.init is not None:
        given = [f for f, v in (("--model", args.model), ("--norm", args.norm),
                                ("--embedding-norm", args.embedding_norm)) if v is not None]
        if given:
            fail(f"{' and '.join(given)}: the architecture comes from --init {args.init}; drop {' and '.join(given)}")
        if args.resume:
            fail(f"--init {args.init} with --resume: a resumed run continues its own checkpoint; "
                         "give one of them (--init starts a new run in a fresh --out)")
    if args.freeze_embeddings and args.init is None and not args.resume:
        fail("--freeze-embeddings needs --init DIR (or --resume of a run started with it): random word embeddings "
             "would stay random")
    args.preset_given = any(v is not None for v in (args.model, args.norm, args.embedding_norm))
    check_shape_args(args)
    args.model, args.norm = args.model or "tiny", args.norm or "post"
    if args.seed < 0:
        fail(f"--seed {args.seed}: expected a non-negative integer")
    if args.seq_len < 2:
        fail(f"--seq-len {args.seq_len}: expected at least 2")
    if args.eval_generate is not None and args.eval_generate and args.objective != "clm":
        fail(f"--eval-generate {args.eval_generate}: only a causal LM (--objective clm) continues text")
    if args.objective != "electra" and (args.generator_layers is not None or args.rtd_weight is not None):
        fail("--generator-layers and --rtd-weight are ELECTRA's: add --objective electra")
    args.rtd_weight = 50.0 if args.rtd_weight is None else args.rtd_weight
    if args.generator_layers is not None and args.generator_layers < 1 or not args.rtd_weight > 0:
        fail(f"--generator-layers {args.generator_layers} --rtd-weight {args.rtd_weight}: expected at least 1 layer "
             "and a positive weight")
    if args.eval_generate is None:
        args.eval_generate = min(16, args.seq_len // 2) if args.objective == "clm" else 0
    if not 0 <= 2 * args.eval_generate <= args.seq_len or args.eval_generate_windows < 1:
        fail(f"--eval-generate {args.eval_generate} --eval-generate-windows {args.eval_generate_windows}: "
                     f"expected K in 0..{args.seq_len // 2} (prompt and continuation fit in --seq-len) and N >= 1")
    return args


if __name__ == "__main__":
    ARGS = parse_args()

import numpy as np  # noqa: E402  (the heavy imports come after the command line, on purpose)
import torch  # noqa: E402

import trainer  # noqa: E402
from model import EncoderConfig, LanguageModel, ReplacedTokenDetection, save_hf_bert  # noqa: E402

# -----------------------------------------------------------------------------------------------------
# token shards: train.bin / val.bin are flat token streams, one [SEP] after every document


def prepared_name(raw: str) -> str:
    """A name under data/ for the prepared form of a raw text folder or file: its last path part (never `raw`)."""
    name = os.path.splitext(os.path.basename(os.path.normpath(raw)))[0] or "corpus"
    return name + "-prepared" if os.path.abspath(os.path.join("data", name)) == os.path.abspath(raw) else name


class Shards:
    """A prepared folder (data/prepare.py): meta.json, train.bin, val.bin, tokenizer.model."""

    def __init__(self, folder: str, need_train: bool = True):
        meta_path = os.path.join(folder, "meta.json")
        if not os.path.isdir(folder):
            raise ValueError(f"--data {folder}: no such folder (make one with: python data/prepare.py "
                             f"--input <text files or folders> --out {folder})")
        if not os.path.isfile(meta_path):
            # raw text, most likely: prepare it into a folder of its own, not into the raw data
            raise ValueError(f"--data {folder}: no meta.json, so it is not a prepared folder (make one with: "
                             f"python data/prepare.py --input {folder} --out data/{prepared_name(folder)}, "
                             f"then --data data/{prepared_name(folder)})")
        self.meta = meta = read_meta(meta_path)
        self.folder = folder
        self.dtype = np.dtype(meta["dtype"])
        self.vocab_size = int(meta["vocab_size"])
        self.tokenizer_path = os.path.join(folder, meta.get("tokenizer", "tokenizer.model"))
        self.train = self._open("train.bin", meta["train_tokens"]) if need_train else None
        self.val = self._open("val.bin", meta["val_tokens"])

    def fingerprint(self) -> str:
        """The data's identity for --resume: meta.json's content (sources' checksums, token counts, tokenizer)."""
        return trainer.file_fingerprint(os.path.join(self.folder, "meta.json"))

    def _open(self, name: str, expected_tokens: int):
        path = os.path.join(self.folder, name)
        if not os.path.isfile(path) or os.path.getsize(path) == 0:
            raise ValueError(f"{path}: missing or empty token shard (re-run data/prepare.py)")
        size = os.path.getsize(path)
        if size % self.dtype.itemsize or size // self.dtype.itemsize != expected_tokens:
            raise ValueError(f"{path}: {size} bytes is not {expected_tokens} tokens of {self.dtype} as meta.json "
                             "says (a shard from another preparation?)")
        arr = np.memmap(path, dtype=self.dtype, mode="r")
        top = int(arr.max())
        if top >= self.vocab_size:
            raise ValueError(f"{path}: holds token id {top} but meta.json's vocab_size is {self.vocab_size} "
                             "(shards and tokenizer disagree)")
        return arr


def read_meta(path: str) -> dict:
    """meta.json, checked: the fields Shards reads, a token dtype that holds every id of the vocabulary
    (data/prepare.py writes uint16 or uint32), a tokenizer inside the folder."""
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable JSON ({e}); re-run data/prepare.py") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: expected a JSON object (re-run data/prepare.py)")
    for name, kind in (("dtype", str), ("vocab_size", int), ("train_tokens", int), ("val_tokens", int)):
        if not isinstance(meta.get(name), kind) or isinstance(meta.get(name), bool):
            raise ValueError(f"{path}: missing or invalid field {name!r} (expected {kind.__name__}, got "
                             f"{meta.get(name)!r:.40}); re-run data/prepare.py")
    if meta["dtype"] not in ("uint16", "uint32") or np.iinfo(meta["dtype"]).max < meta["vocab_size"] - 1:
        raise ValueError(f"{path}: dtype {meta['dtype']!r:.20} cannot hold the ids of vocab_size {meta['vocab_size']} "
                         "(expected uint16, or uint32 above 65536 pieces)")
    tok = meta.get("tokenizer", "tokenizer.model")
    folder = os.path.realpath(os.path.dirname(path))
    if not isinstance(tok, str) or not os.path.realpath(os.path.join(folder, tok)).startswith(folder + os.sep):
        raise ValueError(f"{path}: tokenizer {tok!r:.80} points outside its folder (expected a file name in it)")
    return meta


def batch_generator(seed: int, step: int, index: int, stream: int = 0) -> np.random.Generator:
    """The random source of micro-batch `index` of step `step`: a PCG64 stream keyed by all the numbers
    (stream 0: training batches, 1: the fixed evaluation batches).

    numpy's SeedSequence hashes the whole tuple into 128 bits of state, so no two (seed, step, index) share a
    stream. (A torch.Generator keeps only 32 bits of its seed: packing the three numbers into one integer
    made every --seed draw the same batches, and step s and s + 2^20 the same windows.)"""
    return np.random.default_rng([seed, stream, step, index])


def uniform(shape, generator) -> torch.Tensor:
    """U[0, 1) floats from a numpy Generator or a torch.Generator."""
    if isinstance(generator, torch.Generator):
        return torch.rand(shape, generator=generator)
    return torch.from_numpy(generator.random(tuple(shape), dtype=np.float32))


def randint(high: int, shape, generator) -> torch.Tensor:
    """Integers in [0, high) from a numpy Generator or a torch.Generator."""
    if isinstance(generator, torch.Generator):
        return torch.randint(0, high, tuple(shape), generator=generator)
    return torch.from_numpy(generator.integers(0, high, tuple(shape), dtype=np.int64))


def mask_tokens(tokens, generator, vocab_size, special_ids, mask_id, rate=0.15):
    """BERT masking. Each eligible (non-special) token is chosen with probability `rate`; a chosen token is
    replaced by [MASK] 80% of the time, by a random token 10%, and kept 10% (so the model cannot tell
    which tokens to predict from the input alone). Labels are the original ids at chosen positions,
    -100 (ignored) elsewhere.  [eq:mlm-mask]"""
    specials = torch.tensor(sorted(special_ids), dtype=tokens.dtype)
    eligible = ~torch.isin(tokens, specials)
    chosen = (uniform(tokens.shape, generator) < rate) & eligible
    how = uniform(tokens.shape, generator)
    # random replacements come from the regular ids only, wherever the vocabulary puts its specials
    # (SentencePiece: 0..4, so ids 5 and up; WordPiece: 0 and 100..103)
    regular = torch.ones(vocab_size, dtype=torch.bool)
    regular[[i for i in special_ids if i < vocab_size]] = False
    regular = regular.nonzero().squeeze(1).to(tokens.dtype)
    random_ids = regular[randint(len(regular), tokens.shape, generator)]
    inputs = torch.where(chosen & (how < 0.8), torch.full_like(tokens, mask_id), tokens)
    inputs = torch.where(chosen & (how >= 0.8) & (how < 0.9), random_ids, inputs)
    labels = torch.where(chosen, tokens, torch.full_like(tokens, -100))
    return inputs, labels


class PretrainData:
    """Micro-batches of `seq_len` windows from the stream: [CLS] + the tokens that follow a random offset.

    micro_batch(step, index) is a pure function of its arguments (its random generator is seeded by them),
    so resuming at step s sees exactly the batches an uninterrupted run would, and micro-batch `index` of a
    step is the same whether it runs as rank 1 of 2 or as accumulation step 2 of 1 rank. Different ranks
    get different indices, so their data is disjoint.
    """

    def __init__(self, stream, args, special_ids, cls_id, mask_id, vocab_size):
        self.stream, self.args = stream, args
        self.special_ids, self.cls_id, self.mask_id, self.vocab_size = special_ids, cls_id, mask_id, vocab_size
        self.body = args.seq_len - 1 + (args.objective == "clm")   # CLM reads one more token: the last target
        if len(stream) <= self.body:
            raise ValueError(f"--seq-len {args.seq_len}: the token stream has only {len(stream)} tokens")

    def windows(self, starts) -> torch.Tensor:
        """(B,) offsets -> (B, T) or (B, T+1): [CLS] then the stream from each offset, gathered in one indexing
        op (a Python loop over 512 windows took 5.5 ms, made on the CPU between GPU steps)."""
        starts = np.asarray(starts, dtype=np.int64)
        body = self.stream[starts[:, None] + np.arange(self.body)].astype(np.int64)       # (B, body)
        return torch.from_numpy(np.concatenate([np.full((len(starts), 1), self.cls_id), body], axis=1))

    def make_batch(self, starts, generator, mask_rate=None):
        tokens = self.windows(starts)                                          # (B, T) or (B, T+1)
        if self.args.objective == "clm":
            inputs, labels = tokens[:, :-1], tokens[:, 1:]                     # predict the next token
        else:
            inputs, labels = mask_tokens(tokens, generator, self.vocab_size, self.special_ids, self.mask_id,
                                         mask_rate or self.args.mask_rate)
        batch = {"input_ids": inputs, "labels": labels, "num_targets": int((labels != -100).sum()),
                 "num_tokens": inputs.numel()}
        if self.args.objective == "electra":      # the seed of the generator's samples, drawn like the masks
            batch["sample_seed"] = int(generator.integers(2**62))
        return batch

    def micro_batch(self, step: int, index: int):
        g = batch_generator(self.args.seed, step, index)
        starts = randint(len(self.stream) - self.body, (self.args.batch_size,), g)
        return self.make_batch(starts, g)

    def eval_batches(self, n_batches: int, rank: int, world: int):
        """Fixed, non-overlapping windows from the start of the stream, masked with a fixed seed (at
        --eval-mask-rate, so that runs trained at different mask rates are scored on the same task)."""
        n = min(n_batches * self.args.batch_size, (len(self.stream) - 1) // self.body)
        starts = torch.arange(n) * self.body
        g = batch_generator(self.args.seed, 0, 0, stream=1)
        rate = getattr(self.args, "eval_mask_rate", None)
        batches = [self.make_batch(starts[i:i + self.args.batch_size], g, rate) for i in range(0, n, self.args.batch_size)]
        return batches[rank::world]


# -----------------------------------------------------------------------------------------------------
# the objective


def lm_forward(model, batch):
    """(logits, targets, summed cross-entropy) where a loss is taken: for MLM the head runs only on the
    masked positions, (M, V) and (M,); for CLM on every position, (B*T, V) and (B*T,) with -100 rows ignored."""
    labels = batch["labels"].reshape(-1)
    if batch.get("causal"):
        # L_CLM = -sum_t log p(x_{t+1} | x_<=t)  [eq:clm-loss]
        logits, loss = model(batch["input_ids"], targets=labels)               # (B, T, V)
        return logits.reshape(labels.numel(), -1), labels, loss
    # L_MLM = -sum_{i in masked} log p(x_i | x with the masked positions corrupted)  [eq:mlm-loss]
    positions = (labels != -100).nonzero().squeeze(1)                          # (M,) flat indices
    targets = labels[positions]
    logits, loss = model(batch["input_ids"], positions=positions, targets=targets)   # (M, V)
    return logits, targets, loss


def electra_forward(model, batch):
    """ReplacedTokenDetection's outputs for a batch; its generator samples from a source seeded by the batch,
    so resume and DDP see the same replacements as one uninterrupted process."""
    g = torch.Generator(device=batch["input_ids"].device).manual_seed(int(batch["sample_seed"]))
    return model(batch["input_ids"], batch["labels"], g)


def lm_loss(model, batch):
    """The training loss, summed over the batch (the trainer divides by the step's masked or next-token count).

    ELECTRA: L = L_MLM / M + lambda * L_RTD / (B T), the generator's mean over the M masked tokens plus the
    discriminator's mean over all B T tokens. With one divisor for the whole step (M, so accumulation and DDP
    stay exact) the summed RTD loss is weighted by lambda * rate, rate = M / (B T) in expectation.  [eq:electra-loss]"""
    if "rtd_scale" in batch:
        out = electra_forward(model, batch)
        return out[2] + batch["rtd_scale"] * out[5]
    return lm_forward(model, batch)[2]


def evaluate(model, batches, dist_env, prefix=""):
    """Loss per target, perplexity exp(loss) and accuracy of the argmax, summed over all ranks.

    Perplexity = exp(mean negative log-likelihood per target token).  [eq:perplexity]
    For MLM it is the perplexity of the masked tokens given the rest, which is lower than a left-to-right
    perplexity and not comparable with it."""
    dev = next(model.parameters()).device
    if batches and "rtd_scale" in batches[0]:
        return evaluate_electra(model, batches, dist_env, prefix)
    totals = torch.zeros(3, dtype=torch.float64, device=dev)                   # loss sum, targets, correct
    for batch in batches:
        batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}
        logits, targets, loss = lm_forward(model, batch)                       # the training loss itself
        real = targets != -100
        correct = (logits.argmax(-1) == targets) & real
        totals += torch.stack([loss.double(), real.sum().double(), correct.sum().double()])
    dist_env.all_reduce_sum(totals)
    loss = (totals[0] / totals[1].clamp(min=1)).item()
    return {f"{prefix}loss": loss, f"{prefix}ppl": math.exp(min(loss, 50)), f"{prefix}accuracy": (totals[2] / totals[1].clamp(min=1)).item()}


def evaluate_electra(model, batches, dist_env, prefix=""):
    """The generator's masked LM (loss, ppl, accuracy: a small generator's, not comparable with an MLM run's),
    and the discriminator's mean BCE per token, its accuracy, and the share of the replaced tokens it flags."""
    dev = next(model.parameters()).device
    sums = [0.0] * 8
    for batch in batches:
        batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}
        gen_logits, targets, gen_loss, logits, replaced, rtd_loss = electra_forward(model, batch)
        flagged = (logits > 0).float()                                         # p(replaced) > 1/2
        now = (gen_loss, targets.numel(), (gen_logits.argmax(-1) == targets).sum(), rtd_loss, replaced.numel(),
               (flagged == replaced).sum(), (flagged * replaced).sum(), replaced.sum())
        sums = [s + float(x) for s, x in zip(sums, now)]
    totals = dist_env.all_reduce_sum(torch.tensor(sums, dtype=torch.float64, device=dev))
    mlm_sum, masked, mlm_right, bce_sum, tokens, rtd_right, caught, n_replaced = totals.tolist()
    masked, tokens, n_replaced = max(masked, 1), max(tokens, 1), max(n_replaced, 1)
    return {f"{prefix}loss": mlm_sum / masked, f"{prefix}ppl": math.exp(min(mlm_sum / masked, 50)),
            f"{prefix}accuracy": mlm_right / masked, f"{prefix}rtd_loss": bce_sum / tokens,
            f"{prefix}rtd_accuracy": rtd_right / tokens, f"{prefix}rtd_recall": caught / n_replaced}


# -----------------------------------------------------------------------------------------------------
# continued pre-training (--init): domain- and task-adaptive pre-training, Gururangan et al. 2020


def init_from(folder: str, shards: "Shards", args) -> tuple[LanguageModel, str]:
    """(LanguageModel, a note for the log) from a BERT-layout folder, for more pre-training on --data.

    The folder's tokenizer must be the one --data was prepared with (ids mean words). A folder without an
    LM head (all-MiniLM-L6-v2 ships the encoder only) gets a fresh one, its decoder tied to the word
    embeddings, as BERT's is."""
    from model import CheckpointError, from_hf_bert, read_hf_weights
    from tokenizer import TokenizerError, load_tokenizer
    if not os.path.isdir(folder):
        raise ValueError(f"--init {folder}: no such folder (expected a pretrain.py output or a BERT-layout folder)")
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise ValueError(f"--init {folder}: no config.json, so it is not a BERT-layout folder (expected config.json, "
                         "model.safetensors and vocab.txt or tokenizer.model)")
    try:
        theirs, ours = load_tokenizer(folder), load_tokenizer(shards.tokenizer_path)
    except TokenizerError as e:
        raise ValueError(f"--init {folder}: {e}") from None
    if (theirs.vocab_size != ours.vocab_size
            or any(theirs.id_to_token(i) != ours.id_to_token(i) for i in range(ours.vocab_size))):
        raise ValueError(f"--init {folder}: its tokenizer ({type(theirs).__name__}, {theirs.vocab_size} ids) is not the one "
                         f"--data {args.data} was prepared with ({type(ours).__name__}, {ours.vocab_size} ids); prepare "
                         f"the text with: python data/prepare.py --input ... --tokenizer {folder} --out DIR")
    overrides = dict(attention=args.attention, dropout=args.dropout, attention_dropout=args.dropout)
    head = "clm" if args.objective == "clm" else "mlm"
    try:
        if args.objective != "electra" and any(k.startswith("cls.predictions.") for k in read_hf_weights(folder)):
            model = from_hf_bert(folder, head=head, **overrides)
            return model, f"continued from {folder} (encoder and LM head)"
        encoder = from_hf_bert(folder, head=None, causal=args.objective == "clm", **overrides)
    except CheckpointError as e:
        raise ValueError(f"--init {e}") from None
    if encoder.config.vocab_size != ours.vocab_size:
        raise ValueError(f"--init {folder}: config.json says vocab_size {encoder.config.vocab_size} but its "
                         f"tokenizer has {ours.vocab_size} ids")
    if args.objective == "electra":            # the folder's encoder is the discriminator; the rest starts fresh
        model = build_model(encoder.config, args)
        model.encoder.load_state_dict(encoder.state_dict())
        return model, (f"continued from {folder} (its encoder is the discriminator; a new {model.generator_layers}-layer "
                       "generator sharing its embeddings and a new detection head are initialised)")
    model = LanguageModel(encoder.config)          # a fresh LM head, decoder tied to the word embeddings
    model.encoder.load_state_dict(encoder.state_dict())
    return model, f"continued from {folder} (encoder; it has no LM head: a new one is initialised, tied to the word embeddings)"


def build_model(cfg: EncoderConfig, args) -> torch.nn.Module:
    """The model an objective trains: encoder + LM head, or ELECTRA's generator + discriminator around it."""
    if args.objective != "electra":
        return LanguageModel(cfg)
    if (args.generator_layers or 0) > cfg.num_layers:
        raise ValueError(f"--generator-layers {args.generator_layers}: the encoder has {cfg.num_layers} layers; the "
                         "generator must be smaller (ELECTRA: a quarter to a half of the discriminator)")
    return ReplacedTokenDetection(cfg, args.generator_layers)


def main(argv=None, args=None):
    args = args or parse_args(argv)          # the script parsed its flags before the heavy imports
    dist_env = trainer.Dist(args.device, args.dist_timeout, tp=args.tp)
    try:
        return run(args, dist_env)
    except (ValueError, FileNotFoundError) as e:      # bad input: one line, no traceback
        trainer.fail(str(e))
    finally:
        dist_env.close()


def run(args, dist_env):
    from tokenizer import load_tokenizer
    if args.data is None:                   # the embedded default: stdlib docs, prepared once by rank 0
        from data.prepare import ensure_default_dataset
        if dist_env.is_main:
            ensure_default_dataset("data/pydoc")
        dist_env.barrier()
        args.data = "data/pydoc"
    shards = Shards(args.data)
    tok = load_tokenizer(shards.tokenizer_path)
    if tok.vocab_size != shards.vocab_size:
        raise ValueError(f"--data {args.data}: meta.json says vocab_size {shards.vocab_size} but "
                         f"{shards.tokenizer_path} has {tok.vocab_size} pieces (shards from another tokenizer?)")
    torch.manual_seed(args.seed)
    if args.init:
        model, note = init_from(args.init, shards, args)
        cfg = model.config
    else:
        cfg = EncoderConfig.preset(args.model, vocab_size=tok.vocab_size, norm=args.norm,
                                   embedding_norm=args.embedding_norm, causal=args.objective == "clm",
                                   attention=args.attention, dropout=args.dropout, attention_dropout=args.dropout,
                                   pad_id=tok.pad_id)
        model, note = build_model(cfg, args), f"{args.model} model from random weights"
    if args.seq_len > cfg.max_position:
        raise ValueError(f"--seq-len {args.seq_len} exceeds the model's max positions ({cfg.max_position})")
    specials = {tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id}
    make = lambda stream: PretrainData(stream, args, specials, tok.cls_id, tok.mask_id, tok.vocab_size)
    train_data, val_data = make(shards.train), make(shards.val)
    causal = args.objective == "clm"
    eval_sets = [("", val_data)]
    for folder in args.eval_data:
        extra = Shards(folder, need_train=False)
        if extra.vocab_size != shards.vocab_size:
            raise ValueError(f"--eval-data {folder}: vocab_size {extra.vocab_size} differs from --data's {shards.vocab_size}")
        eval_sets.append((os.path.basename(os.path.normpath(folder)) + "/", make(extra.val)))
    tags = {"causal": causal}                 # the objective, for lm_loss and evaluate
    if args.objective == "electra":
        tags["rtd_scale"] = args.rtd_weight * args.mask_rate
    eval_batches = [(prefix, [dict(b, **tags) for b in d.eval_batches(args.eval_batches, dist_env.data_rank, dist_env.data_world)])
                    for prefix, d in eval_sets]

    class Data:   # the training stream, tagged with the objective for lm_loss
        def micro_batch(self, step, index):
            return dict(train_data.micro_batch(step, index), **tags)

    ckpt_path = os.path.join(args.out, "checkpoint.pt") if args.resume == "auto" else args.resume
    if args.resume and (args.resume != "auto" or os.path.exists(ckpt_path)):
        saved = trainer.load_checkpoint(ckpt_path).get("model_config")
        if saved is not None:   # fields added since it was saved take their defaults
            saved = EncoderConfig.from_dict(saved).to_dict()
        if saved is not None and saved != cfg.to_dict() and not args.preset_given:
            # a run started with --init (or another preset) resumes with its own architecture
            cfg = EncoderConfig.from_dict({**saved, "attention": args.attention, "dropout": args.dropout,
                                           "attention_dropout": args.dropout})
            model, note = build_model(cfg, args), f"the architecture saved in {ckpt_path}"
        if saved is not None and saved != cfg.to_dict():
            raise ValueError(f"--resume {ckpt_path}: it was trained with another model config "
                             f"({', '.join(k for k in saved if saved[k] != cfg.to_dict().get(k))} differ)")
    elif os.path.exists(os.path.join(args.out, "checkpoint.pt")):
        raise ValueError(f"--out {args.out} already holds a run (checkpoint.pt): continue it with --resume, "
                         "or give another --out (nothing was overwritten)")
    if args.freeze_embeddings:
        # the word vectors stay fixed (the tied decoder is the same tensor, so the LM head scores against them);
        # only positions, layers, norms and the decoder bias learn. The optimizer skips what needs no grad.
        model.encoder.embed.tok.weight.requires_grad_(False)
        note += "; word embeddings frozen"
    if dist_env.is_main:
        n = sum(p.numel() for p in model.parameters())
        print(f"{args.objective} pre-training: {note}, {n / 1e6:.2f}M parameters, "
              f"{len(shards.train):,} training tokens from {args.data}, world size {dist_env.world_size}; "
              f"{args.max_steps:,} steps of {args.batch_size * args.grad_accum * dist_env.data_world} x {args.seq_len} "
              f"tokens (the time they take is printed after the first {args.log_every})")

    # CLM: the first held-out windows, the same on every rank, so all ranks run (and log) the same generation
    gen_windows = torch.cat([b["input_ids"] for b in val_data.eval_batches(
        math.ceil(args.eval_generate_windows / args.batch_size), 0, 1)])[:args.eval_generate_windows] if causal else None

    def eval_fn(m):
        out = {}
        for prefix, batches in eval_batches:
            out.update(evaluate(m, batches, dist_env, prefix))
        if args.eval_generate:
            from generate import continuation_scores
            out.update(continuation_scores(m, gen_windows, args.eval_generate, tok))
        return out

    def on_save(m):
        if args.objective == "electra":       # the discriminator's encoder is the model; checkpoint.pt keeps the rest
            save_hf_bert(m.encoder, args.out, tok, extra_config={"architectures": ["BertModel"],
                                                                 "plainbert_pretraining": "electra"})
        else:
            save_hf_bert(m, args.out, tok)

    result = trainer.train(model, lm_loss, Data(), args, dist_env, eval_fn=eval_fn, on_save=on_save,
                           extra_state={"model_config": cfg.to_dict()},
                           fingerprint={"objective": args.objective, "mask_rate": args.mask_rate, "data": shards.fingerprint(),
                                        "freeze_embeddings": args.freeze_embeddings,
                                        **({"generator_layers": model.generator_layers, "rtd_weight": args.rtd_weight}
                                           if args.objective == "electra" else {})})
    if dist_env.is_main and not result["preempted"]:
        from plots import plot_metrics
        plot_metrics(args.out, title=f"{args.objective} pre-training: {note}")
        print(f"saved the model to {os.path.abspath(args.out)} (BERT layout: config.json, model.safetensors, "
              "tokenizer); fine-tune it with: python finetune.py --task binary" +
              ("" if os.path.abspath(args.out) == os.path.abspath("out/pretrain") else f" --init {args.out}"))
    if dist_env.is_main and causal and args.sample and not result["preempted"]:
        from generate import generate
        model.eval().cpu()
        prompts = [row[:16].tolist() for row in gen_windows[: args.sample]]
        outs = generate(model, prompts, 40, temperature=0.8, top_k=40, generator=torch.Generator().manual_seed(args.seed))
        for prompt, new in zip(prompts, outs):
            print(f"--- {tok.decode(prompt)!r} ->\n{tok.decode(new)}")
    return result


if __name__ == "__main__":
    result = main(args=ARGS)   # pre-empted: EX_TEMPFAIL (75), so no pipeline takes an unfinished run for a finished one
    sys.exit(trainer.EX_TEMPFAIL if result and result["preempted"] else 0)
