"""Kernel tests run the Triton kernels on CPU through Triton's interpreter.

`megaqwen.kernels._triton.TritonKernel` reads TRITON_INTERPRET when a kernel is launched (not when
triton or our modules are imported), so setting it per test works whatever the session imported
before, and does not leak into other test directories.
"""

import pytest
import torch

# Relative tolerance per dtype: max |actual - expected| / max |expected|.
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


@pytest.fixture(autouse=True)
def _triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.detach().float(), expected.detach().float()
    return ((a - e).abs().max() / e.abs().max().clamp(min=1e-12)).item()


@pytest.fixture
def assert_close():
    def check(actual, expected, dtype, what=""):
        assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
        err = rel_err(actual, expected)
        assert err <= RTOL[dtype], f"{what}: relative error {err:.3g} > {RTOL[dtype]} ({dtype})"

    return check
