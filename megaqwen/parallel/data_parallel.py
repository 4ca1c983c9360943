"""Data parallelism, applied last (after TP/SP, recompute, compile): DDP, ZeRO-1 and FSDP2 over dp.

  ddp    DistributedDataParallel over the dp group, gradients all-reduced in buckets during backward.
  zero1  DDP for gradients + `ZeroRedundancyOptimizer`: each dp rank keeps the optimizer state of
         its share of the parameters, steps it, and broadcasts the updated parameters.
  fsdp   FSDP2 `fully_shard` on every decoder layer and on the root (ZeRO-3-like: parameters,
         gradients and optimizer state sharded over dp, layers all-gathered just in time).
DeepSpeed, the alternative engine, lives in `deepspeed_engine.py`.

With tp > 1 the wrapped parameters are TP-local shards, so every wrapper only ever talks to the
dp group: TP and DP reductions are over disjoint groups and commute.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from megaqwen.parallel.dims import ParallelMesh

log = logging.getLogger(__name__)

DP_MODES = ("ddp", "zero1", "fsdp")


def dp_reduce_mesh(mesh: ParallelMesh) -> DeviceMesh:
    """Ranks that hold the same parameters and average gradients: dp, times cp when cp > 1."""
    if mesh.dims.cp == 1:
        return mesh.mesh["dp"]
    return mesh.mesh["dp", "cp"]._flatten("dp_cp")


def apply_fsdp(model: nn.Module, mesh: ParallelMesh, layers: nn.ModuleDict,
               reshard_after_forward: bool = True, mp_param_dtype: torch.dtype | None = None) -> nn.Module:
    """FSDP2 in place: every block in `layers`, then the root. Works on the meta device (apply it
    before materialising). `mp_param_dtype` (e.g. bf16) is the dtype parameters are all-gathered
    and computed in; gradients are reduced in fp32 and the sharded fp32 parameters stay the
    optimizer's master weights."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dp_mesh = dp_reduce_mesh(mesh)
    if dp_mesh.size() == 1:
        log.info("dp=1: no FSDP sharding")
        return model
    mp = MixedPrecisionPolicy(param_dtype=mp_param_dtype, reduce_dtype=torch.float32)
    blocks = list(layers.values())
    for i, layer in enumerate(blocks):
        # the last layer is resharded by the root right after anyway
        fully_shard(layer, mesh=dp_mesh, mp_policy=mp,
                    reshard_after_forward=reshard_after_forward and i < len(blocks) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    return model


def wrap_ddp(model: nn.Module, mesh: ParallelMesh, bucket_cap_mb: float = 25.0) -> nn.Module:
    """DistributedDataParallel over the dp (x cp) group, for materialised weights (DDP broadcasts
    rank 0's values on construction, so it is the one wrapper applied after initialisation)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    dp_mesh = dp_reduce_mesh(mesh)
    if dp_mesh.size() == 1:
        return model
    device_ids = [torch.cuda.current_device()] if dp_mesh.device_type == "cuda" else None
    return DDP(model, process_group=dp_mesh.get_group(), bucket_cap_mb=bucket_cap_mb,
               device_ids=device_ids)  # no buffers to broadcast (RoPE tables are built per batch)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under a DDP wrapper (FSDP2 and TP modify the model in place)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def build_optimizer(params: Iterable[Any], mesh: ParallelMesh, mode: str,
                    optimizer_class: type[torch.optim.Optimizer] = torch.optim.AdamW,
                    **kwargs: Any) -> torch.optim.Optimizer:
    """`optimizer_class(params, **kwargs)`, or its ZeRO-1 sharded form when mode == "zero1".
    `params` are tensors or param-group dicts, as for any torch optimizer."""
    dp_mesh = dp_reduce_mesh(mesh)
    if mode == "zero1" and dp_mesh.size() > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        return ZeroRedundancyOptimizer(params, optimizer_class=optimizer_class,
                                       process_group=dp_mesh.get_group(), **kwargs)
    return optimizer_class(params, **kwargs)
