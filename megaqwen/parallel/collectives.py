"""Paired collectives for tensor and sequence parallelism, as autograd functions over plain tensors.

Each name says what happens forward / backward (Megatron's "mappings"):

  copy_to_tp              identity    / all-reduce       replicated input -> column-parallel matmul
  reduce_from_tp          all-reduce  / identity         row-parallel partial sums -> replicated
  gather_from_sp          all-gather  / reduce-scatter   sequence shards -> full sequence for a TP region
  reduce_scatter_to_sp    reduce-scatter / all-gather    row-parallel partial sums -> sequence shards
  gather_from_sp_split_grad  all-gather / keep own slice  sequence shards -> consumer that already
                                                          all-reduces its input grad (vocab-parallel CE)
  split_to_sp             keep own slice / all-gather    replicated -> sequence shards

All take the process group explicitly; a group of size 1 makes each an identity.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _all_gather(x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    """Concatenate every rank's `x` along `dim` (rank order)."""
    n = dist.get_world_size(group)
    x0 = x.movedim(dim, 0).contiguous()
    out = x0.new_empty((n * x0.shape[0], *x0.shape[1:]))
    _all_gather_single(out, x0, group=group)
    return out.movedim(0, dim).contiguous()


def _reduce_scatter(x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    """Sum over ranks, keep this rank's slice of `dim`."""
    n = dist.get_world_size(group)
    if x.shape[dim] % n:
        raise ValueError(f"reduce-scatter: size {x.shape[dim]} of dim {dim} is not divisible by {n} ranks")
    x0 = x.movedim(dim, 0).contiguous()
    out = x0.new_empty((x0.shape[0] // n, *x0.shape[1:]))
    _reduce_scatter_single(out, x0, group=group)
    return out.movedim(0, dim).contiguous()


def _split(x: torch.Tensor, group: dist.ProcessGroup, dim: int) -> torch.Tensor:
    n, r = dist.get_world_size(group), dist.get_rank(group)
    if x.shape[dim] % n:
        raise ValueError(f"split: size {x.shape[dim]} of dim {dim} is not divisible by {n} ranks")
    return x.chunk(n, dim=dim)[r].contiguous()


def _all_reduce(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    x = x.contiguous()
    dist.all_reduce(x, group=group)
    return x


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad.clone(), ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x.clone(), group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _paired(name: str, forward, backward) -> type[torch.autograd.Function]:
    """Autograd function of (x, group, dim): `forward(x, group, dim)`, then `backward` on the grad."""

    def fwd(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return forward(x, group, dim)

    def bwd(ctx, grad):
        return backward(grad, ctx.group, ctx.dim), None, None

    methods = {"forward": staticmethod(fwd), "backward": staticmethod(bwd)}
    return type(name, (torch.autograd.Function,), methods)


_GatherFromSP = _paired("_GatherFromSP", _all_gather, _reduce_scatter)
_ReduceScatterToSP = _paired("_ReduceScatterToSP", _reduce_scatter, _all_gather)
_GatherFromSPSplitGrad = _paired("_GatherFromSPSplitGrad", _all_gather, _split)
_SplitToSP = _paired("_SplitToSP", _split, _all_gather)


def _trivial(group: dist.ProcessGroup | None) -> bool:
    return group is None or dist.get_world_size(group) == 1


def copy_to_tp(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """Identity forward, all-reduce backward."""
    return x if _trivial(group) else _CopyToTP.apply(x, group)


def reduce_from_tp(x: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """All-reduce (sum) forward, identity backward."""
    return x if _trivial(group) else _ReduceFromTP.apply(x, group)


def gather_from_sp(x: torch.Tensor, group: dist.ProcessGroup | None, dim: int = 1) -> torch.Tensor:
    """All-gather along `dim` forward, reduce-scatter backward."""
    return x if _trivial(group) else _GatherFromSP.apply(x, group, dim)


def reduce_scatter_to_sp(x: torch.Tensor, group: dist.ProcessGroup | None, dim: int = 1) -> torch.Tensor:
    """Reduce-scatter along `dim` forward, all-gather backward."""
    return x if _trivial(group) else _ReduceScatterToSP.apply(x, group, dim)


def gather_from_sp_split_grad(x: torch.Tensor, group: dist.ProcessGroup | None, dim: int = 1) -> torch.Tensor:
    """All-gather along `dim` forward; backward keeps this rank's slice of an already-summed grad."""
    return x if _trivial(group) else _GatherFromSPSplitGrad.apply(x, group, dim)


def split_to_sp(x: torch.Tensor, group: dist.ProcessGroup | None, dim: int = 1) -> torch.Tensor:
    """Keep this rank's slice of `dim` forward, all-gather backward."""
    return x if _trivial(group) else _SplitToSP.apply(x, group, dim)
