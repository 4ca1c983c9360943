"""Grouped expert computation (kernels/moe.py) against the per-row reference: outputs and grads."""

import pytest
import torch
from expert_grads import outputs_and_grads

from megaqwen.kernels.moe import (
    expert_mlp,
    expert_mlp_bmm,
    expert_mlp_grouped,
    expert_mlp_loop,
    expert_mlp_ref,
    grouped_mm_unavailable_reason,
    pick_backend,
)

# odd counts, an empty expert in the middle and one at the end
COUNTS = [5, 0, 9, 1, 7, 0]
H, I = 12, 20  # noqa: E741


def _inputs(seed=0, h=H, i=I, counts=COUNTS):
    g = torch.Generator().manual_seed(seed)
    e = len(counts)
    x = torch.randn(sum(counts), h, generator=g, requires_grad=True)
    ws = [[(torch.randn(i, h, generator=g) * 0.3).requires_grad_() for _ in range(e)],
          [(torch.randn(i, h, generator=g) * 0.3).requires_grad_() for _ in range(e)],
          [(torch.randn(h, i, generator=g) * 0.3).requires_grad_() for _ in range(e)]]
    return x, ws


def _grads(fn, x, ws, counts=COUNTS):
    return outputs_and_grads(fn, x, counts, ws)


@pytest.mark.parametrize("fn", [expert_mlp_loop, expert_mlp_bmm, expert_mlp_grouped])
def test_grouped_paths_equal_reference(fn):
    if fn is expert_mlp_grouped and not hasattr(torch, "_grouped_mm"):
        pytest.skip("this torch has no torch._grouped_mm")
    h, i = 16, 24  # grouped_mm wants 16-byte row strides
    x, ws = _inputs(h=h, i=i)
    ref = _grads(expert_mlp_ref, x, ws)
    got = _grads(fn, x, ws)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_every_expert_gets_a_grad_even_without_rows():
    x, ws = _inputs()
    for fn in (expert_mlp_loop, expert_mlp_bmm):
        fn(x, COUNTS, *ws).sum().backward()
        assert all(w.grad is not None for ws_ in ws for w in ws_)
        assert not ws[0][1].grad.any() and not ws[2][5].grad.any()
        for ws_ in ws:
            for w in ws_:
                w.grad = None


def test_backend_choice_and_refusals():
    x = torch.randn(4, H)
    assert pick_backend("auto", x, H, I) == "loop"  # CPU: the loop (bench_moe.py)
    with pytest.raises(ValueError, match="expert backend 'fast'; choose from"):
        pick_backend("fast", x, H, I)
    assert grouped_mm_unavailable_reason(x.double(), 16, 16) is not None
    assert grouped_mm_unavailable_reason(x, 16, 16) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):  # judged in the dtype it would compute in
        assert "fp32 only, got torch.bfloat16" in grouped_mm_unavailable_reason(x, 16, 16)
    x10 = torch.randn(4, 10)  # 40-byte rows
    with pytest.raises(ValueError, match="grouped_mm: .*16 bytes"):
        expert_mlp(x10, [4], [torch.randn(I, 10)], [torch.randn(I, 10)], [torch.randn(10, I)],
                   backend="grouped_mm")
