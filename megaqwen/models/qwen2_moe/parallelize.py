"""Tensor-parallel plan for Qwen2-MoE: Qwen2's plan for everything but the sparse blocks.

Attention, norms, embedding, head and the dense MLPs (mlp_only_layers, decoder_sparse_step) are
sharded exactly as in Qwen2 (`megaqwen.models.qwen2.parallelize`). Router and shared expert stay
whole on every TP rank: the block's input (the post-attention norm's output) is replicated over TP,
so each rank routes the same tokens, and the block's output and input grad come out replicated, as
the residual stream expects (router and shared-expert grads are identical on the TP ranks: the grad
norm counts them once, `ShardMap.tp_copies` = tp).

Routed experts (`parallel.etp`, resolved in `ParallelDims.etp`): with etp = k > 0 each expert's
intermediate dim is split over k TP ranks (etp rank = tp rank mod k): gate/up keep rows
[r*I/k, (r+1)*I/k) (column-parallel), down the same columns (row-parallel), recorded in the ShardMap
so initialisation, checkpoints and the grad norm see slices of the full tensors. The collectives
(partial sums over the etp group, the tp/k parts of the rows) are the dispatcher's, installed by
expert parallelism after this plan (`megaqwen.parallel.expert_parallel`). etp = 0: experts whole.

Sequence parallelism: a sparse block all-gathers its (B, T/tp, H) input and keeps its own slice of
the output (`gather_from_sp_split_grad` in, `split_to_sp` out), so every TP rank again routes the
whole sequence: the input grad each rank computes is already the full one (backward keeps its
slice), parameter grads stay identical over TP, and routing (load, aux) equals the non-SP run.
"""

from __future__ import annotations

import torch

from megaqwen.models.qwen2.model import MLP
from megaqwen.models.qwen2.parallelize import parallelize_tp as qwen2_parallelize_tp
from megaqwen.models.qwen2_moe.model import Qwen2MoeForCausalLM, SparseMoeBlock
from megaqwen.parallel.collectives import gather_from_sp_split_grad, split_to_sp
from megaqwen.parallel.dims import ParallelMesh
from megaqwen.parallel.shards import ShardMap, TensorShard


def parallelize_tp(model: Qwen2MoeForCausalLM, mesh: ParallelMesh | None, sequence_parallel: bool = False,
                   linear_backend: str = "torch") -> ShardMap:
    """Shard `model` in place over the mesh's "tp" dim (sparse blocks whole); returns the ShardMap."""
    if mesh is None or mesh.dims.tp == 1:
        return ShardMap(mesh)
    # Qwen2's plan shards every layer's MLP: give it a stand-in dense MLP (meta: no memory) where a
    # sparse block sits, put the block back after and forget the stand-in's shards.
    sparse = {i: layer.mlp for i, layer in model.model.layers.items()
              if isinstance(layer.mlp, SparseMoeBlock)}
    with torch.device("meta"):
        for i in sparse:
            model.model.layers[i].mlp = MLP(model.cfg, model.ops)
    try:
        shards = qwen2_parallelize_tp(model, mesh, sequence_parallel, linear_backend)
    finally:
        for i, block in sparse.items():
            model.model.layers[i].mlp = block
    etp = getattr(mesh.dims, "etp", 0)
    for i, block in sparse.items():
        for name in ("gate_proj", "up_proj", "down_proj"):
            shards.shards.pop(f"model.layers.{i}.mlp.{name}.weight", None)
        if etp > 1:
            _shard_experts(block, f"model.layers.{i}.mlp", etp, mesh.tp_rank % etp, shards)
        if sequence_parallel:
            _whole_sequence(block, mesh.tp_group)
    return shards


def _shard_experts(block: SparseMoeBlock, prefix: str, etp: int, rank: int, shards: ShardMap) -> None:
    """Expert TP: keep this etp rank's slice of every expert's intermediate dim (on meta: no copy)."""
    for key, expert in block.experts.items():
        for name, dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
            linear = getattr(expert, name)
            full = tuple(linear.weight.shape)
            if full[dim] % etp:
                raise ValueError(f"moe_intermediate_size={full[dim]} is not divisible by etp={etp}")
            n = full[dim] // etp
            piece = linear.weight.detach().narrow(dim, rank * n, n).clone()
            linear.weight = torch.nn.Parameter(piece, requires_grad=linear.weight.requires_grad)
            linear.in_features, linear.out_features = piece.shape[1], piece.shape[0]
            shards.add(f"{prefix}.experts.{key}.{name}.weight", TensorShard(full, dim, rank * n, n))


def _whole_sequence(block: SparseMoeBlock, group) -> None:
    """SP: the block sees the full sequence on every TP rank and hands back this rank's shard."""

    def pre(_mod, args):
        return (gather_from_sp_split_grad(args[0], group, dim=1), *args[1:])

    block.register_forward_pre_hook(pre)
    block.register_forward_hook(lambda _mod, _args, out: split_to_sp(out, group, dim=1))
