"""Grouped expert computation: SwiGLU MLPs of several experts over their blocks of tokens.

Legend: A token->expert assignments sorted by expert (expert-major), H hidden, I expert
intermediate, E experts here. `counts` (E,) says how many consecutive rows of x_AH go to each
expert; the expert weights are in nn.Linear layout: gate/up (I, H), down (H, I).

  expert_mlp_ref        per-row loop: the definition (tests only)
  expert_mlp_loop       one GEMM chain per expert on its block (any device, any dtype)
  expert_mlp_bmm        blocks padded to the longest one, one batched matmul per projection
  expert_mlp_grouped    `torch._grouped_mm` over the stacked weights: one kernel per projection
                        (CUDA, sm90+ bf16 is its fast path; it also runs on CPU in fp32)
Every path calls every expert, also on zero rows, so each expert weight gets a gradient (zeros
when it saw no token): DDP then needs no find_unused_parameters and a replica never misses one.
The weights may come as a list of (I, H) tensors or already stacked (E, I, H). `stack_experts`
stacks a block's per-expert Parameters once: it moves their storage into one (E, I, H) tensor
they are views of (names, optimizer, checkpoints see the same Parameters), and `stacked_weights`
hands that tensor to the grouped / bmm paths with no copy per call, the grads coming back to each
expert's Parameter as views of one (E, I, H) grad. Before, every call copied E*3*H*I elements
forward and split the grads back (1.5 GB per call per layer for Qwen2-57B's 64 experts in bf16).

Permutation (`permute`): the A = N*K assignments sorted by expert with one stable argsort, the
per-expert counts with one bincount, the capacity cut with one comparison against each row's
rank inside its expert's block; no Python loop over experts (`permute_loop` is that loop, the
reference the tests compare with). `combine` is its inverse: weighted outputs summed per token.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

BACKENDS = ("auto", "loop", "bmm", "grouped_mm")

Weights = Sequence[torch.Tensor] | torch.Tensor
"""Per-expert (I, H) / (H, I) tensors, or one stacked (E, I, H) / (E, H, I) tensor."""


def _stack(w: Weights) -> torch.Tensor:
    return w if isinstance(w, torch.Tensor) else torch.stack(list(w))


def expert_flops(rows: int, h: int, i: int) -> int:
    """Forward FLOPs of `rows` rows through one SwiGLU expert of width i: three GEMMs of 2*rows*h*i
    (the elementwise SwiGLU is not counted; backward is twice this)."""
    return 6 * rows * h * i


def _swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


def expert_mlp_ref(x_AH: torch.Tensor, counts: Sequence[int], gate: Weights, up: Weights,
                   down: Weights) -> torch.Tensor:
    """Row by row: down_e(silu(gate_e x) * up_e x) for the expert e each row belongs to."""
    expert_of_row = [e for e, c in enumerate(counts) for _ in range(int(c))]
    rows = [down[e] @ _swiglu(gate[e] @ x, up[e] @ x) for x, e in zip(x_AH, expert_of_row)]
    return torch.stack(rows) if rows else x_AH.new_zeros(0, x_AH.shape[1])


def expert_mlp_loop(x_AH: torch.Tensor, counts: Sequence[int], gate: Weights, up: Weights,
                    down: Weights, swiglu: Callable = _swiglu) -> torch.Tensor:
    outs = [swiglu(x @ g.t(), x @ u.t()) @ d.t()
            for x, g, u, d in zip(x_AH.split(list(counts)), gate, up, down)]
    return torch.cat(outs)


def expert_mlp_bmm(x_AH: torch.Tensor, counts: Sequence[int], gate: Weights, up: Weights,
                   down: Weights, swiglu: Callable = _swiglu) -> torch.Tensor:
    """Pad each block to the longest (M rows): (E, M, H) @ (E, H, I) batched; padding rows are
    zeros and are dropped again, so they add nothing to the weight grads."""
    counts = [int(c) for c in counts]
    e, m, h = len(counts), max(counts, default=0), x_AH.shape[1]
    expert = torch.repeat_interleave(torch.arange(e, device=x_AH.device),
                                     torch.tensor(counts, device=x_AH.device))
    starts = torch.tensor([0, *counts[:-1]], device=x_AH.device).cumsum(0)
    slot = expert * m + torch.arange(x_AH.shape[0], device=x_AH.device) - starts[expert]  # (A,)
    x_EMH = x_AH.new_zeros(e * m, h).index_copy(0, slot, x_AH).view(e, m, h)
    g, u, d = _stack(gate), _stack(up), _stack(down)
    a_EMI = swiglu(torch.bmm(x_EMH, g.transpose(1, 2)), torch.bmm(x_EMH, u.transpose(1, 2)))
    y_EMH = torch.bmm(a_EMI, d.transpose(1, 2))
    return y_EMH.reshape(e * m, h).index_select(0, slot)


def expert_mlp_grouped(x_AH: torch.Tensor, counts: Sequence[int] | torch.Tensor, gate: Weights,
                       up: Weights, down: Weights, swiglu: Callable = _swiglu) -> torch.Tensor:
    """torch._grouped_mm: x (A, H) @ w (E, H, I) with `offs` = cumulative block ends (int32). Under
    autocast (which has no rule for it) inputs and weights are cast to the autocast dtype, as a
    Linear would be."""
    dt = compute_dtype(x_AH)
    c = torch.as_tensor(counts, device=x_AH.device)
    offs = c.cumsum(0).to(torch.int32)
    x_AH = x_AH.to(dt)
    g = _stack(gate).to(dt).transpose(1, 2)  # (E, H, I)
    u = _stack(up).to(dt).transpose(1, 2)
    d = _stack(down).to(dt).transpose(1, 2)  # (E, I, H)
    a_AI = swiglu(torch._grouped_mm(x_AH, g, offs=offs), torch._grouped_mm(x_AH, u, offs=offs))
    return torch._grouped_mm(a_AI, d, offs=offs)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on `x` run in: autocast's when it is on for x's device, else x's."""
    kind = x.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype


IMPLS = {"loop": expert_mlp_loop, "bmm": expert_mlp_bmm, "grouped_mm": expert_mlp_grouped}


def grouped_mm_unavailable_reason(x: torch.Tensor, h: int, i: int) -> str | None:
    """Why torch._grouped_mm cannot take this input (None: it can), in its compute dtype."""
    dt = compute_dtype(x)
    if not hasattr(torch, "_grouped_mm"):
        return f"torch {torch.__version__} has no torch._grouped_mm"
    if x.is_cuda:
        if dt != torch.bfloat16:
            return f"on CUDA torch._grouped_mm takes bf16 (autocast or bf16 weights), got {dt}"
        if torch.cuda.get_device_capability(x.device) < (9, 0):
            return "bf16 grouped GEMM needs compute capability >= 9.0"
    elif dt != torch.float32:
        return f"on CPU torch._grouped_mm is used in fp32 only, got {dt}"
    size = torch.empty((), dtype=dt).element_size()
    if (h * size) % 16 or (i * size) % 16:
        return f"row strides must be multiples of 16 bytes (hidden {h}, intermediate {i}, {dt})"
    return None


def pick_backend(backend: str, x: torch.Tensor, h: int, i: int) -> str:
    """`auto`: grouped_mm on CUDA when it can run, else the loop (on CPU the loop is as fast:
    benchmarks/bench_moe.py). An explicit grouped_mm that cannot run raises ValueError."""
    if backend not in BACKENDS:
        raise ValueError(f"expert backend {backend!r}; choose from {BACKENDS}")
    if backend == "auto":
        return "grouped_mm" if x.is_cuda and grouped_mm_unavailable_reason(x, h, i) is None else "loop"
    if backend == "grouped_mm":
        why = grouped_mm_unavailable_reason(x, h, i)
        if why is not None:
            raise ValueError(f"expert backend grouped_mm: {why}; use loop or bmm")
    return backend


def expert_mlp(x_AH: torch.Tensor, counts: Sequence[int], gate: Weights, up: Weights, down: Weights,
               swiglu: Callable = _swiglu, backend: str = "auto") -> torch.Tensor:
    """(A, H) rows grouped by expert -> (A, H) outputs of each row's expert."""
    name = pick_backend(backend, x_AH, x_AH.shape[1], gate[0].shape[0])
    return IMPLS[name](x_AH, counts, gate, up, down, swiglu)


# ---- weights stacked once -------------------------------------------------------------------------

def is_stacked(weights: Sequence[torch.Tensor], stacked: torch.Tensor | None) -> bool:
    """Whether every weights[e] is still the e-th slice of `stacked` (not after `.to()`, `to_empty`,
    a load with assign=True, or a wrapper that replaced the Parameters' data)."""
    if stacked is None or stacked.shape[0] != len(weights):
        return False
    step = stacked[0].numel() * stacked.element_size()
    base = stacked.data_ptr()
    return all(type(w) is torch.nn.Parameter or type(w) is torch.Tensor for w in weights) and all(
        w.dtype == stacked.dtype and w.device == stacked.device and w.shape == stacked.shape[1:]
        and w.is_contiguous() and w.data_ptr() == base + e * step for e, w in enumerate(weights))


@torch.no_grad()
def stack_experts(weights: Sequence[torch.Tensor], stacked: torch.Tensor | None = None) -> torch.Tensor:
    """`stacked` when the weights are still its slices, else a new (E, ...) tensor holding their
    values, and each weight's `.data` re-pointed at its slice (one copy, then none per call)."""
    if is_stacked(weights, stacked):
        return stacked
    stacked = torch.stack([w.detach() for w in weights])
    for w, s in zip(weights, stacked.unbind(0)):
        w.data = s
    return stacked


class _StackedWeights(torch.autograd.Function):
    """Forward: the stacked storage itself (the weights are its slices: no copy). Backward: one
    (E, ...) grad, handed to each expert's weight as its slice."""

    @staticmethod
    def forward(ctx, stacked, *weights):
        return stacked.view_as(stacked)

    @staticmethod
    def backward(ctx, grad):
        return (None, *grad.unbind(0))


def stacked_weights(weights: Sequence[torch.Tensor], stacked: torch.Tensor) -> torch.Tensor:
    """(E, ...) tensor for the grouped / bmm paths, autograd-linked to the per-expert weights, with
    no copy; `stacked` must come from `stack_experts(weights, ...)`."""
    if not torch.is_grad_enabled() or not any(w.requires_grad for w in weights):
        return stacked
    return _StackedWeights.apply(stacked, *weights)


# ---- permutation ----------------------------------------------------------------------------------

class Permutation(NamedTuple):
    """Where the A = N*K assignments go: expert-major order (kept rows only), per-expert counts."""

    order_A: torch.Tensor
    """int64 (A_kept,): flat assignment index n*K + k, grouped by expert, tokens in order within."""
    counts_E: torch.Tensor
    """int64 (E,): kept rows per expert (consecutive blocks of order_A)."""
    load_E: torch.Tensor
    """int64 (E,): assignments per expert before the capacity cut."""
    dropped: torch.Tensor
    """int64 scalar: assignments beyond capacity (0 when dropless)."""


def capacity(capacity_factor: float, tokens: int, top_k: int, experts: int) -> int | None:
    """Rows one expert takes per forward: ceil(factor * N*K / E); None (dropless) when factor <= 0."""
    return math.ceil(capacity_factor * tokens * top_k / experts) if capacity_factor > 0 else None


def permute(idx_NK: torch.Tensor, experts: int, cap: int | None = None) -> Permutation:
    """Sort the assignments by expert (stable: tokens in order inside each expert's block) and drop
    those past `cap` rows per expert (the later tokens), with no loop over experts."""
    flat = idx_NK.reshape(-1)  # (A,)
    order = torch.argsort(flat, stable=True)
    load = torch.bincount(flat, minlength=experts)
    if cap is None:
        return Permutation(order, load, load, load.new_zeros(()))
    start = load.cumsum(0) - load  # first sorted row of each expert
    keep = torch.arange(order.numel(), device=flat.device) - start[flat[order]] < cap
    return Permutation(order[keep], load.clamp(max=cap), load, (~keep).sum())


def permute_loop(idx_NK: torch.Tensor, experts: int, cap: int | None = None) -> Permutation:
    """`permute` as a Python loop over experts: the reference (tests only)."""
    flat = idx_NK.reshape(-1)
    rows = [torch.nonzero(flat == e).reshape(-1) for e in range(experts)]
    load = torch.tensor([len(r) for r in rows], dtype=torch.int64)
    kept = [r[:cap] if cap is not None else r for r in rows]
    counts = torch.tensor([len(r) for r in kept], dtype=torch.int64)
    order = torch.cat(kept) if kept else flat.new_zeros(0)
    return Permutation(order, counts, load, (load - counts).sum())


def combine(y_AH: torch.Tensor, w_NK: torch.Tensor, order_A: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of the permutation: out[n] = sum_k w[n, k] * y[row of (n, k)] (dropped rows add 0)."""
    k = w_NK.shape[1]
    y_AH = y_AH * w_NK.reshape(-1)[order_A, None]
    return y_AH.new_zeros(n, y_AH.shape[1]).index_add_(0, order_A // k, y_AH)
