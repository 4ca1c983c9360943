"""Dispatch efficiency (kernels/moe.py): weights stacked once, permutation without a loop over experts,
and the expert FLOPs a block counts; each against the plain version."""

import pytest
import torch
from expert_grads import outputs_and_grads

from megaqwen.kernels.moe import (
    combine,
    expert_flops,
    expert_mlp_bmm,
    expert_mlp_grouped,
    expert_mlp_loop,
    expert_mlp_ref,
    is_stacked,
    permute,
    permute_loop,
    stack_experts,
    stacked_weights,
)

COUNTS = [5, 0, 9, 1, 7, 0]  # odd counts, an empty expert in the middle and one at the end
H, I = 16, 24  # noqa: E741  (grouped_mm wants 16-byte row strides)


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    e = len(COUNTS)
    return [[torch.nn.Parameter(torch.randn(*shape, generator=g) * 0.3) for _ in range(e)]
            for shape in ((I, H), (I, H), (H, I))]


def _outputs_and_grads(fn, x, ws, stacked=None):
    args = None if stacked is None else [stacked_weights(w, s) for w, s in zip(ws, stacked)]
    return outputs_and_grads(fn, x, COUNTS, ws, args)


@pytest.mark.parametrize("fn", [expert_mlp_loop, expert_mlp_bmm, expert_mlp_grouped])
def test_paths_on_weights_stacked_once_equal_reference(fn):
    """Each path on the stacked-once weights: outputs, input grads and every expert's weight grad as
    the per-row reference on plain per-expert tensors; two calls, no new storage between them."""
    if fn is expert_mlp_grouped and not hasattr(torch, "_grouped_mm"):
        pytest.skip(f"torch {torch.__version__} has no torch._grouped_mm")
    x = torch.randn(sum(COUNTS), H, generator=torch.Generator().manual_seed(1), requires_grad=True)
    ws = _params()
    ref = _outputs_and_grads(expert_mlp_ref, x, ws)
    stacked = [stack_experts(w) for w in ws]
    assert all(is_stacked(w, s) for w, s in zip(ws, stacked))
    ptrs = [s.data_ptr() for s in stacked]
    for _ in range(2):
        stacked = [stack_experts(w, s) for w, s in zip(ws, stacked)]  # what a block does per call
        got = _outputs_and_grads(fn, x, ws, stacked)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert [s.data_ptr() for s in stacked] == ptrs  # stacked once: no copy per call


def test_stacked_weights_follow_updates_and_restack_after_moves():
    ws = _params()[0]
    stacked = stack_experts(ws)
    with torch.no_grad():
        ws[2].add_(1.0)  # an optimizer step on one expert's Parameter
    assert torch.equal(stacked[2], ws[2])
    ws[1].data = ws[1].data.clone()  # what .to() / to_empty / load(assign=True) do to one of them
    assert not is_stacked(ws, stacked)
    again = stack_experts(ws, stacked)
    assert again is not stacked and is_stacked(ws, again) and torch.equal(again[1], ws[1])


@pytest.mark.parametrize("cap", [None, 3, 1])
def test_permutation_equals_loop_over_experts(cap):
    """argsort/bincount permutation (with the capacity cut) = the loop over experts, and combine()
    puts each token's weighted outputs back as a per-token loop would."""
    g = torch.Generator().manual_seed(3)
    n, k, e = 23, 3, 7
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n)])  # (N, K), skewed below
    idx[:10, 0] = 2
    fast, loop = permute(idx, e, cap), permute_loop(idx, e, cap)
    for a, b in zip(fast, loop):
        assert torch.equal(a, b)
    assert int(fast.dropped) == int((fast.load_E - fast.counts_E).sum())
    assert (int(fast.dropped) > 0) == (cap is not None and cap < int(fast.load_E.max()))
    y = torch.randn(fast.order_A.numel(), 5, generator=g)
    w = torch.rand(n, k, generator=g)
    want = torch.zeros(n, 5)
    for row, a in enumerate(fast.order_A.tolist()):
        want[a // k] += w[a // k, a % k] * y[row]
    torch.testing.assert_close(combine(y, w, fast.order_A, n), want)


def test_block_counts_the_expert_flops_it_runs():
    """A sparse block's `expert_flops` after one forward: 6*H*I per assignment routed (dropless),
    whichever backend computes it, and the same outputs from the stacked-once and loop paths."""
    from megaqwen.models.config import get_config
    from megaqwen.models.spec import get_spec

    cfg = get_config("debug-moe", vocab_size=256)
    model = get_spec(cfg).build(cfg, seed=0)
    tokens = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(0))
    outs = {}
    for backend in ("loop", "bmm"):
        for b in model.moe_blocks().values():
            b.expert_backend, b.expert_flops = backend, 0
            b.reset_stats()
        outs[backend] = model(tokens, tokens).mean()
        outs[backend].backward()
        for name, b in model.moe_blocks().items():
            rows = int(b.load_E.sum())
            assert rows == 2 * 9 * cfg.num_experts_per_tok
            assert b.expert_flops == expert_flops(rows, cfg.hidden_size, cfg.moe_intermediate_size), name
    torch.testing.assert_close(outs["bmm"], outs["loop"], rtol=1e-5, atol=1e-6)
