"""Kernel selection: one `KernelOps` bundle of callables that the model uses for each fused op.

Each op is chosen by config (`kernels.rmsnorm=triton|apex|te|torch`, default `auto`). `auto` walks
`AUTO_ORDER[op]` and takes the first implementation usable on the target device: Triton and the
vendor libraries (flash-attn, Transformer Engine, Apex) only on CUDA, where they are fast; on CPU
the PyTorch references (Triton there needs the interpreter, ~1000x slower). An explicit choice that
cannot run raises a `ValueError` saying why. `resolve_ops` logs every choice with its reason.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from megaqwen.kernels._triton import triton_unavailable_reason
from megaqwen.kernels.attention import flash_attention, sdpa_attention, te_attention
from megaqwen.kernels.cross_entropy import (
    linear_cross_entropy_chunked,
    linear_cross_entropy_ref,
    linear_cross_entropy_triton,
)
from megaqwen.kernels.rmsnorm import rms_norm_apex, rms_norm_ref, rms_norm_te, rms_norm_triton
from megaqwen.kernels.rope import apply_rope_ref, apply_rope_triton
from megaqwen.kernels.swiglu import swiglu_ref, swiglu_triton

log = logging.getLogger(__name__)


@dataclass
class KernelConfig:
    rmsnorm: str = "auto"
    """RMSNorm implementation: auto | triton | apex | te | torch."""
    swiglu: str = "auto"
    """SwiGLU implementation: auto | triton | torch."""
    rope: str = "auto"
    """RoPE implementation: auto | triton (in place) | torch."""
    cross_entropy: str = "auto"
    """LM head + loss: auto | triton (chunked, Triton softmax) | chunked (chunked, PyTorch) | torch."""
    attention: str = "auto"
    """Attention backend: auto | flash | te | sdpa."""
    adam: str = "auto"
    """AdamW implementation for `build_adamw`: auto | apex (FusedAdam) | torch."""
    device: str | None = None
    """Device type the ops will run on (cuda | cpu); None: cuda when available."""


# op -> {name: implementation}.
IMPLS: dict[str, dict[str, Callable]] = {
    "rmsnorm": {"triton": rms_norm_triton, "apex": rms_norm_apex, "te": rms_norm_te,
                "torch": rms_norm_ref},
    "swiglu": {"triton": swiglu_triton, "torch": swiglu_ref},
    "rope": {"triton": apply_rope_triton, "torch": apply_rope_ref},
    "cross_entropy": {"triton": linear_cross_entropy_triton, "chunked": linear_cross_entropy_chunked,
                      "torch": linear_cross_entropy_ref},
    "attention": {"flash": flash_attention, "te": te_attention, "sdpa": sdpa_attention},
}
# Fastest first. Triton's RMSNorm beats Apex/TE's on the shapes we use (one row per program, no
# atomics) and is always there with CUDA torch, so the vendor norms are opt-in by name.
AUTO_ORDER: dict[str, list[str]] = {
    "rmsnorm": ["triton", "torch"],
    "swiglu": ["triton", "torch"],
    "rope": ["triton", "torch"],
    # chunked on CPU too: same loss, 1.7x faster and 21x less memory than full logits at the 0.5B
    # vocabulary and 8K tokens (benchmarks/RESULTS.md, Kernels).
    "cross_entropy": ["triton", "chunked", "torch"],
    "attention": ["flash", "te", "sdpa"],
}
# Python package that each vendor implementation imports (lazily, at call time).
_VENDOR_MODULE = {"apex": "apex", "te": "transformer_engine", "flash": "flash_attn"}


def _module_present(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def unavailable_reason(name: str, device: str) -> str | None:
    """None when implementation `name` can run on `device` ("cuda" | "cpu"), else why not."""
    if name == "triton":
        return triton_unavailable_reason(device)
    if name in _VENDOR_MODULE:
        if device != "cuda":
            return f"{_VENDOR_MODULE[name]} runs on CUDA only (device is {device})"
        if not _module_present(_VENDOR_MODULE[name]):
            return f"package `{_VENDOR_MODULE[name]}` is not installed"
    return None  # torch, chunked, sdpa: always


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class KernelOps:
    rms_norm: Callable = rms_norm_ref
    swiglu: Callable = swiglu_ref
    apply_rope: Callable = apply_rope_ref
    linear_cross_entropy: Callable = linear_cross_entropy_chunked
    """Chunked by default (also for a model built without `resolve_ops`): the 152K vocabulary's
    full fp32 logits are the first OOM at long sequences; same loss as the reference."""
    attention: Callable = sdpa_attention
    choices: dict[str, str] = field(default_factory=dict)
    """op -> chosen implementation name."""
    reasons: dict[str, str] = field(default_factory=dict)
    """op -> why that implementation was chosen."""

    def describe(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.choices.items()) or \
            "torch references, chunked cross-entropy"


def _pick(op: str, want: str, device: str) -> tuple[str, Callable, str]:
    impls = IMPLS[op]
    if want == "auto":
        skipped = []
        for name in AUTO_ORDER[op]:
            reason = unavailable_reason(name, device)
            if name == "triton" and device != "cuda":
                reason = "auto uses Triton on CUDA only (on CPU it needs the slow interpreter)"
            if reason is None:
                why = f"auto on {device}" + (f" (skipped {'; '.join(skipped)})" if skipped else "")
                return name, impls[name], why
            skipped.append(f"{name}: {reason}")
        raise ValueError(f"kernels.{op}=auto found nothing usable: {skipped}")  # torch is always last
    if want not in impls:
        raise ValueError(f"kernels.{op}={want!r} is unknown; choose from {['auto', *impls]}")
    reason = unavailable_reason(want, device)
    if reason is not None:
        raise ValueError(f"kernels.{op}={want!r} cannot run here: {reason}")
    return want, impls[want], "selected in config"


def resolve_ops(cfg: KernelConfig | None = None, device: str | None = None) -> KernelOps:
    """Pick one implementation per op for `device` (the run's device type). `cfg.device`, when set,
    must agree with it: a config that says cuda for a CPU run is an error, not silently ignored."""
    cfg = cfg or KernelConfig()
    if device is not None and cfg.device is not None and \
            torch.device(cfg.device).type != torch.device(device).type:
        raise ValueError(f"kernels.device={cfg.device!r} but the model runs on {device!r}; "
                         "unset kernels.device (it follows train.device) or make them agree")
    device = torch.device(device or cfg.device or _default_device()).type
    picked = {op: _pick(op, getattr(cfg, op), device) for op in IMPLS}
    ops = KernelOps(
        rms_norm=picked["rmsnorm"][1],
        swiglu=picked["swiglu"][1],
        apply_rope=picked["rope"][1],
        linear_cross_entropy=picked["cross_entropy"][1],
        attention=picked["attention"][1],
        choices={op: name for op, (name, _, _) in picked.items()},
        reasons={op: why for op, (_, _, why) in picked.items()},
    )
    for op, (name, _, why) in picked.items():
        log.debug("kernels.%s = %s (%s)", op, name, why)  # the model line lists the choices
    return ops


def adamw_factory(impl: str = "auto", device: str | None = None):
    """The AdamW constructor `kernels.adam` names, as `factory(params, **adamw_kwargs)`: Apex
    `FusedAdam(adam_w_mode=True)` or `torch.optim.AdamW` (its fused kernel on CUDA). Every optimizer
    path (plain, ZeRO-1's inner optimizer, DeepSpeed's client optimizer) builds through this, so the
    setting is never silently ignored. `auto` takes torch's own fused AdamW on CUDA, which matches
    Apex's speed without the extra package; name `apex` to use Apex."""
    device = torch.device(device or _default_device()).type
    if impl not in ("auto", "apex", "torch"):
        raise ValueError(f"kernels.adam={impl!r} is unknown; choose from ['auto', 'apex', 'torch']")
    if impl == "apex":
        reason = unavailable_reason("apex", device)
        if reason is not None:
            raise ValueError(f"kernels.adam='apex' cannot run here: {reason}")
        from apex.optimizers import FusedAdam

        log.debug("kernels.adam = apex FusedAdam (selected in config)")
        return functools.partial(FusedAdam, adam_w_mode=True)
    fused = device == "cuda"
    log.debug("kernels.adam = torch AdamW (%s, fused=%s)", "auto" if impl == "auto" else "selected", fused)
    return functools.partial(torch.optim.AdamW, fused=fused)


def build_adamw(params, impl: str = "auto", device: str | None = None, **kwargs) -> torch.optim.Optimizer:
    """AdamW from `adamw_factory(impl, device)`; kwargs are AdamW's (lr, betas, eps, weight_decay)."""
    return adamw_factory(impl, device)(params, **kwargs)
