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
The stacked paths copy the weights into (E, I, H) each call (E*3*H*I elements; the grads flow
back through the copy), which a token-heavy step amortises; the loop path copies nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

BACKENDS = ("auto", "loop", "bmm", "grouped_mm")

Weights = Sequence[torch.Tensor]


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
    g, u, d = torch.stack(list(gate)), torch.stack(list(up)), torch.stack(list(down))
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
    g = torch.stack(list(gate)).to(dt).transpose(1, 2)  # (E, H, I)
    u = torch.stack(list(up)).to(dt).transpose(1, 2)
    d = torch.stack(list(down)).to(dt).transpose(1, 2)  # (E, I, H)
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
