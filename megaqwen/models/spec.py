"""A model spec bundles what the generic machinery needs to know about one architecture.

    spec = get_spec(cfg)                     # by the config's `arch`
    model = spec.build(cfg, ops, "meta")     # plain single-device model, nothing allocated
    shards = spec.parallelize_tp(model, ctx) # this architecture's TP/SP plan (a ShardMap back)
    spec.layers(model)                       # the repeated blocks: FSDP units, recompute, compile
    spec.selective_recompute                 # (module type, method) re-run in backward by "selective"
    spec.hf                                  # Hugging Face adapter: config + parameter names

Each architecture (Qwen2, Qwen2-MoE, Qwen3, Qwen3-MoE) registers its own spec; `megaqwen.parallel`
and the trainer name no model's modules (TorchTitan's model spec is the model for this).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch.nn as nn


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    """Architecture key (`ModelConfig.arch`)."""
    build: Callable[..., nn.Module]
    """build(cfg, ops=None, device="cpu", dtype=fp32, seed=None) -> the single-device model."""
    parallelize_tp: Callable[..., Any]
    """parallelize_tp(model, mesh, sequence_parallel, linear_backend) -> ShardMap (in place)."""
    layers: Callable[[nn.Module], nn.ModuleDict]
    """The model's repeated blocks (a ModuleDict keyed by layer index)."""
    selective_recompute: tuple[type, str]
    """(module class, method name) whose call selective recomputation re-runs in backward."""
    hf: Any
    """HF adapter module: config_from_hf, config_to_hf, hf_key(fqn), hf_architectures."""


_SPECS: dict[str, ModelSpec] = {}


def register_spec(spec: ModelSpec) -> ModelSpec:
    if spec.arch in _SPECS and _SPECS[spec.arch] is not spec:
        raise ValueError(f"model spec {spec.arch!r} is already registered")
    _SPECS[spec.arch] = spec
    return spec


def get_spec(arch_or_cfg: Any) -> ModelSpec:
    """The spec for an architecture name or a config (its `arch` field)."""
    arch = arch_or_cfg if isinstance(arch_or_cfg, str) else getattr(arch_or_cfg, "arch", "qwen2")
    _load_builtin()
    if arch not in _SPECS:
        raise ValueError(f"unknown model architecture {arch!r}; registered: {sorted(_SPECS)}")
    return _SPECS[arch]


def _load_builtin() -> None:
    import megaqwen.models.qwen2.spec  # noqa: F401  (registers "qwen2")
    import megaqwen.models.qwen2_moe.spec  # noqa: F401  (registers "qwen2_moe")
    import megaqwen.models.qwen3.spec  # noqa: F401  (registers "qwen3")
    import megaqwen.models.qwen3_moe.spec  # noqa: F401  (registers "qwen3_moe")
