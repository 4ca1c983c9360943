"""Data-parallel wrappers, applied last (after TP/SP): DDP, ZeRO-1 and FSDP2 over the mesh's dp dim.

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
TP_TAGS = ("tp_shard_dim", "tp_replicas", "tensor_model_parallel")


def dp_reduce_mesh(mesh: ParallelMesh) -> DeviceMesh:
    """Ranks that hold the same parameters and average gradients: dp, times cp when cp > 1."""
    if mesh.dims.cp == 1:
        return mesh.mesh["dp"]
    return mesh.mesh["dp", "cp"]._flatten("dp_cp")


def apply_data_parallel(model: nn.Module, mesh: ParallelMesh, mode: str = "ddp",
                        bucket_cap_mb: float = 25.0, reshard_after_forward: bool = True,
                        mp_param_dtype: torch.dtype | None = None) -> nn.Module:
    """Wrap `model` for data parallelism; returns the module to call (DDP returns a wrapper)."""
    if mode not in DP_MODES:
        raise ValueError(f"parallel.dp_mode must be one of {DP_MODES}, got {mode!r}")
    dp_mesh = dp_reduce_mesh(mesh)
    if dp_mesh.size() == 1:
        log.info("dp=1: no data-parallel wrapper")
        return model
    if mode in ("ddp", "zero1"):
        from torch.nn.parallel import DistributedDataParallel as DDP

        device_ids = [torch.cuda.current_device()] if dp_mesh.device_type == "cuda" else None
        return DDP(model, process_group=dp_mesh.get_group(), bucket_cap_mb=bucket_cap_mb,
                   device_ids=device_ids, broadcast_buffers=False)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=mp_param_dtype, reduce_dtype=torch.float32) \
        if mp_param_dtype is not None else MixedPrecisionPolicy()
    # fully_shard swaps every parameter for a new DTensor Parameter: carry the TP tags over
    tags = {n: {k: getattr(p, k) for k in TP_TAGS if hasattr(p, k)} for n, p in model.named_parameters()}
    layers = list(model.model.layers.values())
    for i, layer in enumerate(layers):
        # the last layer is resharded by the root right after anyway
        fully_shard(layer, mesh=dp_mesh, mp_policy=mp,
                    reshard_after_forward=reshard_after_forward and i < len(layers) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    for n, p in model.named_parameters():
        for k, v in tags.get(n, {}).items():
            setattr(p, k, v)
    return model


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
