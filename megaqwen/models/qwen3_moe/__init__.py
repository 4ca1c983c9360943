"""Qwen3-MoE (30B-A3B, 235B-A22B): Qwen2-MoE's sparse decoder with Qwen3's attention."""

from megaqwen.models.qwen3_moe.model import Qwen3MoeForCausalLM, build_model

__all__ = ["Qwen3MoeForCausalLM", "build_model"]
