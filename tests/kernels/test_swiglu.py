import pytest
import torch

from megaqwen.kernels.swiglu import swiglu_fused_ref, swiglu_fused_triton, swiglu_ref, swiglu_triton

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("shape", [(9, 7, 41), (3, 1100)])  # 1100 > one 1024-wide column block
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_matches_reference(shape, dtype, assert_close):
    g = torch.Generator().manual_seed(0)
    gate = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    up = torch.randn(shape, generator=g).to(dtype).requires_grad_()
    dy = torch.randn(shape, generator=g).to(dtype)
    y = swiglu_triton(gate, up)
    y.backward(dy)
    dgate, dup = gate.grad, up.grad
    gate.grad = up.grad = None
    y_ref = swiglu_ref(gate, up)
    y_ref.backward(dy)
    assert_close(y, y_ref, dtype, "y")
    assert_close(dgate, gate.grad, dtype, "dgate")
    assert_close(dup, up.grad, dtype, "dup")


@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_fused_gate_up_matches_reference(dtype, assert_close):
    g = torch.Generator().manual_seed(1)
    gate_up = torch.randn(9, 7, 2 * 41, generator=g).to(dtype).requires_grad_()  # [gate | up]
    dy = torch.randn(9, 7, 41, generator=g).to(dtype)
    y = swiglu_fused_triton(gate_up)
    y.backward(dy)
    dgu = gate_up.grad
    gate_up.grad = None
    y_ref = swiglu_fused_ref(gate_up)
    y_ref.backward(dy)
    assert_close(y, y_ref, dtype, "y")
    assert_close(dgu, gate_up.grad, dtype, "dgate_up")


def test_swiglu_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="must match"):
        swiglu_triton(torch.randn(2, 3), torch.randn(2, 4))
    with pytest.raises(ValueError, match="must be even"):
        swiglu_fused_triton(torch.randn(2, 5))
