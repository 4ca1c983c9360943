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
into the pieces between them.
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


def apply_compile(layers: nn.ModuleDict) -> None:
    """torch.compile every block in place."""
    for layer in layers.values():
        layer.compile()
