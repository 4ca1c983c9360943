"""Hugging Face adapter of the Qwen2 spec: config keys and parameter names.

Parameter names are HF's own (the model was written with them), so `hf_key` is the identity; the
non-identity parts are the config keys below and the tied LM head, which HF's safetensors may omit
(or carry as a copy that loading ignores).
"""

from __future__ import annotations

from typing import Any

import torch

from megaqwen.models.config import ModelConfig

HF_ARCHITECTURES = ["Qwen2ForCausalLM"]

# megaqwen ModelConfig field -> HF Qwen2Config key
CONFIG_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "intermediate_size": "intermediate_size",
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "rope_theta": "rope_theta",
    "rms_norm_eps": "rms_norm_eps",
    "max_position_embeddings": "max_position_embeddings",
    "tie_word_embeddings": "tie_word_embeddings",
    "init_std": "initializer_range",
}


def config_from_hf(hf: dict[str, Any], name: str = "hf") -> ModelConfig:
    if hf.get("model_type") != "qwen2":
        raise ValueError(f"model_type {hf.get('model_type')!r} is not 'qwen2'")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act {hf['hidden_act']!r} is not supported (Qwen2 uses silu)")
    if hf.get("use_sliding_window"):
        raise ValueError("use_sliding_window=true is not supported (no Qwen2.5 checkpoint uses it)")
    return ModelConfig(name=name, **config_kwargs_from_hf(hf, CONFIG_KEYS))


def config_kwargs_from_hf(hf: dict[str, Any], keys: dict[str, str]) -> dict[str, Any]:
    """ModelConfig kwargs from an HF config dict through `keys` (ours -> theirs), with RoPE base and
    head_dim read the way every transformers version writes them (shared by the Qwen2 family)."""
    rope_theta = hf.get("rope_theta")
    if rope_theta is None:  # transformers >= 5 nests it under rope_parameters
        rope_theta = (hf.get("rope_parameters") or {}).get("rope_theta", 10_000.0)
    kw = {ours: hf[theirs] for ours, theirs in keys.items() if theirs in hf}
    kw["rope_theta"] = float(rope_theta)
    head_dim = hf.get("head_dim")
    if head_dim is not None and head_dim != hf["hidden_size"] // hf["num_attention_heads"]:
        kw["head_dim"] = head_dim
    return kw


def config_to_hf(cfg: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    from transformers import Qwen2Config

    return hf_config_dict(cfg, dtype, Qwen2Config, CONFIG_KEYS, HF_ARCHITECTURES)


def hf_config_dict(cfg: ModelConfig, dtype: torch.dtype, config_cls: type, keys: dict[str, str],
                   architectures: list[str]) -> dict[str, Any]:
    """config.json contents for `cfg` through a transformers config class (shared by the family)."""
    kw = {theirs: getattr(cfg, ours) for ours, theirs in keys.items()}
    hf = config_cls(**kw, hidden_act="silu", use_sliding_window=False, bos_token_id=151643,
                    eos_token_id=151643, architectures=architectures)
    d = hf.to_dict()
    d["torch_dtype"] = str(dtype).removeprefix("torch.")
    d["rope_theta"] = cfg.rope_theta  # keep the flat key older transformers read
    return d


def hf_key(fqn: str) -> str:
    """HF safetensors key of our parameter `fqn`."""
    return fqn


def optional_hf_keys(cfg: ModelConfig) -> set[str]:
    """Keys an HF checkpoint may carry that the model does not (a tied head's copy)."""
    return {"lm_head.weight"} if cfg.tie_word_embeddings else set()
