"""The Qwen3-MoE model spec (Qwen3-30B-A3B, Qwen3-235B-A22B): Qwen2-MoE's plan and attention core."""

from megaqwen.models.qwen2.model import Attention
from megaqwen.models.qwen2_moe.parallelize import parallelize_tp
from megaqwen.models.qwen3_moe import hf_adapter
from megaqwen.models.qwen3_moe.model import build_model
from megaqwen.models.spec import ModelSpec, register_spec

SPEC = register_spec(ModelSpec(
    arch="qwen3_moe",
    build=build_model,
    parallelize_tp=parallelize_tp,
    layers=lambda model: model.model.layers,
    selective_recompute=(Attention, "core"),
    hf=hf_adapter,
))
