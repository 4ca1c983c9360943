"""The fused kernel of the ring's fully visible attention tiles (`context_parallel.ring_attention`):
a tile with no mask runs one kernel that returns its log-sum-exp, so the ring merges it like the
PyTorch tiles. CPU: ATen's flash kernel; CUDA: flash-attn's kernels when installed, in bf16 (the
ring's running statistics stay fp32); otherwise None and every tile takes the PyTorch path.

`flash_tile_kernel` adapts any flash-attn-style (forward, backward) pair to the ring's layout; tests
inject a fake one through `TILE_KERNEL` to run the flash path on CPU.
"""

from __future__ import annotations

import functools
import inspect

import torch

FUSED_TILES = True
"""Use `fused_tile_kernel` for fully visible tiles (tests switch it off to check both paths)."""
TILE_KERNEL: tuple | None = None
"""(forward, backward) that replaces the device's fused tile pair (tests inject a fake flash-attn
tile through `flash_tile_kernel` on CPU); None: the device's choice."""


def _flash_backward_kwargs(fn) -> dict:
    """The keyword arguments of flash-attn 2.x's `_flash_attn_backward` beyond the tensors, for the
    signature this install has (2.5: window_size=(-1, -1); 2.6+: window_size_left/right, softcap)."""
    known = {"dropout_p": 0.0, "causal": False, "window_size": (-1, -1), "window_size_left": -1,
             "window_size_right": -1, "softcap": 0.0, "alibi_slopes": None, "deterministic": False,
             "rng_state": None}
    return {k: v for k, v in known.items() if k in inspect.signature(fn).parameters}


def flash_tile_kernel(forward, backward, dtype: torch.dtype | None = None):
    """(forward, backward) of an unmasked attention tile in the ring's layout (B, H, T, D), from
    flash-attn-style functions in (B, T, H, D):
        forward(q, k, v, softmax_scale) -> (out, lse (B, H, T) fp32)
        backward(dout, q, k, v, out, lse, dq, dk, dv, softmax_scale), writing dq/dk/dv in place.
    The pair has the signature of ATen's CPU flash kernels, so `_block_forward` / `_block_backward`
    call either alike. `dtype`: what the tile computes in (flash-attn takes bf16/fp16; the ring's
    running statistics stay fp32); None keeps the inputs' dtype."""

    def to_flash(x):
        x = x.transpose(1, 2)
        return (x if dtype is None else x.to(dtype)).contiguous()

    def fwd(q, k, v, dropout_p, causal, scale):
        del dropout_p, causal  # fully visible tiles: no mask, no dropout
        out, lse = forward(to_flash(q), to_flash(k), to_flash(v), scale)
        return out.transpose(1, 2).to(q.dtype), lse.to(q.dtype)

    def bwd(do, q, k, v, out, lse, dropout_p, causal, scale):
        del dropout_p, causal
        qf, kf, vf = to_flash(q), to_flash(k), to_flash(v)
        dq, dk, dv = torch.empty_like(qf), torch.empty_like(kf), torch.empty_like(vf)
        lse = (lse if dtype is None else lse.float()).contiguous()  # flash-attn's lse is fp32
        backward(to_flash(do), qf, kf, vf, to_flash(out), lse, dq, dk, dv, scale)
        return tuple(x.transpose(1, 2).to(q.dtype) for x in (dq, dk, dv))

    return fwd, bwd


@functools.cache
def _flash_attn_tiles():
    """flash-attn's kernels as a tile pair (they return and take the log-sum-exp), or None when the
    package is not installed."""
    try:
        from flash_attn import flash_attn_func
        from flash_attn.flash_attn_interface import _flash_attn_backward
    except ImportError:
        return None
    extra = _flash_backward_kwargs(_flash_attn_backward)

    def forward(q, k, v, scale):
        out, lse, _ = flash_attn_func(q, k, v, 0.0, softmax_scale=scale, causal=False, return_attn_probs=True)
        return out, lse

    def backward(do, q, k, v, out, lse, dq, dk, dv, scale):
        _flash_attn_backward(do, q, k, v, out, lse, dq, dk, dv, softmax_scale=scale, **extra)

    return flash_tile_kernel(forward, backward, torch.bfloat16)


def fused_tile_kernel(device: torch.device):
    """(forward, backward) of a fused unmasked attention tile returning/taking the log-sum-exp, or
    None. CPU: ATen's flash kernel (2.5x forward, 1.25x backward vs the PyTorch tile at 512x512,
    D=16); CUDA: flash-attn's kernels when installed (`flash_tile_kernel`: bf16 tiles, fp32
    statistics), else the PyTorch tile."""
    if not FUSED_TILES:
        return None
    if TILE_KERNEL is not None:
        return TILE_KERNEL
    if device.type == "cpu":
        aten = torch.ops.aten
        return (aten._scaled_dot_product_flash_attention_for_cpu,
                aten._scaled_dot_product_flash_attention_for_cpu_backward)
    if device.type == "cuda":
        return _flash_attn_tiles()
    return None
