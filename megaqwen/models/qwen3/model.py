"""Qwen3 dense (0.6B ... 32B): the Qwen2 decoder of `megaqwen.models.qwen2.model`, unchanged in code.

What differs from Qwen2.5 is read from the config by the shared modules, so there is one attention
to maintain: `qk_norm` adds `self_attn.q_norm` / `k_norm` (RMSNorm over head_dim, weight (D,), on
every head of q and k before RoPE), `qkv_bias=False` drops the q/k/v biases, and `head_dim` (128 at
every size) may differ from hidden_size / num_heads (0.6B: 16 heads x 128 = 2048-wide q on a 1024
residual). The TP plan is Qwen2's, which keeps the q/k norm weights whole on every rank.
"""

from __future__ import annotations

import torch

from megaqwen.kernels.registry import KernelOps
from megaqwen.models.config import ModelConfig
from megaqwen.models.qwen2.model import Qwen2ForCausalLM, build_on_meta


class Qwen3ForCausalLM(Qwen2ForCausalLM):
    """Qwen2ForCausalLM built from a Qwen3 config (`qk_norm=True`, `qkv_bias=False`)."""


def build_model(cfg: ModelConfig, ops: KernelOps | None = None, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, seed: int | None = None) -> Qwen3ForCausalLM:
    """As `megaqwen.models.qwen2.build_model` (meta build, seeded init; q/k norms start at ones)."""
    return build_on_meta(Qwen3ForCausalLM, cfg, ops, device, dtype, seed)
