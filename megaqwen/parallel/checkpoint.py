"""Make model/optimizer state of a TP / DP / ZeRO-1 layout saveable with torch.distributed.checkpoint.

DCP de-duplicates plain tensors that share a key across ranks (it assumes they are replicas). TP
shards are plain local tensors with the same FQN on every TP rank, so they are wrapped
(`dtensor_shards`) as DTensors that say where each shard sits in the full tensor:
  TP only       DTensor over the tp mesh, Shard(tp_shard_dim)
  TP + FSDP2    FSDP's dp-sharded DTensor re-described over a (tp, dp) mesh:
                [Shard(tp_shard_dim), Shard(0)] - tp splits first, dp splits each TP shard.
  replicated KV (tp > num_kv_heads) over a (kv_shard, kv_replica) view of the tp ranks:
                [Shard(0), Replicate()], so each KV head is stored once.
Every TP-sharded tensor is thus stored as the full, unsharded tensor: a checkpoint loads into a
single-process model too (DCP reshards on load), e.g. for HF export or eval.
ZeRO-1's optimizer state lives only on its owning dp rank, under a per-rank key.

Where each piece sits comes from the run's `ShardMap` (declared once by the plans).
`sharded_state` builds the dict to pass to `dcp.save`/`dcp.load`; after `dcp.load`,
`load_sharded_state` puts the values back into the model and optimizer. `load_model` reads only
the model's pieces this rank holds (`train.init_from` a native checkpoint, under any layout).
The DeepSpeed engine reads and writes the same keys through `deepspeed_checkpoint`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.tensor import DTensor, Shard

from megaqwen.parallel.dtensor_shards import DTensorWrapper, contiguous_stride, param_tags
from megaqwen.parallel.shards import ShardMap

ZERO1_KEY = "optim_zero1"
LEGACY_DEEPSPEED_TAG = "deepspeed"  # DeepSpeed's own format, as the DeepSpeed engine wrote it before


def _is_zero1(optimizer) -> bool:
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from megaqwen.parallel.data_parallel import ExpertZero1  # ZeRO-1 with experts over their edp group

    return isinstance(optimizer, ZeroRedundancyOptimizer | ExpertZero1)


# Optimizer state flattened per parameter ("state.<fqn>.exp_avg", "param_groups.<fqn>.lr"): keys are
# then unique per parameter, so ranks holding different parameters (pipeline stages) never collide on
# the nested form's "param_groups.0.*", which DCP would de-duplicate as if every rank had the same.
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


def _state_fqn(key: str) -> str | None:
    """The parameter FQN of a flattened optimizer-state key "state.<fqn>.<name>"."""
    if not key.startswith("state."):
        return None
    return key[len("state."):].rsplit(".", 1)[0]


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                  shards: ShardMap | None) -> dict[str, Any]:
    """{"model": ..., "optim": ...} ready for dcp.save / dcp.load (values share memory with the model)."""
    zero1 = optimizer is not None and _is_zero1(optimizer)
    opts = [] if optimizer is None or zero1 else optimizer
    model_sd, optim_sd = get_state_dict(model, opts, options=_OPTIONS)
    tags = param_tags(shards)
    if tags:
        wrap = DTensorWrapper(shards.mesh)
        for fqn, (dim, reps) in tags.items():
            if fqn in model_sd:
                model_sd[fqn] = wrap(model_sd[fqn], dim, reps)
        for key, v in optim_sd.items():
            fqn = _state_fqn(key)
            if fqn in tags and isinstance(v, torch.Tensor) and v.dim() > 0:
                optim_sd[key] = wrap(v, *tags[fqn])
    state: dict[str, Any] = {"model": model_sd}
    if zero1:
        from torch.distributed.checkpoint.state_dict import _init_optim_state

        _init_optim_state(optimizer.optim)  # DCP loads in place: the local state must exist
        state[ZERO1_KEY] = {f"rank{dist.get_rank()}": optimizer.optim.state_dict()}
    elif optimizer is not None:
        state["optim"] = optim_sd
    return state


def load_sharded_state(state: dict[str, Any], model: nn.Module,
                       optimizer: torch.optim.Optimizer | None, shards: ShardMap | None) -> None:
    """After `dcp.load(state, ...)`: copy the loaded values into model and optimizer."""
    tags = param_tags(shards)
    mesh = shards.mesh if shards is not None else None

    def back(fqn: str, v: Any) -> Any:
        if fqn not in tags or not isinstance(v, DTensor):
            return v
        local = v.to_local()
        if "dp" in (v.device_mesh.mesh_dim_names or ()):  # TP + FSDP: FSDP's dp DTensor of the TP shard
            dim, reps = tags[fqn]
            shape = list(v.shape)
            shape[dim] //= mesh.dims.tp // reps
            return DTensor.from_local(local, mesh.dp_mesh, [Shard(0)], run_check=False,
                                      shape=torch.Size(shape), stride=contiguous_stride(shape))
        return local

    model_sd = {k: back(k, v) for k, v in state["model"].items()}
    if optimizer is not None and _is_zero1(optimizer):
        set_state_dict(model, [], model_state_dict=model_sd, optim_state_dict={}, options=_OPTIONS)
        optimizer.optim.load_state_dict(state[ZERO1_KEY][f"rank{dist.get_rank()}"])
        return
    if optimizer is None:
        set_state_dict(model, [], model_state_dict=model_sd, optim_state_dict={}, options=_OPTIONS)
        return
    optim_sd = {k: back(_state_fqn(k) or "", v) for k, v in state["optim"].items()}
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=_OPTIONS)


def _is_deepspeed(model: nn.Module) -> bool:
    return type(model).__name__ == "DeepSpeedEngine"


def save_state(model: nn.Module, optimizer: torch.optim.Optimizer | None,
               shards: ShardMap | None) -> dict[str, Any]:
    """Collective: the dict `save` writes (also for `dcp.async_save`). The native engine's shares
    memory with the model; a DeepSpeed engine's is a fresh full TP-local fp32 copy of its ZeRO
    partitions (`deepspeed_checkpoint`), under the same keys."""
    if _is_deepspeed(model):
        from megaqwen.parallel.deepspeed_checkpoint import deepspeed_state

        return deepspeed_state(model, shards, with_optim=optimizer is not None)
    return sharded_state(model, optimizer, shards)


def save(path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None,
         shards: ShardMap | None) -> None:
    """Collective: write this layout's model/optimizer state into folder `path` as DCP; a DeepSpeed
    engine writes the same keys, so either engine resumes it."""
    import torch.distributed.checkpoint as dcp

    dcp.save(save_state(model, optimizer, shards), checkpoint_id=path)


def load(path: str, model: nn.Module, optimizer: torch.optim.Optimizer | None,
         shards: ShardMap | None) -> None:
    """Collective: load what `save` wrote, by either engine under any layout, in place. A DeepSpeed
    engine also reads DeepSpeed's own format (a `deepspeed/` tag folder, written before the engines
    shared DCP) when its layout is unchanged."""
    import torch.distributed.checkpoint as dcp

    if _is_deepspeed(model):
        from megaqwen.parallel.deepspeed_checkpoint import load_deepspeed

        if os.path.isdir(os.path.join(path, LEGACY_DEEPSPEED_TAG)):
            load_legacy_deepspeed(path, model, optimizer is not None)
        else:
            load_deepspeed(path, model, shards, with_optim=optimizer is not None)
        return
    state = sharded_state(model, optimizer, shards)
    dcp.load(state, checkpoint_id=path)
    load_sharded_state(state, model, optimizer, shards)


def load_legacy_deepspeed(path: str, engine, with_optim: bool) -> None:
    """DeepSpeed's own format (the `deepspeed/` tag folder) into a DeepSpeed engine of the layout that
    wrote it (the converter `megaqwen-convert from-deepspeed` and a legacy resume)."""
    loaded, _ = engine.load_checkpoint(path, tag=LEGACY_DEEPSPEED_TAG, load_optimizer_states=with_optim)
    if loaded is None:
        raise FileNotFoundError(f"{path}: DeepSpeed could not read its checkpoint "
                                f"(tag {LEGACY_DEEPSPEED_TAG!r}) under this layout")


def load_model(path: str, model: nn.Module, shards: ShardMap | None) -> None:
    """Collective: only the model's weights from a checkpoint saved by either engine under any
    layout; each rank reads just the pieces it holds (DCP reshards on load)."""
    import torch.distributed.checkpoint as dcp

    if _is_deepspeed(model):
        from megaqwen.parallel.deepspeed_checkpoint import load_deepspeed

        load_deepspeed(path, model, shards, with_optim=False)
        return
    state = sharded_state(model, None, shards)
    dcp.load(state, checkpoint_id=path)
    load_sharded_state(state, model, None, shards)
