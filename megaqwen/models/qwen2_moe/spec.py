"""The Qwen2-MoE model spec (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B)."""

from megaqwen.models.qwen2.model import Attention
from megaqwen.models.qwen2.stages import Qwen2Stages
from megaqwen.models.qwen2.validate import attention_heads, local_attention_heads
from megaqwen.models.qwen2_moe import hf_adapter
from megaqwen.models.qwen2_moe.model import build_model
from megaqwen.models.qwen2_moe.parallelize import parallelize_tp
from megaqwen.models.qwen2_moe.validate import validate
from megaqwen.models.spec import ModelSpec, register_spec

SPEC = register_spec(ModelSpec(
    arch="qwen2_moe",
    build=build_model,
    parallelize_tp=parallelize_tp,
    layers=lambda model: model.model.layers,
    selective_recompute=(Attention, "core"),
    hf=hf_adapter,
    pipeline=Qwen2Stages(),
    mlp_activation_width=lambda cfg: cfg.num_experts_per_tok * cfg.moe_intermediate_size
    + cfg.shared_expert_intermediate_size,  # a token's top-k experts and the shared expert (0 if none)
    validate=validate,
    expert_parallel=True,
    attention_heads=attention_heads,
    local_attention_heads=local_attention_heads,
))
