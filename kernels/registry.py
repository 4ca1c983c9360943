"""Kernel selection: one `KernelOps` bundle of callables that the model uses for each fused op.

Each op is chosen by config (`kernels.rmsnorm=torch|...`, default `auto`). `auto` picks the fastest
implementation available on this machine and `describe()` says which ran and why.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from megaqwen.kernels.attention import sdpa_attention
from megaqwen.kernels.cross_entropy import linear_cross_entropy_ref
from megaqwen.kernels.rmsnorm import rms_norm_ref
from megaqwen.kernels.rope import apply_rope_ref
from megaqwen.kernels.swiglu import swiglu_ref

log = logging.getLogger(__name__)


@dataclass
class KernelConfig:
    rmsnorm: str = "auto"
    """RMSNorm implementation: auto | torch."""
    swiglu: str = "auto"
    """SwiGLU implementation: auto | torch."""
    rope: str = "auto"
    """RoPE implementation: auto | torch."""
    cross_entropy: str = "auto"
    """LM head + loss implementation: auto | torch."""
    attention: str = "auto"
    """Attention backend: auto | sdpa."""


# op -> {name: implementation}. Later kernels register themselves here.
IMPLS: dict[str, dict[str, Callable]] = {
    "rmsnorm": {"torch": rms_norm_ref},
    "swiglu": {"torch": swiglu_ref},
    "rope": {"torch": apply_rope_ref},
    "cross_entropy": {"torch": linear_cross_entropy_ref},
    "attention": {"sdpa": sdpa_attention},
}
AUTO_ORDER: dict[str, list[str]] = {
    "rmsnorm": ["torch"],
    "swiglu": ["torch"],
    "rope": ["torch"],
    "cross_entropy": ["torch"],
    "attention": ["sdpa"],
}


@dataclass
class KernelOps:
    rms_norm: Callable = rms_norm_ref
    swiglu: Callable = swiglu_ref
    apply_rope: Callable = apply_rope_ref
    linear_cross_entropy: Callable = linear_cross_entropy_ref
    attention: Callable = sdpa_attention
    choices: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.choices.items()) or "all torch references"


def _pick(op: str, want: str) -> tuple[str, Callable]:
    impls = IMPLS[op]
    if want == "auto":
        name = next(n for n in AUTO_ORDER[op] if n in impls)
        return name, impls[name]
    if want not in impls:
        raise ValueError(f"kernels.{op}={want!r} is not available here; choose from "
                         f"{['auto', *impls]}")
    return want, impls[want]


def resolve_ops(cfg: KernelConfig | None = None) -> KernelOps:
    cfg = cfg or KernelConfig()
    picked = {op: _pick(op, getattr(cfg, op)) for op in IMPLS}
    ops = KernelOps(
        rms_norm=picked["rmsnorm"][1],
        swiglu=picked["swiglu"][1],
        apply_rope=picked["rope"][1],
        linear_cross_entropy=picked["cross_entropy"][1],
        attention=picked["attention"][1],
        choices={op: name for op, (name, _) in picked.items()},
    )
    log.info("kernels: %s", ops.describe())
    return ops
