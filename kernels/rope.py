"""Rotary position embedding (RoPE), the non-interleaved "rotate half" layout used by Qwen2.

Tensors are laid out (B, T, H, D): batch, tokens, heads, head_dim. cos/sin are (B, T, D) in fp32,
built from per-token position ids so packed documents can restart their positions at 0, and from
inverse frequencies that may be YaRN-scaled for context extension (`yarn_inv_freq`).

- `apply_rope_ref`: plain PyTorch, returns new tensors.
- `apply_rope_triton`: rotates q and k *in place* (one program per token, all heads at once) and
  returns them; backward applies the inverse rotation (the transpose: sin negated) to the incoming
  gradients. cos/sin are treated as constants (they come from integer positions).
"""

from __future__ import annotations

import math

import torch

from megaqwen.kernels._triton import next_pow2, tl, triton_kernel

# ----------------------------------------------------------------------------- frequency tables


def rope_inv_freq(head_dim: int, theta: float, device: torch.device | None = None) -> torch.Tensor:
    """(D/2,) inverse frequencies theta^(-2i/D), fp32 — the same expression as transformers."""
    exponent = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    return 1.0 / (theta**exponent)


def yarn_inv_freq(head_dim: int, theta: float, factor: float, original_max_position: int,
                  beta_fast: float = 32.0, beta_slow: float = 1.0,
                  attention_factor: float | None = None,
                  device: torch.device | None = None) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023) scaled inverse frequencies (D/2,) and the attention factor.

    Dimensions that rotate more than `beta_fast` times over the original context keep their
    frequency (extrapolate), those rotating fewer than `beta_slow` times are divided by `factor`
    (interpolate), with a linear ramp in between (ramp ends floored/ceiled to whole dimensions, as
    transformers' default `truncate=True`). cos/sin are multiplied by the attention factor, by
    default 0.1 ln(factor) + 1 (1.139 at factor 4); pass it as `rope_cos_sin(..., scale=)`.
    """
    if factor < 1.0:
        raise ValueError(f"yarn factor must be >= 1, got {factor}")
    if original_max_position <= 0:
        raise ValueError(f"yarn original_max_position must be positive, got {original_max_position}")
    # the same expressions as transformers, so the tables agree to the last bit
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)  # (D/2,)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)

    def correction_dim(num_rotations: float) -> float:
        return (head_dim * math.log(original_max_position / (num_rotations * 2 * math.pi))
                / (2 * math.log(theta)))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = (torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)
    keep = (1.0 - ramp.clamp(0.0, 1.0)).to(device)  # 1 for fast (high-frequency) dims
    inv_freq = interpolation * (1.0 - keep) + extrapolation * keep
    if attention_factor is None:
        attention_factor = 0.1 * math.log(factor) + 1.0 if factor > 1.0 else 1.0
    return inv_freq, float(attention_factor)


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor,
                 scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids (B, T) -> cos, sin (B, T, D), fp32; `scale` is YaRN's attention factor."""
    freqs = position_ids.float()[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat((freqs, freqs), dim=-1)
    if scale == 1.0:
        return emb.cos(), emb.sin()
    return emb.cos() * scale, emb.sin() * scale


# ----------------------------------------------------------------------------- reference


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_ref(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q (B, T, Hq, D), k (B, T, Hk, D); cos/sin (B, T, D) broadcast over heads."""
    cos = cos.unsqueeze(2).to(q.dtype)
    sin = sin.unsqueeze(2).to(q.dtype)
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


# ----------------------------------------------------------------------------- Triton kernel


@triton_kernel
def _rope_kernel(X, COS, SIN, sxb, sxt, sxh, scb, sct, T, n_heads, half,
                 BACKWARD: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per token (b, t): rotates all heads of X[b, t] in place.

    out1 = x1 c1 - x2 s1, out2 = x2 c2 + x1 s2 (c1/c2 the two halves of cos). The backward pass is
    the transposed rotation: dx1 = g1 c1 + g2 s2, dx2 = g2 c2 - g1 s1.
    """
    tok = tl.program_id(0).to(tl.int64)  # b * sxb may pass 2^31 at long context
    b = tok // T
    t = tok % T
    heads = tl.arange(0, BLOCK_H)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    dmask = dims < half
    mask = (heads < n_heads) & dmask
    cs = COS + b * scb + t * sct
    sn = SIN + b * scb + t * sct
    c1 = tl.load(cs + dims, mask=dmask, other=0.0)
    c2 = tl.load(cs + half + dims, mask=dmask, other=0.0)
    s1 = tl.load(sn + dims, mask=dmask, other=0.0)
    s2 = tl.load(sn + half + dims, mask=dmask, other=0.0)
    ptr1 = X + b * sxb + t * sxt + heads * sxh + dims
    x1 = tl.load(ptr1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(ptr1 + half, mask=mask, other=0.0).to(tl.float32)
    if BACKWARD:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(ptr1, y1.to(X.dtype.element_ty), mask=mask)
    tl.store(ptr1 + half, y2.to(X.dtype.element_ty), mask=mask)


def _rope_inplace(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> None:
    """Rotate x (B, T, H, D) with unit stride on D in place; cos/sin (B, T, D) fp32 contiguous."""
    b, t, h, d = x.shape
    _rope_kernel[(b * t,)](x, cos, sin, x.stride(0), x.stride(1), x.stride(2), cos.stride(0),
                           cos.stride(1), t, h, d // 2, BACKWARD=backward,
                           BLOCK_H=next_pow2(h), BLOCK_D=next_pow2(d // 2))


def _check(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor) -> None:
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"apply_rope: q {tuple(q.shape)} and k {tuple(k.shape)} must be (B, T, H, D) "
                         "with equal B, T, D")
    if cos.shape != (*q.shape[:2], q.shape[-1]):
        raise ValueError(f"apply_rope: cos/sin {tuple(cos.shape)} must be (B, T, D) = "
                         f"{(*q.shape[:2], q.shape[-1])}")
    if q.shape[-1] % 2:
        raise ValueError(f"apply_rope: head_dim {q.shape[-1]} must be even")


class _RoPEInplaceFn(torch.autograd.Function):
    """Rotates one tensor in place. q and k go through separate calls because autograd allows a
    Function that modifies a view (q/k are views of the projection outputs) one output only."""

    @staticmethod
    def forward(ctx, x, cos32, sin32):
        _rope_inplace(x, cos32, sin32, backward=False)
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos32, sin32)
        return x

    @staticmethod
    def backward(ctx, dx):
        cos32, sin32 = ctx.saved_tensors
        # the incoming gradient may be shared: rotate a private (contiguous) copy, made in one pass
        dx = dx.clone(memory_format=torch.contiguous_format)
        _rope_inplace(dx, cos32, sin32, backward=True)
        return dx, None, None


def apply_rope_triton(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """In-place RoPE on q (B, T, Hq, D) and k (B, T, Hk, D); returns the rotated q, k.

    Tensors without unit stride on D are copied first (then the copies are rotated and returned).
    """
    _check(q, k, cos)
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    cos32, sin32 = cos.float().contiguous(), sin.float().contiguous()
    return _RoPEInplaceFn.apply(q, cos32, sin32), _RoPEInplaceFn.apply(k, cos32, sin32)
