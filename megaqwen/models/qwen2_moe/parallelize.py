"""Tensor-parallel plan for Qwen2-MoE: Qwen2's plan for everything but the sparse blocks.

Attention, norms, embedding, head and the dense MLPs (mlp_only_layers, decoder_sparse_step) are
sharded exactly as in Qwen2 (`megaqwen.models.qwen2.parallelize`). Sparse blocks stay whole on every
TP rank: their input (the post-attention norm's output) is replicated over TP, so each rank routes
the same tokens through the same experts, and the block's output and input grad come out replicated,
as the residual stream expects. No collective is needed; router, shared-expert and expert grads are
identical on the TP ranks (the grad norm counts them once: `ShardMap.tp_copies` = tp). Experts are
spread over ranks by expert parallelism instead (`megaqwen.parallel.expert_parallel`, after this plan;
its groups are per TP coordinate).

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
from megaqwen.parallel.shards import ShardMap


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
    for i, block in sparse.items():
        for name in ("gate_proj", "up_proj", "down_proj"):
            shards.shards.pop(f"model.layers.{i}.mlp.{name}.weight", None)
        if sequence_parallel:
            _whole_sequence(block, mesh.tp_group)
    return shards


def _whole_sequence(block: SparseMoeBlock, group) -> None:
    """SP: the block sees the full sequence on every TP rank and hands back this rank's shard."""

    def pre(_mod, args):
        return (gather_from_sp_split_grad(args[0], group, dim=1), *args[1:])

    block.register_forward_pre_hook(pre)
    block.register_forward_hook(lambda _mod, _args, out: split_to_sp(out, group, dim=1))
