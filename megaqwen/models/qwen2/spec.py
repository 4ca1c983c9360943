"""The Qwen2 / Qwen2.5 dense model spec."""

from megaqwen.models.qwen2 import hf_adapter
from megaqwen.models.qwen2.model import Attention, build_model
from megaqwen.models.qwen2.parallelize import parallelize_tp
from megaqwen.models.qwen2.stages import Qwen2Stages
from megaqwen.models.qwen2.validate import attention_heads, local_attention_heads, validate
from megaqwen.models.spec import ModelSpec, register_spec

SPEC = register_spec(ModelSpec(
    arch="qwen2",
    build=build_model,
    parallelize_tp=parallelize_tp,
    layers=lambda model: model.model.layers,
    selective_recompute=(Attention, "core"),
    hf=hf_adapter,
    pipeline=Qwen2Stages(),
    validate=validate,
    attention_heads=attention_heads,
    local_attention_heads=local_attention_heads,
))
