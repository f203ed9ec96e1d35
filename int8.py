"""The int8 model format: per-row affine int8 weights, written by export.py --quantize int8 and read by
predict.load_model. Read beside docs/deployment.md.

    quantize_model(model)        in place: every Linear -> Int8Linear, the token embeddings -> Int8Embedding
    save_int8(out, model, ...)   config.json + model.int8.safetensors (codes, scales, zero points; no pickle)
    load_int8(out)               (model, tokenizer, info), as finetuned.load_finetuned gives for a float folder
"""
from __future__ import annotations

import json
import os
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from atomic import atomic_write, write_json
from model import CheckpointError, SequenceClassifier, config_from_hf, hf_config

INT8_WEIGHTS = "model.int8.safetensors"


def quantize_rows(w: torch.Tensor):
    """w (R, K) float -> codes (R, K) int8, scale (R,) float32, zero point (R,) int8; one (scale, zero)
    per row: per output channel of a Linear, per token of an embedding table."""
    w = w.detach().float()
    lo, hi = w.min(dim=1).values.clamp(max=0.0), w.max(dim=1).values.clamp(min=0.0)   # the range holds 0
    scale = (hi - lo) / 255.0                            # s = (max - min) / (2^8 - 1)  [eq:int8-scale]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))   # an all-zero row: any scale is exact
    zero = torch.round(-128.0 - lo / scale).clamp(-128, 127)  # 0 -> code z, min -> -128  [eq:int8-zero-point]
    q = (torch.round(w / scale[:, None]) + zero[:, None]).clamp(-128, 127)   # [eq:int8-quantize]
    return q.to(torch.int8), scale, zero.to(torch.int8)


def dequantize_rows(q, scale, zero):
    """x_hat = s (q - z), row by row; q may be any gather of rows with its scale and zero alongside."""
    return (q.float() - zero.float()[..., None]) * scale[..., None]   # [eq:int8-dequantize]


def _fbgemm_pack(q, scale, zero, bias):
    """The weight packed for fbgemm's int8 GEMM, or None where this torch build has no quantized CPU
    kernels (torch.ao quantization is deprecated; the float fallback then keeps int8 working)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            qw = torch._make_per_channel_quantized_tensor(q, scale.double(), zero.long(), 0)
            return torch.ops.quantized.linear_prepack(qw, bias)
    except (AttributeError, RuntimeError, NotImplementedError):
        return None


class Int8Linear(nn.Module):
    """A Linear whose weight is int8 codes + a scale and zero point per output row (CPU inference only).

    With fbgemm the product runs in int8: each call quantizes the activations per tensor from their own
    min/max (dynamic quantization; 7-bit, `reduce_range`, so the x86 int8 multiply-add cannot saturate) and
    accumulates in int32. Without it the weight is dequantized once to float: only disk and download shrink."""

    def __init__(self, q, scale, zero, bias=None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero)
        self.register_buffer("bias", bias)
        self.packed = _fbgemm_pack(q, scale, zero, bias)
        self.weight_float = dequantize_rows(q, scale, zero) if self.packed is None else None   # not saved

    def forward(self, x):
        if self.packed is None:
            return F.linear(x, self.weight_float.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        flat = x.reshape(-1, self.in_features).float().contiguous()                 # (B*T, in)
        y = torch.ops.quantized.linear_dynamic(flat, self.packed, True)              # (B*T, out)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)


class Int8Embedding(nn.Module):
    """A lookup table stored as int8 rows; the rows looked up are dequantized on the way out."""

    def __init__(self, q, scale, zero):
        super().__init__()
        self.num_embeddings, self.embedding_dim = q.shape
        self.register_buffer("weight_int8", q)
        self.register_buffer("scale", scale)
        self.register_buffer("zero_point", zero)

    def forward(self, ids):
        return dequantize_rows(self.weight_int8[ids], self.scale[ids], self.zero_point[ids])   # (B, T, C)


def _set_module(model: nn.Module, name: str, module: nn.Module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantize_model(model: nn.Module) -> nn.Module:
    """In place: every Linear becomes an Int8Linear, the token embedding table an Int8Embedding. The
    position and segment tables (used through .weight) and the LayerNorms stay float: they are small."""
    for name, m in list(model.named_modules()):
        if isinstance(m, nn.Linear):
            bias = None if m.bias is None else m.bias.detach().float().clone()
            _set_module(model, name, Int8Linear(*quantize_rows(m.weight), bias))
    model.encoder.embed.tok = Int8Embedding(*quantize_rows(model.encoder.embed.tok.weight))
    return model


def is_int8(model: nn.Module) -> bool:
    return any(isinstance(m, (Int8Linear, Int8Embedding)) for m in model.modules())


def load_int8(path: str):
    """(model, tokenizer, info) of a folder written by export.py --quantize int8: a float skeleton from
    config.json, the int8 modules rebuilt from the codes it finds, then a strict load of every tensor."""
    from safetensors.torch import load_file
    from tokenizer import load_tokenizer
    cfg_file, st_file = os.path.join(path, "config.json"), os.path.join(path, INT8_WEIGHTS)
    try:
        with open(cfg_file) as f:
            hf = json.load(f)
        with open(os.path.join(path, "labels.json")) as f:
            info = json.load(f)
        state = load_file(st_file)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot read the int8 model ({e})") from None
    model = SequenceClassifier(config_from_hf(hf, cfg_file), hf.get("num_labels", 2))
    for name in sorted({k[:-len(".weight_int8")] for k in state if k.endswith(".weight_int8")}):
        try:
            q, s, z = (state[f"{name}.{p}"] for p in ("weight_int8", "scale", "zero_point"))
            old = model.get_submodule(name)
        except (KeyError, AttributeError) as e:
            raise CheckpointError(f"{st_file}: int8 codes for {name} that the model cannot take ({e!r})") from None
        if tuple(old.weight.shape) != tuple(q.shape):
            raise CheckpointError(f"{st_file}: does not fit config.json ({name} is {tuple(q.shape)} here, "
                                  f"{tuple(old.weight.shape)} by the config)")
        new = Int8Linear(q, s, z, state.get(f"{name}.bias")) if isinstance(old, nn.Linear) else Int8Embedding(q, s, z)
        _set_module(model, name, new)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{st_file}: does not fit config.json ({str(e).splitlines()[0]})") from None
    return model.eval(), load_tokenizer(path), info


def save_int8(out: str, model: nn.Module, tokenizer, info: dict) -> None:
    """config.json (the BERT fields + "plainbert_weights"), model.int8.safetensors, the tokenizer, labels.json."""
    from safetensors.torch import save_file
    os.makedirs(out, exist_ok=True)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    with atomic_write(os.path.join(out, INT8_WEIGHTS)) as tmp:
        save_file(tensors, tmp, metadata={"format": "pt"})
    write_json(os.path.join(out, "config.json"), hf_config(model.config) | {
        "architectures": ["BertForSequenceClassification"], "num_labels": model.num_labels,
        "plainbert_weights": INT8_WEIGHTS})
    tokenizer.save(out)
    write_json(os.path.join(out, "labels.json"), info)
