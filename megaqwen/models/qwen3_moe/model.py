"""Qwen3-MoE: the Qwen2-MoE model of `megaqwen.models.qwen2_moe.model`, unchanged in code.

Its attention is Qwen3's (QK-norm, no QKV bias, head_dim 128: config switches the shared Qwen2
attention reads, see `megaqwen.models.qwen3.model`); its sparse blocks are Qwen2-MoE's
`SparseMoeBlock` without the shared expert (`shared_expert_intermediate_size=0`) and with the top-k
weights renormalised (`norm_topk_prob=True`), which is HF's Qwen3MoeSparseMoeBlock: softmax in fp32,
top-k, renormalise, cast. Load-balancing loss, z-loss, aux-free bias, grouped dispatch and expert
parallelism are Qwen2-MoE's; so is the TP plan (sparse blocks whole on every TP rank).
"""

from __future__ import annotations

import torch

from megaqwen.kernels.registry import KernelOps
from megaqwen.models.config import ModelConfig
from megaqwen.models.qwen2.model import build_on_meta
from megaqwen.models.qwen2_moe.model import Qwen2MoeForCausalLM


class Qwen3MoeForCausalLM(Qwen2MoeForCausalLM):
    """Qwen2MoeForCausalLM built from a Qwen3-MoE config (QK-norm, no shared expert)."""


def build_model(cfg: ModelConfig, ops: KernelOps | None = None, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, seed: int | None = None) -> Qwen3MoeForCausalLM:
    """As `megaqwen.models.qwen2_moe.build_model`."""
    return build_on_meta(Qwen3MoeForCausalLM, cfg, ops, device, dtype, seed)
