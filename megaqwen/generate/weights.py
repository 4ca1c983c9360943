"""The trainer's weights as full, HF-named tensors, for engines that hold their own copy (vllm, hf).

Each parameter of this rank's model is made whole: FSDP2's DTensors through `full_tensor()`, a
tensor-parallel piece recorded in the run's `ShardMap` by an all-gather over the tp group (every
rank's piece put back at its own offset, so replicated KV heads land where they belong), and named
by the spec's HF adapter (`hf_key`). Collective: every rank of the tp (and FSDP) group calls it.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from megaqwen.generate.native import unwrap
from megaqwen.parallel.shards import ShardMap


def _gather_tp(local: torch.Tensor, dim: int, start: int, full_shape: tuple[int, ...],
               group: dist.ProcessGroup) -> torch.Tensor:
    n = dist.get_world_size(group)
    pieces = [torch.empty_like(local) for _ in range(n)]
    dist.all_gather(pieces, local.contiguous(), group=group)
    starts = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(n)]
    dist.all_gather(starts, torch.tensor([start], device=local.device), group=group)
    full = local.new_empty(full_shape)
    for piece, s in zip(pieces, starts):
        full.narrow(dim, int(s), piece.shape[dim]).copy_(piece)
    return full


def full_hf_weights(model: nn.Module, shards: ShardMap | None = None,
                    tp_group: dist.ProcessGroup | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) per parameter of `model` (the trainer's, possibly wrapped / sharded).
    `shards`: the run's ShardMap (tp pieces); `tp_group`: defaults to `shards.mesh.tp_group`.
    A tied LM head is not emitted (HF loaders tie it from the embedding)."""
    from megaqwen.models.spec import get_spec

    inner = unwrap(model)
    adapter = get_spec(inner.cfg).hf
    if tp_group is None and shards is not None and shards.mesh is not None and shards.tp > 1:
        tp_group = shards.mesh.tp_group
    with torch.no_grad():
        for fqn, p in inner.named_parameters():
            t = p.full_tensor() if isinstance(p, DTensor) else p.detach()
            shard = shards.get(fqn) if shards is not None else None
            if shard is not None and tuple(t.shape) != shard.full_shape:
                if tp_group is None:
                    raise ValueError(f"{fqn} is a tensor-parallel piece {tuple(t.shape)} of "
                                     f"{shard.full_shape}: pass the tp group")
                t = _gather_tp(t, shard.dim, shard.start, shard.full_shape, tp_group)
            elif shards is None and fqn.endswith("weight") and _looks_sharded(inner, fqn, t):
                raise ValueError(f"{fqn} has shape {tuple(t.shape)}, not the config's: a tensor-"
                                 "parallel model needs its ShardMap (shards=) to gather full weights")
            yield adapter.hf_key(fqn), t


def _looks_sharded(model: nn.Module, fqn: str, t: torch.Tensor) -> bool:
    cfg = model.cfg
    return fqn.endswith("embed_tokens.weight") and t.shape[0] != cfg.vocab_size
