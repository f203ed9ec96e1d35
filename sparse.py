"""Sparse storage of pruned weights: a bitmask and the non-zero values, in safetensors.

    sparsify_folder(out)        model.safetensors -> model.sparse.safetensors (export.py, after --prune)
    tensors = load_sparse(f)    every tensor dense again, bit for bit (model.read_hf_weights calls it)

A matrix W with a fraction s of zeros is stored as `NAME.mask`, one bit per entry (uint8, eight entries a
byte, row-major, most significant bit first: numpy.packbits' order), and `NAME.values`, the (1 - s) n non-zero
entries in row-major order, in W's dtype. That costs n/8 + (1 - s) n b bytes against n b dense (b bytes per
entry), so a tensor is stored this way only when that is smaller: for fp32 from s > 1/32. The header's
metadata names the sparse tensors and their shapes; every other tensor is stored as it was. No pickled code.
"""
from __future__ import annotations

import json
import os

import torch

from atomic import atomic_write

DENSE_WEIGHTS = "model.safetensors"
SPARSE_WEIGHTS = "model.sparse.safetensors"
_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(keep: torch.Tensor) -> torch.Tensor:
    """bool (n,) -> uint8 (ceil(n / 8),): entry 8i + j is bit 7 - j of byte i."""
    padded = torch.zeros(-(-keep.numel() // 8) * 8, dtype=torch.bool)
    padded[:keep.numel()] = keep
    return (padded.view(-1, 8).to(torch.uint8) * _BITS).sum(1, dtype=torch.uint8)


def unpack_bits(mask: torch.Tensor, n: int) -> torch.Tensor:
    return ((mask[:, None] & _BITS) != 0).flatten()[:n]


def encode(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """(the tensors to write, {name: shape} of those stored sparsely)."""
    out, shapes = {}, {}
    for name, w in tensors.items():
        keep = (w != 0).flatten()
        nnz, n = int(keep.sum()), w.numel()
        if w.is_floating_point() and -(-n // 8) + nnz * w.element_size() < n * w.element_size():
            out[name + ".mask"] = pack_bits(keep)
            out[name + ".values"] = w.flatten()[keep].contiguous()
            shapes[name] = list(w.shape)
        else:
            out[name] = w.contiguous()
    return out, shapes


def save_sparse(tensors: dict[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save_file
    out, shapes = encode(tensors)
    with atomic_write(path) as tmp:
        save_file(out, tmp, metadata={"format": "pt", "sparse": json.dumps(shapes)})


def load_sparse(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a sparse file, all dense: zeros where the mask bit is 0, the values in order elsewhere."""
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        shapes = json.loads((f.metadata() or {}).get("sparse", "{}"))
        raw = {k: f.get_tensor(k) for k in f.keys()}
    out = {k: v for k, v in raw.items() if not (k.endswith((".mask", ".values")) and k.rsplit(".", 1)[0] in shapes)}
    for name, shape in shapes.items():
        values, n = raw[name + ".values"], 1
        for d in shape:
            n *= d
        keep = unpack_bits(raw[name + ".mask"], n)
        dense = torch.zeros(n, dtype=values.dtype)
        dense[keep] = values                                   # W = scatter(values) at mask  [eq:sparse-storage]
        out[name] = dense.view(shape)
    return out


def sparsify_folder(folder: str) -> None:
    """Rewrite a BERT-layout folder's model.safetensors as model.sparse.safetensors (then remove it)."""
    from safetensors.torch import load_file
    dense = os.path.join(folder, DENSE_WEIGHTS)
    save_sparse(load_file(dense), os.path.join(folder, SPARSE_WEIGHTS))
    os.remove(dense)
