"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): the Qwen2 decoder with sparse MoE MLPs."""

from megaqwen.models.qwen2_moe.model import (
    MoELossParts,
    Qwen2MoeForCausalLM,
    SparseMoeBlock,
    build_model,
    load_balancing_loss,
)

__all__ = ["MoELossParts", "Qwen2MoeForCausalLM", "SparseMoeBlock", "build_model", "load_balancing_loss"]
