import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from megaqwen.kernels.cross_entropy import linear_cross_entropy_chunked, linear_cross_entropy_ref

N, H, V = 37, 24, 301  # tokens, width, vocabulary: none a power of two


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g).to(dtype).requires_grad_()
    weight = torch.randn(V, H, generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = -100  # ignored positions (document ends, padding)
    return hidden, weight, labels


def _loss_and_grads(fn, hidden, weight, labels, reduction, **kw):
    hidden.grad = weight.grad = None
    loss = fn(hidden, weight, labels, reduction=reduction, **kw)
    upstream = torch.linspace(0.5, 1.5, loss.numel()).view(loss.shape)  # non-uniform for "none"
    (loss * upstream).sum().backward()
    return loss.detach(), hidden.grad.clone(), weight.grad.clone()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_matches_reference(dtype, reduction, z_loss, backend, assert_close):
    hidden, weight, labels = _inputs(dtype)
    got = _loss_and_grads(linear_cross_entropy_chunked, hidden, weight, labels, reduction,
                          z_loss=z_loss, chunk_rows=8, backend=backend)
    want = _loss_and_grads(linear_cross_entropy_ref, hidden, weight, labels, reduction, z_loss=z_loss)
    assert got[0].dtype == torch.float32
    for name, a, b in zip(("loss", "dhidden", "dweight"), got, want):
        assert_close(a, b, dtype, name)


def test_z_loss_reference_adds_lse_squared():
    hidden, weight, labels = _inputs(torch.float32)
    logits = hidden @ weight.t()
    valid = labels != -100
    lse = torch.logsumexp(logits, -1)
    want = (torch.nn.functional.cross_entropy(logits, labels, reduction="none") + 0.1 * lse**2)[valid].mean()
    got = linear_cross_entropy_ref(hidden, weight, labels, z_loss=0.1)
    torch.testing.assert_close(got, want)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor (in bytes) that any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_chunked_never_materialises_full_logits(backend):
    n = 200
    hidden = torch.randn(n, H, requires_grad=True)
    weight = torch.randn(V, H, requires_grad=True)
    labels = torch.randint(0, V, (n,))
    with _LargestTensor() as rec:
        loss = linear_cross_entropy_chunked(hidden, weight, labels, chunk_rows=8, backend=backend)
        loss.backward()
    # fp32 bytes: one (8, V) chunk of logits, or the (V, H) weight gradient -- never (N, V)
    assert rec.largest <= 4 * max(8 * V, V * H), f"largest tensor {rec.largest} bytes"
    with _LargestTensor() as rec_ref:
        linear_cross_entropy_ref(hidden, weight, labels).backward()
    assert rec_ref.largest >= 4 * n * V  # the reference does hold (N, V) logits


def test_all_ignored_gives_zero_loss_and_grads():
    hidden, weight, labels = _inputs(torch.float32)
    labels[:] = -100
    loss = linear_cross_entropy_chunked(hidden, weight, labels, chunk_rows=8)
    loss.backward()
    assert loss.item() == 0.0
    assert hidden.grad.abs().max().item() == 0.0 and weight.grad.abs().max().item() == 0.0


def test_bad_inputs_raise():
    hidden, weight, labels = _inputs(torch.float32)
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy_chunked(hidden, weight, labels[:-1])
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy_chunked(hidden, weight, labels, reduction="avg")
    with pytest.raises(ValueError, match="backend"):
        linear_cross_entropy_chunked(hidden, weight, labels, backend="cuda")
    with pytest.raises(ValueError, match="chunk_rows must be >= 1, got -8"):
        linear_cross_entropy_chunked(hidden, weight, labels, chunk_rows=-8)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunked_under_no_grad_matches_reference(reduction):
    """Evaluation path (no autograd): the loss alone, equal to the reference."""
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(37, 24, generator=g, requires_grad=True)
    weight = torch.randn(301, 24, generator=g, requires_grad=True)
    labels = torch.randint(0, 301, (37,), generator=g)
    labels[::5] = -100
    with torch.no_grad():
        got = linear_cross_entropy_chunked(hidden, weight, labels, reduction=reduction, chunk_rows=8)
        ref = linear_cross_entropy_ref(hidden, weight, labels, reduction=reduction)
    assert not got.requires_grad
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_default_chunk_rows_bounds_the_logits_buffer():
    from megaqwen.kernels.cross_entropy import CHUNK_LOGITS_BYTES, default_chunk_rows

    rows = default_chunk_rows(8192, 896, 151_936)
    assert rows * 151_936 * 4 <= CHUNK_LOGITS_BYTES < (rows + 1) * 151_936 * 4
    assert default_chunk_rows(5, 896, 151_936) == 5  # never more rows than tokens
    assert default_chunk_rows(100, 8, 10**9) == 1
