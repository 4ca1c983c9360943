"""SwiGLU activation: silu(gate) * up, optionally reading a fused gate/up projection output.

Shapes: gate, up (..., I) flattened to (M, I); the fused form takes gate_up (..., 2I) whose first
I columns are the gate and last I the up projection (a [gate; up] weight concatenated on dim 0).

- `swiglu_ref`: plain PyTorch (what Hugging Face's Qwen2MLP computes).
- `swiglu_triton` / `swiglu_fused_triton`: elementwise kernels in fp32 registers; backward
  recomputes silu from the saved inputs instead of saving the (M, I) output, the same activation
  memory as the unfused pair of tensors. Both forms share one kernel: the fused one is just the
  separate one with a row stride of 2I and the up pointer offset by I.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megaqwen.kernels._triton import next_pow2, tl, triton_kernel


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def swiglu_fused_ref(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return swiglu_ref(gate, up)


@triton_kernel
def _swiglu_fwd_kernel(G, U, Y, in_stride, out_stride, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # (M, I) may hold more than 2^31 elements
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * in_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * in_stride + cols, mask=mask, other=0.0).to(tl.float32)
    y = g * tl.sigmoid(g) * u
    tl.store(Y + row * out_stride + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton_kernel
def _swiglu_bwd_kernel(DY, G, U, DG, DU, in_stride, out_stride, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # (M, I) may hold more than 2^31 elements
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dy = tl.load(DY + row * out_stride + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * in_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * in_stride + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    # d silu / dg = sig * (1 + g * (1 - sig))
    dg = dy * u * sig * (1.0 + g * (1.0 - sig))
    du = dy * silu
    tl.store(DG + row * in_stride + cols, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * in_stride + cols, du.to(DU.dtype.element_ty), mask=mask)


def _grid(m: int, n_cols: int) -> tuple[tuple[int, int], int]:
    """One program per (row, 1024-column block): the launch grid and the block width."""
    block = min(1024, next_pow2(n_cols))
    return (m, -(-n_cols // block)), block


def _launch_fwd(g2: torch.Tensor, u2: torch.Tensor, n_cols: int) -> torch.Tensor:
    """g2/u2 are (M, I) views sharing a row stride (I, or 2I for the fused input)."""
    m = g2.shape[0]
    y = torch.empty(m, n_cols, dtype=g2.dtype, device=g2.device)
    grid, block = _grid(m, n_cols)
    _swiglu_fwd_kernel[grid](g2, u2, y, g2.stride(0), n_cols, n_cols, BLOCK=block)
    return y


def _launch_bwd(dy2, g2, u2, dg2, du2, n_cols):
    grid, block = _grid(g2.shape[0], n_cols)
    _swiglu_bwd_kernel[grid](dy2, g2, u2, dg2, du2, g2.stride(0), n_cols, n_cols, BLOCK=block)


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        if gate.shape != up.shape or gate.dtype != up.dtype:
            raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up "
                             f"{tuple(up.shape)} {up.dtype} must match")
        n = gate.shape[-1]
        g2, u2 = gate.reshape(-1, n).contiguous(), up.reshape(-1, n).contiguous()
        ctx.save_for_backward(g2, u2)
        return _launch_fwd(g2, u2, n).view(gate.shape)

    @staticmethod
    def backward(ctx, dy):
        g2, u2 = ctx.saved_tensors
        n = g2.shape[-1]
        dg, du = torch.empty_like(g2), torch.empty_like(u2)
        _launch_bwd(dy.reshape(-1, n).contiguous(), g2, u2, dg, du, n)
        return dg.view(dy.shape), du.view(dy.shape)


class _SwiGLUFusedFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up):
        if gate_up.shape[-1] % 2:
            raise ValueError(f"swiglu_fused: last dim {gate_up.shape[-1]} must be even (gate | up)")
        n = gate_up.shape[-1] // 2
        gu2 = gate_up.reshape(-1, 2 * n).contiguous()  # (M, 2I)
        ctx.save_for_backward(gu2)
        y = _launch_fwd(gu2[:, :n], gu2[:, n:], n)
        return y.view(*gate_up.shape[:-1], n)

    @staticmethod
    def backward(ctx, dy):
        (gu2,) = ctx.saved_tensors
        n = gu2.shape[-1] // 2
        dgu = torch.empty_like(gu2)
        _launch_bwd(dy.reshape(-1, n).contiguous(), gu2[:, :n], gu2[:, n:], dgu[:, :n], dgu[:, n:], n)
        return dgu.view(*dy.shape[:-1], 2 * n)


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return _SwiGLUFn.apply(gate, up)


def swiglu_fused_triton(gate_up: torch.Tensor) -> torch.Tensor:
    return _SwiGLUFusedFn.apply(gate_up)
