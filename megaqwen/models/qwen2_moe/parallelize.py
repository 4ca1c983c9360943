"""Tensor-parallel plan for Qwen2-MoE: only tp = 1 so far. Experts are spread by expert parallelism
instead (`megaqwen.parallel.expert_parallel`, applied after this plan)."""

from __future__ import annotations

from megaqwen.models.qwen2_moe.model import Qwen2MoeForCausalLM
from megaqwen.parallel.dims import ParallelMesh
from megaqwen.parallel.shards import ShardMap


def parallelize_tp(model: Qwen2MoeForCausalLM, mesh: ParallelMesh | None, sequence_parallel: bool = False,
                   linear_backend: str = "torch") -> ShardMap:
    """tp = 1 (or no mesh): nothing to shard, an empty ShardMap. tp > 1: ValueError."""
    if mesh is None or mesh.dims.tp == 1:
        return ShardMap(mesh)
    raise ValueError(f"tensor parallelism for qwen2_moe is not implemented yet (tp={mesh.dims.tp}); "
                     f"run {model.cfg.name!r} with tp=1 and spread its experts with parallel.ep")
