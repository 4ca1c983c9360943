"""Hugging Face adapter of the Qwen3 spec (`Qwen3ForCausalLM`, model_type "qwen3").

Parameter names are HF's (`self_attn.q_norm.weight` included), so `hf_key` is Qwen2's identity.
Config differences from Qwen2: `head_dim` is always written (Qwen3 configs carry it; 128 is
transformers' default when absent), and `attention_bias` must be false (true would also bias
o_proj, which no published Qwen3 checkpoint does and megaqwen does not implement).
"""

from __future__ import annotations

from typing import Any

import torch

from megaqwen.models.config import ModelConfig
from megaqwen.models.qwen2 import hf_adapter as qwen2
from megaqwen.models.qwen2.hf_adapter import hf_key, optional_hf_keys  # noqa: F401  (identity, tied head)

HF_ARCHITECTURES = ["Qwen3ForCausalLM"]
CONFIG_KEYS = qwen2.CONFIG_KEYS


def qwen3_kwargs(hf: dict[str, Any], model_type: str, kwargs: dict[str, Any],
                 default_head_dim: int | None) -> dict[str, Any]:
    """ModelConfig kwargs of a Qwen3-family config.json on top of the family's `kwargs`: QK-norm,
    no QKV bias, head_dim (absent: `default_head_dim`, or hidden / heads when None)."""
    qwen2.check_hf_config(hf, model_type)
    if hf.get("attention_bias"):
        raise ValueError(f"{model_type}: attention_bias=true is not supported (it biases o_proj too; "
                         "no published Qwen3 checkpoint uses it)")
    head_dim = hf.get("head_dim") or default_head_dim or hf["hidden_size"] // hf["num_attention_heads"]
    return {**kwargs, "qk_norm": True, "qkv_bias": False, "head_dim": int(head_dim)}


def config_from_hf(hf: dict[str, Any], name: str = "hf") -> ModelConfig:
    kw = qwen3_kwargs(hf, "qwen3", qwen2.config_kwargs_from_hf(hf, CONFIG_KEYS), default_head_dim=128)
    return ModelConfig(name=name, arch="qwen3", **kw)


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    from transformers import Qwen3Config

    return qwen2.hf_config_dict(cfg, dtype, Qwen3Config, CONFIG_KEYS, HF_ARCHITECTURES,
                                head_dim=cfg.head_dim_, attention_bias=False)
