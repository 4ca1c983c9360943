"""Hugging Face adapter of the Qwen3-MoE spec (`Qwen3MoeForCausalLM`, model_type "qwen3_moe").

Qwen2-MoE's keys without the shared expert, Qwen3's attention keys (head_dim, attention_bias), and
Qwen2-MoE's extras (aux-free routing bias, z-loss, capacity; see qwen2_moe/hf_adapter.py).
Parameter names are the HF checkpoints' (`mlp.experts.{e}.gate_proj.weight`, `mlp.gate.weight`):
`hf_key` is the identity. transformers >= 5 fuses experts in memory: `from_fused_state_dict`.
"""

from __future__ import annotations

from typing import Any

import torch

from megaqwen.models.config import ModelConfig
from megaqwen.models.qwen2 import hf_adapter as qwen2
from megaqwen.models.qwen2.hf_adapter import hf_key, optional_hf_keys  # noqa: F401  (identity, tied head)
from megaqwen.models.qwen2_moe import hf_adapter as qwen2_moe
from megaqwen.models.qwen2_moe.hf_adapter import from_fused_state_dict  # noqa: F401  (same layout)
from megaqwen.models.qwen3.hf_adapter import qwen3_kwargs

HF_ARCHITECTURES = ["Qwen3MoeForCausalLM"]
CONFIG_KEYS = {k: v for k, v in qwen2_moe.CONFIG_KEYS.items() if k != "shared_expert_intermediate_size"}


def bias_warning(keys) -> str | None:
    return qwen2_moe.bias_warning(keys, HF_ARCHITECTURES[0])


def config_from_hf(hf: dict[str, Any], name: str = "hf") -> ModelConfig:
    # head_dim absent: transformers' Qwen3MoeAttention falls back to hidden / heads
    kw = qwen3_kwargs(hf, "qwen3_moe", qwen2_moe.moe_kwargs_from_hf(hf, CONFIG_KEYS), default_head_dim=None)
    return ModelConfig(name=name, arch="qwen3_moe", **kw)


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    from transformers import Qwen3MoeConfig

    d = qwen2.hf_config_dict(cfg, dtype, Qwen3MoeConfig, CONFIG_KEYS, HF_ARCHITECTURES,
                             head_dim=cfg.head_dim_, attention_bias=False)
    return qwen2_moe.with_extras(cfg, d)
