import pytest
import torch

from megaqwen.kernels.rmsnorm import (
    rms_norm_ref,
    rms_norm_residual_ref,
    rms_norm_residual_triton,
    rms_norm_triton,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(9, 7, 41), (5, 100)]  # odd rows, hidden sizes that are not powers of two


def _inputs(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype).requires_grad_()
    return x, w


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_matches_reference(shape, dtype, assert_close):
    x, w = _inputs(shape, dtype)
    dy = torch.randn(shape).to(dtype)
    y = rms_norm_triton(x, w, 1e-6)
    y.backward(dy)
    dx, dw = x.grad, w.grad
    x.grad = w.grad = None
    y_ref = rms_norm_ref(x, w, 1e-6)
    y_ref.backward(dy)
    assert y.dtype == y_ref.dtype
    assert_close(y, y_ref, dtype, "y")
    assert_close(dx, x.grad, dtype, "dx")
    assert_close(dw, w.grad, dtype, "dweight (reduced over rows)")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rmsnorm_fused_residual_matches_reference(dtype, assert_close):
    x, w = _inputs((9, 7, 41), dtype)
    res = torch.randn(9, 7, 41).to(dtype).requires_grad_()
    dy, dh = torch.randn(9, 7, 41).to(dtype), torch.randn(9, 7, 41).to(dtype)
    y, h = rms_norm_residual_triton(x, res, w, 1e-5)
    torch.autograd.backward([y, h], [dy, dh])
    grads = (x.grad, res.grad, w.grad)
    x.grad = res.grad = w.grad = None
    y_ref, h_ref = rms_norm_residual_ref(x, res, w, 1e-5)
    torch.autograd.backward([y_ref, h_ref], [dy, dh])
    assert_close(y, y_ref, dtype, "y")
    assert_close(h, h_ref, dtype, "h = x + residual")
    for name, got, want in zip(("dx", "dresidual", "dweight"), grads, (x.grad, res.grad, w.grad)):
        assert_close(got, want, dtype, name)


def test_rmsnorm_triton_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    x, w = _inputs((3, 8), torch.float32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        rms_norm_triton(x, w, 1e-6)
