"""One helper for the expert-MLP kernel tests (tests/model/test_moe_kernels.py,
tests/kernels/test_moe_dispatch.py): a path's output and every gradient, for comparing paths."""

import torch


def outputs_and_grads(fn, x, counts, ws, args=None) -> list[torch.Tensor]:
    """fn(x, counts, *args) (args default: the per-expert weight lists `ws`) backpropagated with a
    fixed upstream gradient: [output, dx, then d of every expert weight of `ws` (zeros where the
    expert got no rows)]; the gradients are cleared afterwards, so the next path starts clean."""
    y = fn(x, counts, *(ws if args is None else args))
    y.backward(torch.linspace(-1, 1, y.numel()).view_as(y))
    out = [y.detach(), x.grad.clone()] + [torch.zeros_like(w) if w.grad is None else w.grad.clone()
                                           for group in ws for w in group]
    x.grad = None
    for group in ws:
        for w in group:
            w.grad = None
    return out
