"""Parameter-efficient fine-tuning: train a small part of a pre-trained encoder, or a few added parameters.

Read beside docs/finetuning.md. One entry point changes a model in place:

    apply_peft(model, method, **options)   full | top | bitfit | adapter | lora | prefix

`METHODS` is the one table of methods: name -> the function that applies it (its checks first), its usual
peak learning rate, and its options with their defaults (config.PEFT_OPTIONS, torch-free: finetune.py
makes its flags from them before it imports torch). A new method is one function, one row and its options
in config.PEFT_OPTIONS; a module it adds subclasses `PeftModule`, so saving, counting and `without_peft`
know it.

Every method touches the model only through small hooks, so model.py knows nothing about it: it freezes
and unfreezes parameters, wraps the Linear layers it adapts (LoRALinear, AdaptedLinear: they keep the
wrapped layer's own `weight` and `bias` Parameters under the same names), or sets the `prefix` hook of
each SelfAttention. The task head (everything outside `.encoder`: a classifier's pooler and classifier)
always trains.

Saving: `save_peft` writes peft.json (method + options) and peft.safetensors (every parameter the method
trains: the added ones, the unfrozen base ones such as BitFit's biases, and the head). The Hugging Face
layout knows nothing of LoRA or adapters, so the base model is written inside `without_peft(model)`:

    with without_peft(model):
        save_hf_bert(model, out)            # base + head, in the BERT layout
    save_peft(model, out, method, options)  # the PEFT parameters
    ...
    model = from_hf_bert(out, head="classifier", num_labels=n); load_peft(model, out)   # the same model

A LoRA model can instead be merged (`merge_lora`) into a plain model that any BERT reader loads.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from atomic import atomic_write
from config import PEFT_OPTIONS, known_options
from model import unwrap

class PeftError(ValueError):
    """Bad PEFT options or a PEFT checkpoint that does not fit the model; the message says which."""


def linear_like(weight: nn.Parameter, bias: nn.Parameter | None) -> nn.Linear:
    """A plain nn.Linear holding the given Parameters (built on the meta device: nothing is initialised)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight, lin.bias = weight, bias
    return lin


# -----------------------------------------------------------------------------------------------------
# the modules PEFT adds


class PeftModule(nn.Module):
    """A module a PEFT method adds. A wrapper keeps the wrapped layer's `weight` and `bias` under those
    names; every other parameter of it is added by the method (and saved by save_peft)."""

    def plain(self) -> nn.Module | None:
        """What stands in its place inside without_peft (the BERT layout has no name for it); None: nothing."""
        return None

    def added_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if n not in ("weight", "bias")}


class LoRALinear(PeftModule):
    """A frozen Linear plus a trainable low-rank update (Hu et al. 2021).

    A is (r, in) with Kaiming-uniform init, B is (out, r) with zeros: BA = 0, so training starts exactly
    at the pre-trained model, and the update learns only a rank-r change of W.
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight                          # W0 (out, in): the same Parameter, the same name
        self.register_parameter("bias", base.bias)
        self.r, self.alpha, self.scale = r, alpha, alpha / r
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))   # as nn.Linear initialises its weight
        self.drop = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x):
        # y = x W0^T + b + (alpha/r) dropout(x) A^T B^T: two thin matmuls, (.., in) -> (.., r) -> (.., out)  [eq:lora]
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(F.linear(self.drop(x), self.lora_A), self.lora_B)

    def merged(self) -> nn.Linear:
        """W <- W0 + (alpha/r) B A: one plain Linear giving the same outputs, with no extra cost.  [eq:lora-merge]"""
        with torch.no_grad():
            w = self.weight + self.scale * (self.lora_B @ self.lora_A)      # (out, r) @ (r, in) -> (out, in)
        return linear_like(nn.Parameter(w, requires_grad=self.weight.requires_grad), self.bias)

    def plain(self) -> nn.Linear:
        return linear_like(self.weight, self.bias)

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}"


class Adapter(nn.Module):
    """Houlsby et al. 2019 bottleneck: down-project to m, GELU, up-project back, plus the input itself.

    `up` starts at zero, so at init the adapter is the identity and the model is the pre-trained one.
    """

    def __init__(self, width: int, size: int, device=None, dtype=None):
        super().__init__()
        self.down = nn.Linear(width, size, device=device, dtype=dtype)
        self.up = nn.Linear(size, width, device=device, dtype=dtype)
        nn.init.normal_(self.down.weight, std=0.02)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h):
        # a(h) = h + W_up GELU(W_down h + b_down) + b_up: (B, T, C) -> (B, T, m) -> (B, T, C)  [eq:adapter]
        return h + self.up(F.gelu(self.down(h)))


class AdaptedLinear(PeftModule):
    """A frozen Linear whose output goes through an Adapter: wraps attn.proj and ffn.fc2, so the adapter
    sits after each sublayer's output projection, before the residual add and LayerNorm of the block."""

    def __init__(self, base: nn.Linear, size: int):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        self.adapter = Adapter(self.out_features, size, device=base.weight.device, dtype=base.weight.dtype)

    def forward(self, x):
        return self.adapter(F.linear(x, self.weight, self.bias))

    def plain(self) -> nn.Linear:
        return linear_like(self.weight, self.bias)


class Prefix(PeftModule):
    """Prefix tuning (Li & Liang 2021): P learned keys and values per layer that every query may attend to,
    as if P virtual tokens stood before the input. Set on `SelfAttention.prefix`, which concatenates them:

        K' = [P_K; K],  V' = [P_V; V]   (per head; the prefix columns are never masked)

    Stored directly as parameters (the paper re-parameterises them through an MLP while training, for
    stability; a direct parameter trains too, and needs nothing to fold away afterwards).
    """

    def __init__(self, num_heads: int, length: int, head_dim: int, device=None, dtype=None):
        super().__init__()
        self.k = nn.Parameter(torch.randn(num_heads, length, head_dim, device=device, dtype=dtype) * 0.02)
        self.v = nn.Parameter(torch.randn(num_heads, length, head_dim, device=device, dtype=dtype) * 0.02)

    def forward(self):
        return self.k, self.v                               # (nh, P, hs) each


PEFT_MODULES = PeftModule          # for isinstance(m, PEFT_MODULES)


# -----------------------------------------------------------------------------------------------------
# the methods: each checks its options, then changes the encoder and returns the base parameters that
# train (the parameters of the modules it adds train anyway, and so does the task head)


def _check(cond: bool, msg: str):
    if not cond:
        raise PeftError(msg)


def full(encoder):
    return list(encoder.parameters())


def top(encoder, train_layers):
    blocks = encoder.blocks
    _check(0 <= train_layers <= len(blocks), f"train_layers must be in 0..{len(blocks)}, got {train_layers}")
    top = list(blocks)[len(blocks) - train_layers:]
    if train_layers:
        top.append(encoder.final_norm)                      # a pre-LN stack's last norm sits above the top block
    return [p for module in top for p in module.parameters()]


def bitfit(encoder):
    return [p for name, p in encoder.named_parameters() if name.endswith("bias")]   # Linear biases, LN betas


def adapter(encoder, adapter_size):
    _check(adapter_size >= 1, f"adapter_size must be >= 1, got {adapter_size}")
    for block in encoder.blocks:
        block.attn.proj = AdaptedLinear(block.attn.proj, adapter_size)
        block.ffn.fc2 = AdaptedLinear(block.ffn.fc2, adapter_size)
    # Houlsby et al. also train the LayerNorms
    return [p for m in encoder.modules() if isinstance(m, nn.LayerNorm) for p in m.parameters()]


def lora(encoder, lora_r, lora_alpha, lora_dropout, lora_targets):
    for name in _lora_layers(encoder, lora_r, lora_alpha, lora_dropout, tuple(lora_targets)):
        parent, _, child = name.rpartition(".")
        owner = encoder.get_submodule(parent)
        setattr(owner, child, LoRALinear(getattr(owner, child), lora_r, lora_alpha, lora_dropout))
    return []


def prefix(encoder, prefix_len):
    _check(prefix_len >= 1, f"prefix_len must be >= 1, got {prefix_len}")
    for block in encoder.blocks:
        attn, w = block.attn, block.attn.qkv.weight
        attn.prefix = Prefix(attn.num_heads, prefix_len, attn.head_dim, device=w.device, dtype=w.dtype)
    return []


def _lora_layers(encoder: nn.Module, r, alpha, dropout, targets: tuple[str, ...]) -> list[str]:
    """The names of the encoder's Linears that end in one of `targets`, after checking the LoRA options."""
    _check(isinstance(r, int) and r >= 1, f"lora_r must be an integer >= 1, got {r!r}")
    _check(alpha > 0, f"lora_alpha must be > 0, got {alpha}")
    _check(0.0 <= dropout < 1.0, f"lora_dropout must be in [0, 1), got {dropout}")
    linears = [name for name, m in encoder.named_modules() if isinstance(m, nn.Linear)]
    for target in targets:
        _check(any(n == target or n.endswith("." + target) for n in linears),
               f"lora target {target!r} matches no Linear in the encoder (its Linear layers end in "
               f"{', '.join(sorted({n.rsplit('.', 1)[-1] for n in linears}))})")
    return [n for n in linears if any(n == t or n.endswith("." + t) for t in targets)]


@dataclass(frozen=True)
class Method:
    apply: Callable                 # (encoder, **its options) -> the base parameters that train
    lr: float                       # peak learning rate: the usual range from the method's paper
    options: dict = field(default_factory=dict)   # option -> (default, flag type, help): config.PEFT_OPTIONS


# Fewer trainable parameters, most of them new, take larger steps; a full fine-tune of a pre-trained model
# must not wash it out.
METHODS = {
    "full": Method(full, 5e-5),
    "top": Method(top, 1e-4, PEFT_OPTIONS["top"]),
    "bitfit": Method(bitfit, 1e-3),
    "adapter": Method(adapter, 1e-3, PEFT_OPTIONS["adapter"]),
    "lora": Method(lora, 5e-4, PEFT_OPTIONS["lora"]),
    "prefix": Method(prefix, 5e-3, PEFT_OPTIONS["prefix"]),
}


def _encoder(model: nn.Module) -> tuple[str, nn.Module]:
    """(what the encoder's parameter names start with, the encoder), for an Encoder or a model holding one."""
    model = unwrap(model)
    if hasattr(model, "encoder"):
        return "encoder.", model.encoder
    if hasattr(model, "blocks"):
        return "", model
    raise PeftError(f"{type(model).__name__} has no .encoder (expected an Encoder, LanguageModel or SequenceClassifier)")


def apply_peft(model: nn.Module, method: str, **given) -> None:
    """Freeze / unfreeze and insert the method's modules, in place. `given`: options of any method (each
    method takes its own; the rest are ignored, so one set of flags serves all). Call it before wrapping
    the model in DDP or torch.compile, and before building the optimizer (which takes only trainable
    parameters). A bad option raises PeftError and leaves the model as it was."""
    model = unwrap(model)
    in_encoder, encoder = _encoder(model)
    _check(method in METHODS, f"PEFT method must be one of {', '.join(METHODS)}, got {method!r}")
    unknown = sorted(set(given) - set(known_options()))
    _check(not unknown, f"unknown PEFT options {unknown}")
    _check(not any(isinstance(m, PeftModule) for m in model.modules()),
           "the model already has PEFT modules (apply a method once, to a fresh model)")
    spec = METHODS[method]
    base = spec.apply(encoder, **{k: given.get(k, default) for k, (default, _, _) in spec.options.items()})
    trains = {id(p) for p in [*base, *added_parameters(model).values()]}
    for p in model.parameters():
        p.requires_grad_(id(p) in trains)
    if in_encoder:                                          # the task head always trains (an Encoder has none)
        for name, p in model.named_parameters():
            if not name.startswith(in_encoder):
                p.requires_grad_(True)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight and put a plain nn.Linear back (same outputs in eval
    mode; LoRA dropout is off there). Returns the model, changed in place."""
    raw = unwrap(model)
    for name, m in list(raw.named_modules()):
        if isinstance(m, LoRALinear):
            parent, _, child = name.rpartition(".")
            setattr(raw.get_submodule(parent) if parent else raw, child, m.merged())
    return model


@contextlib.contextmanager
def without_peft(model: nn.Module):
    """Inside this block the model is its base + head: LoRA and adapter wrappers are swapped for plain
    Linears holding the same (unmerged) weights, prefixes are unset. For save_hf_bert, which writes the
    BERT layout and has no names for PEFT parameters. Everything is put back on leaving."""
    raw = unwrap(model)
    swaps = []                                              # (owner, attribute, PEFT module, stand-in)
    for name, m in raw.named_modules():
        parent, _, child = name.rpartition(".")
        if isinstance(m, PeftModule):
            swaps.append((raw.get_submodule(parent) if parent else raw, child, m, m.plain()))
    for owner, attr, _, stand_in in swaps:
        setattr(owner, attr, stand_in)
    try:
        yield model
    finally:
        for owner, attr, module, _ in swaps:
            setattr(owner, attr, module)


# -----------------------------------------------------------------------------------------------------
# what trains, and saving it


def added_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters PEFT added (LoRA A and B, adapters, prefixes), by name; not the wrapped base ones."""
    found = {}
    for mod_name, m in unwrap(model).named_modules():
        if isinstance(m, PeftModule):
            pre = mod_name + "." if mod_name else ""
            found.update({pre + n: p for n, p in m.added_parameters().items()})
    return found


def trainable_summary(model: nn.Module) -> dict:
    """trainable / total parameter counts, percent = 100 trainable / total, the trainable names, and
    encoder_percent = 100 (trainable encoder parameters, head excluded) / (the base encoder's parameters,
    PEFT additions excluded): the fraction of the pre-trained encoder that fine-tuning adds or changes."""
    named = list(unwrap(model).named_parameters())
    in_encoder, _ = _encoder(model)
    added = set(added_parameters(model))
    total = sum(p.numel() for _, p in named)
    trainable = sum(p.numel() for _, p in named if p.requires_grad)
    encoder_params = [(n, p) for n, p in named if n.startswith(in_encoder)]
    encoder_total = sum(p.numel() for n, p in encoder_params if n not in added)
    encoder_trainable = sum(p.numel() for _, p in encoder_params if p.requires_grad)
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1),
            "encoder_trainable": encoder_trainable, "encoder_total": encoder_total,
            "encoder_percent": 100.0 * encoder_trainable / max(encoder_total, 1),
            "names": [n for n, p in named if p.requires_grad]}


def peft_state_dict(model: nn.Module) -> dict:
    """What fine-tuning changed: the PEFT-added parameters and every other trainable one (the unfrozen
    base parameters of top/bitfit/adapter, and the head), by name. For `full` that is the whole model."""
    added = set(added_parameters(model))
    return {n: p.detach() for n, p in unwrap(model).named_parameters() if p.requires_grad or n in added}


def load_peft_state_dict(model: nn.Module, state: dict) -> None:
    """Copy `state` into a model that already has the same method applied. Every key must name one of
    its parameters with the same shape, and every PEFT-added parameter must be given."""
    params = dict(unwrap(model).named_parameters())
    unknown = sorted(k for k in state if k not in params)
    _check(not unknown, f"parameters not in the model: {', '.join(unknown[:8])}")
    missing = [k for k in added_parameters(model) if k not in state]
    _check(not missing, f"PEFT parameters missing: {', '.join(missing[:8])}")
    for k, v in state.items():
        _check(tuple(v.shape) == tuple(params[k].shape),
               f"{k} has shape {tuple(v.shape)}, the model has {tuple(params[k].shape)}")
    with torch.no_grad():
        for k, v in state.items():
            params[k].copy_(v)


def save_peft(model: nn.Module, out_dir: str, method: str, options: dict | None = None) -> None:
    """Write out_dir/peft.json ({"method", "options"}: apply_peft's arguments) and out_dir/peft.safetensors
    (peft_state_dict), each atomically."""
    from safetensors.torch import save_file
    options = dict(options or {})
    _check(method in METHODS, f"PEFT method must be one of {', '.join(METHODS)}, got {method!r}")
    unknown = sorted(set(options) - set(known_options()))
    _check(not unknown, f"unknown PEFT options {unknown}")
    options = {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}
    os.makedirs(out_dir, exist_ok=True)
    tensors = {k: v.cpu().contiguous() for k, v in peft_state_dict(model).items()}
    with atomic_write(os.path.join(out_dir, "peft.safetensors")) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    with atomic_write(os.path.join(out_dir, "peft.json")) as tmp, open(tmp, "w") as f:
        json.dump({"method": method, "options": options}, f, indent=2)


def load_peft(model: nn.Module, out_dir: str) -> dict:
    """Re-apply the method saved in out_dir to `model` (a fresh base + head) and load its parameters.
    Returns the peft.json contents."""
    from safetensors.torch import load_file
    cfg_path, st_path = os.path.join(out_dir, "peft.json"), os.path.join(out_dir, "peft.safetensors")
    _check(os.path.isfile(cfg_path), f"{cfg_path}: not found (expected a folder written by save_peft)")
    try:
        with open(cfg_path) as f:
            cfg = json.load(f)
        method, options = cfg["method"], dict(cfg.get("options", {}))
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise PeftError(f"{cfg_path}: expected JSON with a 'method' and 'options' ({e!r})") from None
    try:
        apply_peft(model, method, **options)
    except TypeError as e:                                  # an option apply_peft does not take
        raise PeftError(f"{cfg_path}: {e}") from None
    except PeftError as e:
        raise PeftError(f"{cfg_path}: {e}") from None
    _check(os.path.isfile(st_path), f"{st_path}: not found")
    try:
        state = load_file(st_path)
    except Exception as e:                                  # truncated file, bad header
        raise PeftError(f"{st_path}: cannot read ({e})") from None
    try:
        load_peft_state_dict(model, state)                  # copy_ moves each tensor to its parameter's device
    except PeftError as e:
        raise PeftError(f"{st_path}: {e}") from None
    return cfg

