"""Activation recomputation and `torch.compile`, applied per repeated block after TP/SP and before
data-parallel wrapping (the design's order), without renaming any parameter.

Recomputation (`parallel.recompute`):
  none       keep every activation.
  selective  re-run only the spec's attention core (softmax(q k^T) v) in backward: its (B, H, T, T)
             intermediates are the largest activations per FLOP saved (Korthikanti et al. 2022).
  full       keep only each layer's input and re-run the whole layer in backward.
Both swap the module's class for a subclass whose forward (or named method) runs under
non-reentrant `torch.utils.checkpoint` - the same mechanism FSDP2 uses to add its hooks - so names,
state dicts and shard metadata stay as they were.

Compile (`parallel.compile`): `nn.Module.compile()` on every block, in place (no `_orig_mod.`
prefix in parameter names). Region hooks and collectives are graph breaks, so each block compiles
into the pieces between them. `auto` (the default) compiles on CUDA with the native engine, where
fusing the elementwise work between the GEMMs (and the Triton kernels, registered as custom ops)
pays back the compile time; it stays off on CPU, where every test and demo run would only pay the
compile time, and under DeepSpeed, which wraps the model itself.
"""

from __future__ import annotations

import functools

import torch.nn as nn
from torch.utils.checkpoint import checkpoint

RECOMPUTE_MODES = ("none", "selective", "full")


@functools.cache
def _recompute_class(cls: type, method: str) -> type:
    original = getattr(cls, method)

    @functools.wraps(original)
    def run(self, *args, **kwargs):
        return checkpoint(original, self, *args, use_reentrant=False, **kwargs)

    return type(f"Recompute{cls.__name__}", (cls,), {method: run})


def recompute_method(module: nn.Module, method: str) -> None:
    """Make `module.<method>` keep no activations and re-run in backward."""
    module.__class__ = _recompute_class(type(module), method)


def apply_recompute(layers: nn.ModuleDict, mode: str, selective: tuple[type, str]) -> None:
    """`mode` none | selective | full over the model's repeated blocks; `selective` names the
    (module class, method) whose call is recomputed in selective mode."""
    if mode not in RECOMPUTE_MODES:
        raise ValueError(f"parallel.recompute={mode!r}; choose from {RECOMPUTE_MODES}")
    if mode == "none":
        return
    cls, method = selective
    for layer in layers.values():
        if mode == "full":
            recompute_method(layer, "forward")
            continue
        targets = [m for m in layer.modules() if isinstance(m, cls)]
        if not targets:
            raise ValueError(f"parallel.recompute=selective: no {cls.__name__} in {type(layer).__name__}")
        for m in targets:
            recompute_method(m, method)


COMPILE_SETTINGS = ("auto", "true", "false")


def compile_enabled(setting: bool | str, device_type: str, native_engine: bool = True) -> bool:
    """Whether `parallel.compile` (auto | true | false; a bool, or its string form as Hydra gives a
    str field) compiles the layers of a run on `device_type`: auto = CUDA with the native engine."""
    value = str(setting).lower()
    if value not in COMPILE_SETTINGS:
        raise ValueError(f"parallel.compile={setting!r} is unknown; choose from {list(COMPILE_SETTINGS)}")
    if value == "auto":
        return device_type == "cuda" and native_engine
    return value == "true"


def apply_compile(layers: nn.ModuleDict) -> None:
    """torch.compile every block in place."""
    for layer in layers.values():
        layer.compile()
