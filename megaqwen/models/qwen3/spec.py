"""The Qwen3 dense model spec (Qwen3-0.6B ... Qwen3-32B): Qwen2's plan and attention core."""

from megaqwen.models.qwen2.model import Attention
from megaqwen.models.qwen2.parallelize import parallelize_tp
from megaqwen.models.qwen3 import hf_adapter
from megaqwen.models.qwen3.model import build_model
from megaqwen.models.spec import ModelSpec, register_spec

SPEC = register_spec(ModelSpec(
    arch="qwen3",
    build=build_model,
    parallelize_tp=parallelize_tp,
    layers=lambda model: model.model.layers,
    selective_recompute=(Attention, "core"),
    hf=hf_adapter,
))
