"""Tensor parallelism (Megatron-LM, Shoeybi et al. 2019), kept out of model.py as torchtitan keeps it: one
function rewrites a built model's blocks in place. Read beside docs/distributed.md ("Tensor parallelism").

    world = dp x tp ranks on a 2-D mesh ("dp", "tp"); tensor-parallel peers are neighbouring ranks
    in each block:  attn.qkv, ffn.fc1 split by output columns  (each rank: its heads / its FFN slice)
                    attn.proj, ffn.fc2 split by input rows      (partial sums, one all-reduce after each)

The split uses torch.distributed.tensor.parallel, so each weight is a DTensor: the rank holds its shard, and
full_tensor() / the trainer's full state dict give the whole, unsharded weight back in its usual layout.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
# _StridedShard is torch's placement for "split into k blocks, shard each block"; FSDP2 uses it under TP.
from torch.distributed.tensor.placement_types import _StridedShard


def make_mesh(device_type: str, world: int, tp: int):
    """The ("dp", "tp") device mesh: rank = dp_index * tp + tp_index, so each model replica's tensor-parallel
    ranks are neighbours (one machine, the fast links: TP talks twice per block, DP once per step)."""
    return init_device_mesh(device_type, (world // tp, tp), mesh_dim_names=("dp", "tp"))


class FusedQKVColwise(ColwiseParallel):
    """Column split of the fused [W_Q; W_K; W_V] (3C x C) so that each rank holds whole heads.

    A plain column split cuts the 3C output rows into contiguous pieces: with 2 ranks, rank 0 would get all
    of Q and half of K. Split each of the three C-row blocks instead, and rank r holds [W_Q^r; W_K^r; W_V^r],
    the q, k and v rows of heads r*nh/tp ... (r+1)*nh/tp - 1: its output (B, T, 3C/tp) is what
    SelfAttention.attend splits in three, with nh/tp heads.  [eq:tp-qkv]"""

    def _partition_linear_fn(self, name, module, device_mesh):
        for pname, param in list(module.named_parameters(recurse=False)):
            shard = distribute_tensor(param, device_mesh, [_StridedShard(0, split_factor=3)])
            module.register_parameter(pname, torch.nn.Parameter(shard))

    @staticmethod
    def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
        # the output is already this rank's [q | k | v] columns; ColwiseParallel would redistribute it to a
        # contiguous column split, which is the wrong columns here
        return outputs.to_local()


def tensor_parallel(model: torch.nn.Module, tp_mesh) -> torch.nn.Module:
    """Split every block of `model.encoder` over the ranks of tp_mesh, in place. The embeddings, norms and
    heads stay whole on every rank (replicated): small, and what the blocks read and write is replicated.

    Attention: Y = concat_r softmax(Q_r K_r^T / sqrt(d)) V_r, each rank r its heads; Y W_O = sum_r Y_r W_O^r.
    FFN: GELU(X W_1) W_2 = sum_r GELU(X W_1^r) W_2^r, W_1 split by columns and W_2 by rows.  [eq:tp-split]
    Forward: one all-reduce after attn.proj and one after ffn.fc2; backward: one each at the block inputs."""
    tp = tp_mesh.size()
    cfg = model.config
    if cfg.num_heads % tp or cfg.intermediate_size % tp or cfg.layer_heads:
        raise ValueError(f"--tp {tp}: needs num_heads ({cfg.num_heads}) and intermediate_size "
                         f"({cfg.intermediate_size}) divisible by it, and no pruned heads")
    if cfg.unpad:
        raise ValueError(f"--tp {tp}: the unpadded attention path is not tensor-parallel; use padded batches")
    for block in model.encoder.blocks:
        parallelize_module(block, tp_mesh, {
            "attn.qkv": FusedQKVColwise(),
            "attn.proj": RowwiseParallel(),
            "ffn.fc1": ColwiseParallel(),
            "ffn.fc2": RowwiseParallel(),
        })
        block.attn.num_heads //= tp                  # the rank-local view: attend() splits its heads only
    return model


def all_reduce_grads(model: torch.nn.Module, group) -> None:
    """Data parallelism beside tensor parallelism: average each local gradient (shard) over the replicas in
    `group` (the "dp" mesh dimension), as DDP's all-reduce does; the loop's loss factor expects the mean."""
    n = dist.get_world_size(group)
    for p in model.parameters():
        if p.grad is not None:
            g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            dist.all_reduce(g, group=group)
            g.div_(n)


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ for a model whose parameters are partly DTensors, partly plain tensors
    (torch's version refuses the mix): a sharded gradient's norm is summed over its shards (full_tensor() of
    a partial norm), a replicated one counted once. The same global-norm clip as the single-device loop."""
    grads = [p.grad for p in parameters if p.grad is not None]
    norms = [g.norm().full_tensor() if isinstance(g, DTensor) else g.norm() for g in grads]
    total = torch.stack(norms).norm()
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0).item()      # fp32, as torch's
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return total
