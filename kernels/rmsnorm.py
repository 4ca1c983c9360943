"""RMSNorm: y = w * x / sqrt(mean(x^2) + eps), statistics in fp32, optional fused residual add.

Shapes: x (..., N) flattened to (M, N) rows; weight (N,); rstd (M,) fp32 saved for backward.

Implementations, all with the signature `(x, weight, eps) -> y`:
- `rms_norm_ref`: plain PyTorch, bit-compatible with Hugging Face's `Qwen2RMSNorm` (normalise in
  fp32, cast back to the input dtype, then scale by the weight). The Triton kernel rounds at the
  same place so bf16 results agree to the last bit in most elements.
- `rms_norm_triton`: one program per row forward; backward programs each own a block of rows and
  write one fp32 partial weight-gradient row, summed on the host (the layer-norm tutorial's scheme,
  without its locks, so the result is deterministic).
- `rms_norm_apex` / `rms_norm_te`: NVIDIA Apex `fused_rms_norm_affine` and Transformer Engine's
  `RMSNorm`, imported lazily (GPU-only packages).
`rms_norm_residual_*(x, residual, weight, eps) -> (y, h)` also return h = x + residual, the new
residual stream, so the add and the norm read the activations once.
"""

from __future__ import annotations

import functools

import torch

from megaqwen.kernels._triton import next_pow2, tl, triton_kernel

# ----------------------------------------------------------------------------- references


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


def rms_norm_residual_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                          eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    h = x + residual
    return rms_norm_ref(h, weight, eps), h


# ----------------------------------------------------------------------------- Triton kernels


@triton_kernel
def _rms_fwd_kernel(X, R, H, Y, W, RSTD, stride, N, eps,
                    HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # row * stride may pass 2^31 at long context
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(R + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
        h = (x + r).to(H.dtype.element_ty)  # the residual stream keeps the activation dtype
        tl.store(H + row * stride + cols, h, mask=mask)
        x = h.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / N + eps)
    tl.store(RSTD + row, rstd)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    xhat = (x * rstd).to(X.dtype.element_ty).to(tl.float32)  # round where HF rounds
    tl.store(Y + row * stride + cols, (xhat * w).to(Y.dtype.element_ty), mask=mask)


@triton_kernel
def _rms_bwd_kernel(DY, X, W, RSTD, DX, DRES, DW, stride, M, N, rows_per_prog,
                    HAS_DRES: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK,), dtype=tl.float32)
    row_start = pid * rows_per_prog
    row_end = min(row_start + rows_per_prog, M)
    for row in range(row_start, row_end):
        x = tl.load(X + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = x * rstd
        wdy = w * dy
        # d/dx of x * rstd(x): rstd * (g - xhat * mean(g * xhat)) with g = w * dy
        c = tl.sum(xhat * wdy, axis=0) / N
        dx = (wdy - xhat * c) * rstd
        if HAS_DRES:  # gradient arriving on the residual output h flows straight through
            dx += tl.load(DRES + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + row * stride + cols, dx.to(DX.dtype.element_ty), mask=mask)
        dw += dy * xhat.to(X.dtype.element_ty).to(tl.float32)
    tl.store(DW + pid * N + cols, dw, mask=mask)


def _num_bwd_programs(m: int, device: torch.device) -> int:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, min(m, 2 * sms))
    return max(1, min(m, 4))  # interpreter: few programs, each looping over rows


def _rms_fwd(x2: torch.Tensor, weight: torch.Tensor, eps: float, residual2: torch.Tensor | None):
    """x2/residual2 (M, N) contiguous -> y (M, N), h (M, N) or None, rstd (M,) fp32."""
    m, n = x2.shape
    out_dtype = torch.promote_types(x2.dtype, weight.dtype)
    y = torch.empty(m, n, dtype=out_dtype, device=x2.device)
    h = torch.empty_like(x2) if residual2 is not None else None
    rstd = torch.empty(m, dtype=torch.float32, device=x2.device)
    _rms_fwd_kernel[(m,)](x2, residual2 if h is not None else x2, h if h is not None else x2, y,
                          weight, rstd, x2.stride(0), n, eps,
                          HAS_RES=h is not None, BLOCK=next_pow2(n))
    return y, h, rstd


def _rms_bwd(dy2, x2, weight, rstd, dres2):
    m, n = x2.shape
    dx = torch.empty_like(x2)
    progs = _num_bwd_programs(m, x2.device)
    rows_per_prog = -(-m // progs)
    dw_partial = torch.empty(progs, n, dtype=torch.float32, device=x2.device)
    _rms_bwd_kernel[(progs,)](dy2, x2, weight, rstd, dx, dres2 if dres2 is not None else dy2,
                              dw_partial, x2.stride(0), m, n, rows_per_prog,
                              HAS_DRES=dres2 is not None, BLOCK=next_pow2(n))
    return dx, dw_partial.sum(0).to(weight.dtype)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]).contiguous()


class _RMSNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        x2 = _rows(x)
        y, _, rstd = _rms_fwd(x2, weight.contiguous(), eps, None)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = _rms_bwd(_rows(dy).to(x2.dtype), x2, weight.contiguous(), rstd, None)
        return dx.view(dy.shape), dw, None


class _RMSNormResidualFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, eps):
        y, h, rstd = _rms_fwd(_rows(x), weight.contiguous(), eps, _rows(residual.to(x.dtype)))
        ctx.save_for_backward(h, weight, rstd)
        ctx.res_dtype = residual.dtype
        return y.view(*x.shape[:-1], y.shape[-1]), h.view(x.shape)

    @staticmethod
    def backward(ctx, dy, dh):
        h2, weight, rstd = ctx.saved_tensors
        dres = _rows(dh).to(h2.dtype) if dh is not None else None
        dx, dw = _rms_bwd(_rows(dy).to(h2.dtype), h2, weight.contiguous(), rstd, dres)
        dx = dx.view(dy.shape)
        return dx, dx.to(ctx.res_dtype), dw, None


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _RMSNormFn.apply(x, weight, eps)


def rms_norm_residual_triton(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                             eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    return _RMSNormResidualFn.apply(x, residual, weight, eps)


# ----------------------------------------------------------------------------- vendor libraries


def rms_norm_apex(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """NVIDIA Apex's fused CUDA RMSNorm (the functional form behind `apex...FusedRMSNorm`)."""
    from apex.normalization.fused_layer_norm import fused_rms_norm_affine

    return fused_rms_norm_affine(x, weight, weight.shape, eps)


@functools.lru_cache(maxsize=32)
def _te_rmsnorm_module(n: int, eps: float, dtype: torch.dtype, device: torch.device):
    import transformer_engine.pytorch as te

    return te.RMSNorm(n, eps=eps, params_dtype=dtype, device=device)


def rms_norm_te(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Transformer Engine's fused RMSNorm, run with *our* weight parameter.

    TE exposes the norm as a module that owns its weight; `functional_call` substitutes the
    model's parameter so gradients land on it and checkpoints keep HF names.
    """
    module = _te_rmsnorm_module(weight.shape[0], float(eps), weight.dtype, weight.device)
    return torch.func.functional_call(module, {"weight": weight}, (x,))
