import pytest
import torch

from megaqwen.kernels.rope import (
    apply_rope_ref,
    apply_rope_triton,
    rope_cos_sin,
    rope_inv_freq,
    yarn_inv_freq,
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Packed rows: positions restart at 0 at each document boundary.
POSITIONS = torch.tensor([[0, 1, 2, 0, 1, 0, 1], [0, 1, 2, 3, 4, 5, 6], [5, 6, 7, 8, 9, 10, 11]])


def _run(q0, k0, cos, sin, fn):
    # non-leaf inputs (as in the model, where q/k are projection outputs) so in-place is legal
    q, k = fn(q0 * 1, k0 * 1, cos, sin)
    return q, k


@pytest.mark.parametrize("yarn", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_matches_reference(dtype, yarn, assert_close):
    b, t, hq, hk, d = 3, 7, 5, 1, 26  # GQA, head_dim/2 = 13 not a power of two
    if yarn:
        inv_freq, scale = yarn_inv_freq(d, 10_000.0, factor=4.0, original_max_position=64)
    else:
        inv_freq, scale = rope_inv_freq(d, 10_000.0), 1.0
    cos, sin = rope_cos_sin(POSITIONS, inv_freq, scale)
    g = torch.Generator().manual_seed(0)
    q0 = torch.randn(b, t, hq, d, generator=g).to(dtype).requires_grad_()
    k0 = torch.randn(b, t, hk, d, generator=g).to(dtype).requires_grad_()
    dq, dk = torch.randn(b, t, hq, d).to(dtype), torch.randn(b, t, hk, d).to(dtype)
    q, k = _run(q0, k0, cos, sin, apply_rope_triton)
    torch.autograd.backward([q, k], [dq, dk])
    grads = (q0.grad, k0.grad)
    q0.grad = k0.grad = None
    q_ref, k_ref = _run(q0, k0, cos, sin, apply_rope_ref)
    torch.autograd.backward([q_ref, k_ref], [dq, dk])
    assert not torch.allclose(q_ref, q0)  # the rotation is not the identity here
    assert_close(q, q_ref, dtype, "q")
    assert_close(k, k_ref, dtype, "k")
    assert_close(grads[0], q0.grad, dtype, "dq")
    assert_close(grads[1], k0.grad, dtype, "dk")


@pytest.mark.parametrize("layout", ["fused-qkv-views", "head-dim-strided"])
def test_rope_non_contiguous_inputs_match_reference(layout, assert_close):
    """q/k as the model can hand them over: views of one fused projection (unit stride on D, row
    strides of the whole qkv row), or tensors without unit stride on D (copied, then rotated)."""
    b, t, hq, hk, d = 3, 7, 3, 1, 10
    cos, sin = rope_cos_sin(POSITIONS, rope_inv_freq(d, 10_000.0))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, t, 11, generator=g, requires_grad=True)
    w = torch.randn(11, (hq + 2 * hk) * d, generator=g, requires_grad=True)

    def run(fn):
        if layout == "fused-qkv-views":
            qkv = x @ w  # (B, T, (Hq + 2 Hk) D)
            q = qkv[..., : hq * d].view(b, t, hq, d)
            k = qkv[..., hq * d : (hq + hk) * d].view(b, t, hk, d)
            v = qkv[..., (hq + hk) * d :].view(b, t, hk, d)
        else:
            qkv = (x @ w).view(b, t, hq + 2 * hk, d).transpose(-1, -2).contiguous().transpose(-1, -2)
            q, k, v = qkv[:, :, :hq], qkv[:, :, hq : hq + hk], qkv[:, :, hq + hk :]
            assert q.stride(-1) != 1
        q, k = fn(q, k, cos, sin)
        out = (q * q.flip(-1)).sum() + (k * v).sum() + q.sum(2, keepdim=True).mul(k).sum()
        return (q, k, *torch.autograd.grad(out, (x, w)))

    got, want = run(apply_rope_triton), run(apply_rope_ref)
    for name, a, e in zip(("q", "k", "dx", "dw"), got, want):
        assert_close(a, e, torch.float32, name)


def test_rope_triton_is_in_place():
    cos, sin = rope_cos_sin(POSITIONS[:1], rope_inv_freq(8, 10_000.0))
    q, k = torch.randn(1, 7, 2, 8), torch.randn(1, 7, 1, 8)
    q_ref, k_ref = apply_rope_ref(q, k, cos, sin)
    q_out, k_out = apply_rope_triton(q, k, cos, sin)
    assert q_out.data_ptr() == q.data_ptr() and k_out.data_ptr() == k.data_ptr()
    torch.testing.assert_close(q, q_ref)
    torch.testing.assert_close(k, k_ref)


def test_rope_rejects_bad_shapes():
    cos, sin = rope_cos_sin(POSITIONS, rope_inv_freq(8, 10_000.0))
    with pytest.raises(ValueError, match="cos/sin"):
        apply_rope_triton(torch.randn(3, 6, 2, 8), torch.randn(3, 6, 1, 8), cos, sin)


def test_yarn_inv_freq_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.Qwen2Config(hidden_size=256, num_attention_heads=4, rope_theta=1e6,
                                   max_position_embeddings=4 * 4096)
    params = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096,
              "rope_theta": 1e6}
    cfg.rope_parameters = params
    want, want_scale = ROPE_INIT_FUNCTIONS["yarn"](cfg, "cpu")
    got, got_scale = yarn_inv_freq(64, 1e6, factor=4.0, original_max_position=4096)
    torch.testing.assert_close(got, want.float(), rtol=1e-6, atol=0)
    assert got_scale == pytest.approx(want_scale)
