"""Qwen2 / Qwen2.5 dense: the model, its parallel plan, its HF adapter, registered as one spec."""

from megaqwen.models.qwen2.model import (
    MLP,
    Attention,
    Decoder,
    DecoderLayer,
    ParamInit,
    Qwen2ForCausalLM,
    RMSNorm,
    build_model,
)

__all__ = ["MLP", "Attention", "Decoder", "DecoderLayer", "ParamInit", "Qwen2ForCausalLM", "RMSNorm",
           "build_model"]
