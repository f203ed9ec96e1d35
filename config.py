"""The settings that need no torch: the model size presets, the training loop's TrainConfig and the flags
made from it, the names finetune.py's flags offer (task kinds, PEFT methods and their options, multi-task
sampling), and the one-line user error. Every script's command line is built from these alone, so
`--help` and a bad flag are answered before torch is imported (which takes seconds).

model.py and trainer.py import from here (`trainer.TrainConfig`, `model.PRESETS` still work).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field, fields

# BERT miniatures (Turc et al. 2019) and BERT-base: name -> (layers, hidden size, attention heads)
PRESETS = {"tiny": (2, 128, 2), "mini": (4, 256, 4), "small": (4, 512, 8), "medium": (8, 512, 8),
           "base": (12, 768, 12)}


def add_shape_args(p: argparse.ArgumentParser, model: str | None, norm: str | None, when: str = "") -> None:
    """--model, --norm, --embedding-norm: the encoder a script builds from scratch (pretrain.py, word_vectors.py).
    A default of None lets the script tell a flag given from one left out (the help then names the fallback;
    argparse shows a real default itself); `when` ends each help."""
    model_default = "; default tiny" if model is None else ""
    norm_default = "; default post" if norm is None else ""
    p.add_argument("--model", choices=list(PRESETS), default=model,
                   help=f"size preset (BERT miniatures{model_default}{when})")
    p.add_argument("--norm", choices=["post", "pre"], default=norm,
                   help=f"LayerNorm placement (before or after each sub-layer{norm_default}{when})")
    p.add_argument("--embedding-norm", action=argparse.BooleanOptionalAction, default=None, help="a LayerNorm on the "
                   f"embedding sum (default: on for post-LN, as in BERT; off for pre-LN{when})")


def check_shape_args(args: argparse.Namespace) -> None:
    """The one combination add_shape_args' flags cannot make, refused by flag name."""
    if args.embedding_norm is False and (args.norm or "post") != "pre":
        fail("--no-embedding-norm needs --norm pre: a post-LN (BERT) stack normalises its embeddings")


# -----------------------------------------------------------------------------------------------------
# the loop's configuration, and the flags shared by pretrain.py and finetune.py made from it


def flag(default, help, **argparse_kw):
    """A TrainConfig field that is also a command-line flag (--name-with-dashes)."""
    return field(default=default, metadata={"help": help, **argparse_kw})


@dataclass
class TrainConfig:
    """Everything train() reads. Build it directly, or from parsed flags with TrainConfig.from_args."""
    out: str | None = flag(None, "output folder: checkpoint, exported model, metrics.jsonl")
    max_steps: int = flag(1000, "optimizer steps", type=int)
    batch_size: int = flag(32, "examples per micro-batch on each rank", type=int)
    grad_accum: int = flag(1, "micro-batches per optimizer step", type=int)
    lr: float = flag(5e-4, "peak learning rate", type=float)
    weight_decay: float = flag(0.01, "AdamW decoupled weight decay (not on biases/norms)", type=float)
    beta2: float = flag(0.98, "AdamW beta2 (beta1 = 0.9)", type=float)
    optimizer: str = flag("adamw", "adafactor (optim.py): factored second moments, no first moment; --lr is then "
                          "the cap on its relative step (the paper's 1e-2)", choices=["adamw", "adafactor"])
    warmup: float = flag(0.06, "warm-up steps, or a fraction of --max-steps if < 1", type=float)
    schedule: str = flag("linear", "decay after warm-up (wsd: hold the peak, decay linearly over the last --cooldown "
                         "steps; wsd-sqrt: the same with a 1 - sqrt decay)",
                         choices=["linear", "cosine", "constant", "wsd", "wsd-sqrt"])
    cooldown: float = flag(0.2, "--schedule wsd/wsd-sqrt: steps of the final decay, or a fraction of --max-steps if < 1",
                           type=float)
    clip: float = flag(1.0, "clip the global gradient norm (0: off)", type=float)
    amp: str = flag("none", "mixed precision", choices=["none", "bf16", "fp16"])
    compile: bool = flag(False, "torch.compile the model", action="store_true")
    fsdp: bool = flag(False, "shard parameters with FSDP2 fully_shard (under torchrun)", action="store_true")
    tp: int = flag(1, "tensor-parallel ranks per model replica (parallel.py); the world size must be a "
                   "multiple, the rest is data parallelism", type=int)
    eval_every: int = flag(200, "evaluate every N steps (0: only at the end)", type=int)
    save_every: int = flag(500, "checkpoint every N steps (0: only at the end)", type=int)
    log_every: int = flag(10, "write a metrics.jsonl line every N steps", type=int)
    seed: int = flag(1337, "seeds dropout (each rank its own) and the data order", type=int)
    resume: str | None = flag(None, "continue the run in --out (or from CHECKPOINT)", nargs="?", const="auto",
                              metavar="CHECKPOINT")
    stop_at_step: int | None = flag(None, "save a checkpoint and exit (code 75) at this step", type=int)
    allow_changed: str | None = flag(None, "--resume even though these settings differ from the saved run's, "
                                     "comma-separated (e.g. max_steps to train a finished run longer)")
    dist_timeout: float = flag(600, "seconds a collective may wait for the other ranks before failing "
                               "(a dead or frozen rank)", type=float)
    tensorboard: bool = flag(False, "also write TensorBoard event files to --out", action="store_true")
    wandb: str | None = flag(None, "also log to this Weights & Biases project (WANDB_MODE=offline: no network)",
                             metavar="PROJECT")
    device: str = flag("auto", "cpu, cuda, cuda:1, ... (auto: cuda when available)")
    no_progress: bool = flag(False, "no tqdm bar", action="store_true")
    seq_len: int | None = None        # not a flag: tokens per sequence for the MFU estimate (pretrain's --seq-len)

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides) -> "TrainConfig":
        """The fields found in parsed flags (pretrain's, finetune's), then `overrides`."""
        given = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        return cls(**(given | overrides))


def add_training_args(p: argparse.ArgumentParser, **defaults) -> argparse.ArgumentParser:
    """TrainConfig's flags, in one argument group; `defaults` overrides the caller's own defaults."""
    g = p.add_argument_group("training loop")
    for f in fields(TrainConfig):
        if "help" in f.metadata:
            g.add_argument("--" + f.name.replace("_", "-"), default=f.default, **f.metadata)
    p.set_defaults(**defaults)
    return p


# -----------------------------------------------------------------------------------------------------
# what finetune.py's flags offer. The tables behind them hold torch code (finetuned.TASKS, peft.METHODS),
# so the names and options live here and those tables are built on them (tests/test_cli.py checks the keys)

TASK_KINDS = ("binary", "multiclass", "pair", "regression", "simcse", "token", "qa", "prompt")   # finetuned.TASKS
# --task prompt: the cloze each sentence is put in, and one word per class, for SST-2-like sentiment
TEMPLATE, VERBALIZER = "{text} It was [MASK] .", "terrible,great"


def add_prompt_args(parser, defaults: bool = True):
    """--template and --verbalizer: finetune.py's --task prompt (defaults None there: they are refused with
    another task) and learning_curve.py's prompt row (defaults shown)."""
    parser.add_argument("--template", default=TEMPLATE if defaults else None,
                        help=f"--task prompt: the cloze each sentence is put in, {{text}} and [MASK] once each "
                             f"(default {TEMPLATE!r})")
    parser.add_argument("--verbalizer", default=VERBALIZER if defaults else None,
                        help=f"--task prompt: one word per class, comma-separated, in sorted label order; each "
                             f"must be one token (default {VERBALIZER!r})")


def template_problem(template: str, name: str = "--template") -> str | None:
    """Why a cloze template cannot be used (None when it can): the sentence and the [MASK] go in exactly once.
    The one check of it: finetune.py's and learning_curve.py's flags, and Tokenizer.set_template."""
    if template.count("{text}") != 1 or template.count("[MASK]") != 1:
        return f"{name} {template!r}: expected {{text}} once and [MASK] once"
    return None
SAMPLING = ("proportional", "temperature")          # multi-task: how a step picks its task (multitask.py)


def names(text: str) -> tuple[str, ...]:
    """A comma-separated flag value -> its names."""
    return tuple(t for t in text.split(",") if t)


# PEFT method -> its own options: name -> (default, flag type, help); peft.METHODS adds the code and the lr
PEFT_OPTIONS = {
    "full": {},
    "top": {"train_layers": (2, int, "top: how many top layers train")},
    "bitfit": {},
    "adapter": {"adapter_size": (64, int, "adapter: bottleneck width")},
    "lora": {"lora_r": (8, int, "lora: rank of the update"),
             "lora_alpha": (16, float, "lora: the update is scaled by alpha / r"),
             "lora_dropout": (0.0, float, "lora: dropout on the update's input"),
             "lora_targets": (("qkv", "proj"), names, "lora: comma-separated Linear names")},
    "prefix": {"prefix_len": (16, int, "prefix: virtual tokens per layer")},
}


def known_options() -> dict[str, tuple]:
    """Every PEFT method's options: name -> (default, flag type, help)."""
    return {name: spec for options in PEFT_OPTIONS.values() for name, spec in options.items()}


def fail(msg: str):
    """A user error: one line naming the flag/file and what was expected, exit code 2, no traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


# A pre-empted run (SIGTERM / SIGUSR1 / --stop-at-step) exits with this code: BSD's EX_TEMPFAIL, "try
# again later". Not 0, so that a pipeline never deploys or reports an unfinished model; `--resume` finishes it.
EX_TEMPFAIL = 75
