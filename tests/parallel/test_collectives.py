"""Each paired collective does what its name says, forward and backward (2 gloo ranks, odd shapes)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from parallel_harness import spawn

from megaqwen.parallel import collectives as C

pytestmark = pytest.mark.distributed
B, T, H = 3, 4, 7  # T is split over 2 ranks


def per_rank(r: int, seed: int, shape) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed + 100 * r), dtype=torch.float64)


def collectives_worker(rank: int, world: int) -> dict:
    g = dist.group.WORLD
    half = slice(rank * T // 2, (rank + 1) * T // 2)
    cases = {
        # name: (fn, input shape, upstream grad shape, expected out, expected grad) given all ranks' x, dy
        "copy_to_tp": (C.copy_to_tp, (B, T, H), (B, T, H),
                       lambda xs, r: xs[r], lambda gs, r: sum(gs)),
        "reduce_from_tp": (C.reduce_from_tp, (B, T, H), (B, T, H),
                           lambda xs, r: sum(xs), lambda gs, r: gs[r]),
        "gather_from_sp": (C.gather_from_sp, (B, T // 2, H), (B, T, H),
                           lambda xs, r: torch.cat(xs, 1), lambda gs, r: sum(gs)[:, half]),
        "reduce_scatter_to_sp": (C.reduce_scatter_to_sp, (B, T, H), (B, T // 2, H),
                                 lambda xs, r: sum(xs)[:, half], lambda gs, r: torch.cat(gs, 1)),
        "gather_from_sp_split_grad": (C.gather_from_sp_split_grad, (B, T // 2, H), (B, T, H),
                                      lambda xs, r: torch.cat(xs, 1), lambda gs, r: gs[r][:, half]),
        "split_to_sp": (C.split_to_sp, (B, T, H), (B, T // 2, H),
                        lambda xs, r: xs[r][:, half], lambda gs, r: torch.cat(gs, 1)),
    }
    errors = {}
    for i, (name, (fn, xshape, gshape, want_y, want_dx)) in enumerate(cases.items()):
        xs = [per_rank(r, 2 * i, xshape) for r in range(world)]
        gs = [per_rank(r, 2 * i + 1, gshape) for r in range(world)]
        x = xs[rank].clone().requires_grad_()
        y = fn(x, g)
        y.backward(gs[rank])
        errors[name] = max((y - want_y(xs, rank)).abs().max().item(),
                           (x.grad - want_dx(gs, rank)).abs().max().item())
    t = torch.tensor([max(errors.values())], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # rank 1's answers count too
    return {"errors": errors, "max_any_rank": t.item()}


def test_paired_collectives_forward_and_backward():
    out = spawn(collectives_worker, 2)
    assert out["max_any_rank"] < 1e-12, out["errors"]
