"""Launching Triton kernels on CUDA, or on CPU through Triton's interpreter.

`@triton.jit` decides between compiling and interpreting when the decorator runs, i.e. when the
kernel module is imported, from the `TRITON_INTERPRET` environment variable. That makes the result
depend on import order (a test session that imported the model first would get compiled kernels
that cannot take CPU tensors). `TritonKernel` defers the choice to launch time instead: CUDA
tensors get the compiled kernel, CPU tensors the interpreted one, and CPU launches are refused
unless `TRITON_INTERPRET=1` is set, because the interpreter is ~1000x slower than the reference.
Triton itself is optional (it ships with CUDA builds of torch and in the `dev` extra).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

try:  # optional: CPU-only installs may not have it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

HAS_TRITON = triton is not None


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_unavailable_reason(device: torch.device | str) -> str | None:
    """None when Triton kernels can run on `device`, else a sentence saying why not."""
    device = torch.device(device)
    if not HAS_TRITON:
        return "the `triton` package is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        if interpreter_enabled():
            return None
        return "Triton on CPU needs TRITON_INTERPRET=1 (the interpreter; slow, meant for tests)"
    return f"Triton kernels do not run on {device.type} tensors"


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@contextlib.contextmanager
def _interpretable_stdlib() -> Iterator[None]:
    """Make triton.language's own @jit helpers (tl.sum, tl.sigmoid, ...) callable by the interpreter.

    Those helpers were decorated when triton was imported; without TRITON_INTERPRET=1 at that
    moment they are compiled-mode `JITFunction`s, which refuse to be called from interpreted code.
    For the duration of an interpreted launch they are swapped for `InterpretedFunction`s of the
    same Python bodies -- exactly what `@triton.jit` would have built under the interpreter.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    saved = []
    for name, module in list(sys.modules.items()):
        if module is None or not name.startswith("triton.language"):
            continue
        for attr, value in list(vars(module).items()):
            if isinstance(value, JITFunction):
                saved.append((module, attr, value))
                setattr(module, attr, _INTERPRETED.setdefault(value.fn, InterpretedFunction(value.fn)))
    try:
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)


_INTERPRETED: dict[Callable, Any] = {}


class TritonKernel:
    """A Triton kernel body that is jitted for CUDA or interpreted for CPU at launch time.

    Usage mirrors `@triton.jit`: `kernel[grid](*args, **constexprs)`. Kernel bodies must not call
    other jitted functions (the callee would be bound to one mode); keep them self-contained.
    """

    def __init__(self, fn: Callable):
        self.fn = fn
        self._compiled: Any = None
        self._interpreted: Any = None

    def _for(self, device: torch.device):
        reason = triton_unavailable_reason(device)
        if reason is not None:
            raise RuntimeError(f"cannot launch Triton kernel {self.fn.__name__}: {reason}")
        if device.type == "cuda":
            if self._compiled is None:
                self._compiled = triton.jit(self.fn)
            return self._compiled
        if self._interpreted is None:
            from triton.runtime.interpreter import InterpretedFunction

            self._interpreted = InterpretedFunction(self.fn)
        return self._interpreted

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            device = next(a.device for a in args if isinstance(a, torch.Tensor))
            kernel = self._for(device)
            if device.type == "cuda":
                return kernel[grid](*args, **kwargs)
            with _interpretable_stdlib():
                return kernel[grid](*args, **kwargs)

        return launch


def triton_kernel(fn: Callable) -> TritonKernel:
    """Decorator: `@triton_kernel` in place of `@triton.jit` (see module docstring)."""
    return TritonKernel(fn)
