"""A model's config and full weights from a native checkpoint or a Hugging Face folder, whole.

What evaluation, the converters and tests read a trained model with (one process, no layout).
The native checkpoint's folder layout and DCP reading are parallel/'s (`checkpoint_folder`), the
HF config mapping each spec's adapter; this module only puts them together.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from megaqwen.models.config import ModelConfig
from megaqwen.parallel.checkpoint_folder import read_meta, read_model_state, resolve_checkpoint

log = logging.getLogger(__name__)


MODEL_TYPES = {"qwen2": "qwen2", "qwen2_moe": "qwen2_moe", "qwen3": "qwen3", "qwen3_moe": "qwen3_moe"}
"""HF config.json model_type -> our architecture (spec) name."""


def hf_adapter(arch: str):
    from megaqwen.models.spec import get_spec

    return get_spec(arch).hf


def warn_extras(keys, adapter) -> None:
    """Log the adapter's warning about tensors stock transformers ignores (MoE routing bias)."""
    warning = getattr(adapter, "bias_warning", None)
    msg = warning(keys) if warning is not None else None
    if msg:
        log.warning(msg)


def read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an HF folder (single file or index-sharded), whole: conversion and eval."""
    from megaqwen.parallel.materialize import hf_weight_files

    weights: dict[str, torch.Tensor] = {}
    for f in sorted(set(hf_weight_files(hf_dir).values())):
        weights.update(load_file(f))
    return weights


def read_hf(hf_dir: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and weights of an HF folder; a tied checkpoint's redundant lm_head is dropped."""
    config_path = hf_dir / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found")
    hf_config = json.loads(config_path.read_text())
    adapter = hf_adapter(MODEL_TYPES.get(hf_config.get("model_type"), "qwen2"))
    cfg = adapter.config_from_hf(hf_config, name=hf_dir.name)
    weights = read_hf_weights(hf_dir)
    warn_extras(weights, adapter)
    if cfg.tie_word_embeddings:
        weights.pop("lm_head.weight", None)
    return cfg, weights


def read_model_weights(ckpt_dir: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Model tensors of a native checkpoint in their stored dtypes, with its ModelConfig."""
    path = resolve_checkpoint(ckpt_dir)
    return ModelConfig.from_dict(read_meta(path)["model_config"]), read_model_state(path)


def read_weights(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Config and model tensors from a native checkpoint folder or an HF folder."""
    path = Path(path)
    return read_hf(path) if (path / "config.json").exists() else read_model_weights(path)
