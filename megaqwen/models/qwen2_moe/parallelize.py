"""Tensor-parallel plan for Qwen2-MoE: Qwen2's plan for everything but the sparse blocks.

Attention, norms, embedding, head and the dense MLPs (mlp_only_layers, decoder_sparse_step) are
sharded exactly as in Qwen2 (`megaqwen.models.qwen2.parallelize`). Sparse blocks stay whole on every
TP rank: their input (the post-attention norm's output) is replicated over TP, so each rank routes
the same tokens through the same experts, and the block's output and input grad come out replicated,
as the residual stream expects. No collective is needed; router, shared-expert and expert grads are
identical on the TP ranks (the grad norm counts them once: `ShardMap.tp_copies` = tp). Experts are
spread over ranks by expert parallelism instead (`megaqwen.parallel.expert_parallel`, after this plan;
its groups are per TP coordinate). Sequence parallelism is refused: sparse blocks would see different
token shards per TP rank and their grads would need a TP all-reduce that is not written yet.
"""

from __future__ import annotations

import torch

from megaqwen.models.qwen2.model import MLP
from megaqwen.models.qwen2.parallelize import parallelize_tp as qwen2_parallelize_tp
from megaqwen.models.qwen2_moe.model import Qwen2MoeForCausalLM, SparseMoeBlock
from megaqwen.parallel.dims import ParallelMesh
from megaqwen.parallel.shards import ShardMap


def parallelize_tp(model: Qwen2MoeForCausalLM, mesh: ParallelMesh | None, sequence_parallel: bool = False,
                   linear_backend: str = "torch") -> ShardMap:
    """Shard `model` in place over the mesh's "tp" dim (sparse blocks whole); returns the ShardMap."""
    if mesh is None or mesh.dims.tp == 1:
        return ShardMap(mesh)
    if sequence_parallel:
        raise ValueError(f"sequence parallelism with qwen2_moe is not implemented yet (tp={mesh.dims.tp}); "
                         f"run {model.cfg.name!r} with parallel.sequence_parallel=false")
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
    for i in sparse:
        for name in ("gate_proj", "up_proj", "down_proj"):
            shards.shards.pop(f"model.layers.{i}.mlp.{name}.weight", None)
    return shards
