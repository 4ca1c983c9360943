"""Global gradient norm and clipping over TP-local shards and FSDP-sharded gradients.

`torch.nn.utils.clip_grad_norm_` sees only this rank's tensors: under TP it would miss the other
shards and count replicated parameters once per rank. Here every rank sums the squares of its local
gradient pieces, each divided by how many ranks hold an identical copy of it (TP replicas, DDP
replicas, a tied embedding on the first and last pipeline stage), and one all-reduce over the whole
world (every pipeline stage included) gives the norm of the full, unsharded gradient.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

from megaqwen.parallel.shards import ShardMap

NamedParams = Iterable[tuple[str, nn.Parameter]]


def _copies(fqn: str, g: torch.Tensor, shards: ShardMap) -> int:
    """Ranks holding the same values as this rank's piece of `fqn`'s gradient."""
    d = shards.mesh.dims
    # FSDP2 gradients are already split over dp (x cp); DDP/ZeRO-1 gradients are replicated there.
    dp_copies = 1 if isinstance(g, DTensor) else d.dp * d.cp
    return shards.tp_copies(fqn) * dp_copies * shards.pp_copies(fqn)


def grad_norm(named_params: NamedParams, shards: ShardMap | None) -> torch.Tensor:
    """L2 norm of the full gradient (fp32 scalar, same on every rank). `named_params` are the plain
    model's (FQNs as in the ShardMap: unwrap DDP first)."""
    params = [(n, p) for n, p in named_params if p.grad is not None]
    if not params:
        return torch.zeros(())
    distributed = shards is not None and shards.mesh is not None
    sq = torch.zeros((), dtype=torch.float64, device=params[0][1].grad.device)
    for fqn, p in params:
        g = p.grad
        local = g.to_local() if isinstance(g, DTensor) else g
        copies = _copies(fqn, g, shards) if distributed else 1
        # fp32 norm per tensor (as torch's clip_grad_norm_), summed in fp64: a `.double()` copy of
        # each gradient would cost 2x its size in fp64 temporaries (GBs for a 150k-row embedding)
        sq += torch.linalg.vector_norm(local.detach(), dtype=torch.float32).double().square() / copies
    if distributed and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sq)
    return sq.sqrt().float()


def clip_grad_norm_(named_params: NamedParams, max_norm: float, shards: ShardMap | None) -> torch.Tensor:
    """Scale gradients in place so their global norm is at most `max_norm`; returns the norm before."""
    named_params = list(named_params)
    norm = grad_norm(named_params, shards)
    if max_norm > 0 and math.isfinite(max_norm):
        coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for _, p in named_params:
            if p.grad is not None:
                g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad  # shares storage
                g.mul_(coef.to(g.device, g.dtype))
    return norm
