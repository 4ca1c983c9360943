"""RMSNorm: y = w * x / sqrt(mean(x^2) + eps), statistics in fp32.

Only the plain-PyTorch reference lives here for now; it is bit-compatible with Hugging Face's
`Qwen2RMSNorm` (normalise in fp32, cast back to the input dtype, then scale by the weight).
"""

from __future__ import annotations

import torch


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)
