"""Qwen3 dense: Qwen2's decoder with QK-norm, no QKV bias and an explicit head_dim."""

from megaqwen.models.qwen3.model import Qwen3ForCausalLM, build_model

__all__ = ["Qwen3ForCausalLM", "build_model"]
