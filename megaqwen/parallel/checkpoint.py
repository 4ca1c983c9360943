"""Make model/optimizer state of a TP / DP / ZeRO-1 layout saveable with torch.distributed.checkpoint.

DCP de-duplicates plain tensors that share a key across ranks (it assumes they are replicas). TP
shards are plain local tensors with the same FQN on every TP rank, so they are wrapped here as
DTensors that say where each shard sits in the full tensor:
  TP only       DTensor over the tp mesh, Shard(tp_shard_dim)
  TP + FSDP2    FSDP's dp-sharded DTensor re-described over a (tp, dp) mesh:
                [Shard(tp_shard_dim), Shard(0)] - tp splits first, dp splits each TP shard.
Replicated KV heads (tp > num_kv_heads) are stored as tp shards, i.e. each copy once: right for
resuming the same layout; resharding (a later issue) must keep one copy in tp_replicas.
ZeRO-1's optimizer state lives only on its owning dp rank, under a per-rank key.

`sharded_state` builds the dict to pass to `dcp.save`/`dcp.load`; after `dcp.load`,
`load_sharded_state` puts the values back into the model and optimizer.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from megaqwen.parallel.dims import ParallelMesh

ZERO1_KEY = "optim_zero1"


def _is_zero1(optimizer) -> bool:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return isinstance(optimizer, ZeroRedundancyOptimizer)


def _tp_dp_mesh(mesh: ParallelMesh) -> DeviceMesh:
    """(tp, dp) mesh of this rank's pp/cp slice, reusing the existing groups."""
    coord = mesh.mesh.get_coordinate()
    pp, cp = coord[0], coord[2]
    ranks = mesh.mesh.mesh[pp, :, cp, :].T  # (tp, dp) global ranks
    return DeviceMesh.from_group([mesh.tp_group, mesh.dp_group], mesh.mesh.device_type, mesh=ranks,
                                 mesh_dim_names=("tp", "dp"))


def _param_tags(model: nn.Module) -> dict[str, int]:
    from megaqwen.parallel.data_parallel import unwrap

    return {n: p.tp_shard_dim for n, p in unwrap(model).named_parameters()
            if getattr(p, "tp_shard_dim", None) is not None}


def _wrap(t: torch.Tensor, dim: int, mesh: ParallelMesh, tp_dp: DeviceMesh | None) -> torch.Tensor:
    tp = mesh.dims.tp
    if isinstance(t, DTensor):  # FSDP2: Shard(0) of the TP-local tensor over dp
        local_tp_shape = list(t.shape)
        full = list(local_tp_shape)
        full[dim] *= tp
        return DTensor.from_local(t.to_local(), tp_dp, [Shard(dim), Shard(0)], run_check=False,
                                  shape=torch.Size(full), stride=_contiguous_stride(full))
    full = list(t.shape)
    full[dim] *= tp
    return DTensor.from_local(t, mesh.tp_mesh, [Shard(dim)], run_check=False, shape=torch.Size(full),
                              stride=_contiguous_stride(full))


def _contiguous_stride(shape: list[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= s
    return tuple(reversed(stride))


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                  mesh: ParallelMesh | None) -> dict[str, Any]:
    """{"model": ..., "optim": ...} ready for dcp.save / dcp.load (values share memory with the model)."""
    zero1 = optimizer is not None and _is_zero1(optimizer)
    opts = [] if optimizer is None or zero1 else optimizer
    model_sd, optim_sd = get_state_dict(model, opts)
    if mesh is not None and mesh.dims.tp > 1:
        tags = _param_tags(model)
        tp_dp = _tp_dp_mesh(mesh) if any(isinstance(v, DTensor) for v in model_sd.values()) else None
        for fqn, dim in tags.items():
            if fqn in model_sd:
                model_sd[fqn] = _wrap(model_sd[fqn], dim, mesh, tp_dp)
            st = optim_sd.get("state", {}).get(fqn)
            if st is not None:  # a new dict: get_state_dict shares the optimizer's own per-param dicts
                optim_sd["state"][fqn] = {
                    k: _wrap(v, dim, mesh, tp_dp) if isinstance(v, torch.Tensor) and v.dim() > 0 else v
                    for k, v in st.items()}
    state: dict[str, Any] = {"model": model_sd}
    if zero1:
        from torch.distributed.checkpoint.state_dict import _init_optim_state

        _init_optim_state(optimizer.optim)  # DCP loads in place: the local state must exist
        state[ZERO1_KEY] = {f"rank{dist.get_rank()}": optimizer.optim.state_dict()}
    elif optimizer is not None:
        state["optim"] = optim_sd
    return state


def load_sharded_state(state: dict[str, Any], model: nn.Module,
                       optimizer: torch.optim.Optimizer | None, mesh: ParallelMesh | None) -> None:
    """After `dcp.load(state, ...)`: copy the loaded values into model and optimizer."""
    tags = _param_tags(model) if mesh is not None and mesh.dims.tp > 1 else {}

    def back(fqn: str, v: Any) -> Any:
        if fqn not in tags or not isinstance(v, DTensor):
            return v
        local = v.to_local()
        if len(v.placements) == 2:  # TP + FSDP: back to FSDP's dp DTensor of the TP-local tensor
            shape = list(v.shape)
            shape[tags[fqn]] //= mesh.dims.tp
            return DTensor.from_local(local, mesh.dp_mesh, [Shard(0)], run_check=False,
                                      shape=torch.Size(shape), stride=_contiguous_stride(shape))
        return local

    model_sd = {k: back(k, v) for k, v in state["model"].items()}
    if optimizer is not None and _is_zero1(optimizer):
        set_state_dict(model, [], model_state_dict=model_sd, optim_state_dict={})
        optimizer.optim.load_state_dict(state[ZERO1_KEY][f"rank{dist.get_rank()}"])
        return
    if optimizer is None:
        set_state_dict(model, [], model_state_dict=model_sd, optim_state_dict={})
        return
    optim_sd = dict(state["optim"])
    optim_sd["state"] = {fqn: {k: back(fqn, v) for k, v in st.items()}
                         for fqn, st in optim_sd.get("state", {}).items()}
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)
