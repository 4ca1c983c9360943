"""Tensor-parallel plan for Qwen2-MoE: only tp = 1 so far (expert and tensor parallelism for the
sparse layers are the next slice of issue 13)."""

from __future__ import annotations

from megaqwen.models.qwen2_moe.model import Qwen2MoeForCausalLM
from megaqwen.parallel.dims import ParallelMesh
from megaqwen.parallel.shards import ShardMap


def parallelize_tp(model: Qwen2MoeForCausalLM, mesh: ParallelMesh | None, sequence_parallel: bool = False,
                   linear_backend: str = "torch") -> ShardMap:
    """tp = 1 (or no mesh): nothing to shard, an empty ShardMap. tp > 1: ValueError."""
    if mesh is None or mesh.dims.tp == 1:
        return ShardMap(mesh)
    raise ValueError(f"expert/tensor parallelism for qwen2_moe is not implemented yet "
                     f"(tp={mesh.dims.tp}); run {model.cfg.name!r} with tp=1")
