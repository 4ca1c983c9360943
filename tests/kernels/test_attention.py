import pytest
import torch

from megaqwen.kernels import attention
from megaqwen.kernels.attention import (
    AttentionMeta,
    as_attention_meta,
    document_ids_to_cu_seqlens,
    flash_attention,
    sdpa_attention,
    te_attention,
    varlen_attention,
    varlen_attention_torch,
)

HQ, HK, D = 4, 2, 12  # GQA: two query heads per KV head
LENS = (5, 3, 9)  # three documents, packed into one row of 17 tokens


def _docs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [tuple(torch.randn(1, n, h, D, generator=g) for h in (HQ, HK, HK)) for n in LENS]


def _packed(docs):
    q, k, v = (torch.cat([d[i] for d in docs], dim=1) for i in range(3))
    ids = torch.cat([torch.full((n,), i) for i, n in enumerate(LENS)])[None]  # (1, T)
    return q, k, v, ids


def test_cu_seqlens_from_document_ids():
    ids = torch.tensor([[0, 0, 1, 1, 1, 2], [2, 2, 2, 3, 3, 3], [7, 7, 7, 7, 7, 7]])
    cu, max_len = document_ids_to_cu_seqlens(ids)
    # row 1 reuses id 2 from row 0: rows never merge, so a new segment starts at flat index 6
    assert cu.tolist() == [0, 2, 5, 6, 9, 12, 18]
    assert cu.dtype == torch.int32 and max_len == 6
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        document_ids_to_cu_seqlens(torch.zeros(6))


def test_attention_meta_derives_each_view_once_per_batch():
    ids = torch.tensor([[0, 0, 1, 1, 1, 2]])
    meta = AttentionMeta(ids)
    cu, max_len = meta.varlen()
    assert meta.varlen()[0] is cu  # every layer of a forward shares one computation
    assert cu.tolist() == [0, 2, 5, 6] and max_len == 3
    assert meta.dense_mask() is meta.dense_mask()
    torch.testing.assert_close(meta.dense_mask(), attention.document_causal_mask(ids))
    assert as_attention_meta(meta) is meta and as_attention_meta(None) is None
    assert as_attention_meta(ids).document_ids is ids
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        AttentionMeta(torch.zeros(6))


@pytest.mark.parametrize("path", ["sdpa-mask", "varlen"])
def test_packed_documents_equal_separate_runs(path):
    docs = _docs()
    q, k, v, ids = _packed(docs)
    if path == "sdpa-mask":
        out = sdpa_attention(q, k, v, attn=ids, scale=D**-0.5)
    else:
        out = varlen_attention(q, k, v, ids, D**-0.5, varlen_attention_torch)
    separate = torch.cat([sdpa_attention(*d, scale=D**-0.5) for d in docs], dim=1)
    torch.testing.assert_close(out, separate, rtol=1e-5, atol=1e-6)
    # and without the document mask the later documents would see earlier ones
    assert not torch.allclose(sdpa_attention(q, k, v, scale=D**-0.5), separate, atol=1e-3)


def test_packed_gradients_equal_separate_runs():
    docs = [tuple(t.requires_grad_() for t in d) for d in _docs(1)]
    q, k, v, ids = _packed(docs)
    dout = torch.randn(q.shape)
    sdpa_attention(q, k, v, attn=ids).backward(dout)
    got = [t.grad.clone() for d in docs for t in d]
    for d in docs:
        for t in d:
            t.grad = None
    torch.cat([sdpa_attention(*d) for d in docs], dim=1).backward(dout)
    for a, b in zip(got, [t.grad for d in docs for t in d]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_vendor_backends_fall_back_to_sdpa_on_cpu(caplog):
    attention._log_once.cache_clear()  # the fallback is logged once per process
    q, k, v, ids = _packed(_docs())
    want = sdpa_attention(q, k, v, attn=ids)
    with caplog.at_level("WARNING"):
        for fn in (flash_attention, te_attention):
            torch.testing.assert_close(fn(q, k, v, attn=ids), want)
    assert "using sdpa" in caplog.text


def _cuda_docs():
    return [tuple(t.cuda().bfloat16() for t in d) for d in _docs()]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [flash_attention, te_attention])
def test_vendor_backend_packed_matches_sdpa_gpu(backend):
    pytest.importorskip("flash_attn" if backend is flash_attention else "transformer_engine",
                        reason="vendor attention package not installed")
    docs = _cuda_docs()
    q, k, v, ids = _packed(docs)
    ids = ids.cuda()
    want = sdpa_attention(q, k, v, attn=ids)
    torch.testing.assert_close(backend(q, k, v, attn=ids), want, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(backend(q, k, v), sdpa_attention(q, k, v), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_per_document_path_equals_dense_mask(monkeypatch, dtype):
    """Past DENSE_MASK_MAX_T, sdpa_attention runs one SDPA per document (memory O(T)); outputs and
    q/k/v gradients equal the one-call dense-mask reference. Rows of 41 tokens, documents of odd
    lengths (single tokens included), ids reused across rows."""
    monkeypatch.setattr(attention, "DENSE_MASK_MAX_T", 8)
    ids = torch.tensor([[0] * 9 + [1] + [2] * 20 + [3] * 11, [3] * 30 + [4] * 1 + [5] * 10])
    g = torch.Generator().manual_seed(3)
    q0, k0, v0 = (torch.randn(2, 41, h, D, generator=g).to(dtype) for h in (HQ, HK, HK))
    dout = torch.randn(2, 41, HQ, D, generator=g).to(dtype)

    def run(fn):
        q, k, v = (t.clone().requires_grad_() for t in (q0, k0, v0))
        out = fn(q, k, v, AttentionMeta(ids), D**-0.5)
        out.backward(dout)
        return out, q.grad, k.grad, v.grad

    got, want = run(sdpa_attention), run(attention.sdpa_dense)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(a, b, **tol, msg=name)
    # the reference itself is not plain causal attention (documents are masked)
    assert not torch.allclose(attention.sdpa_dense(q0, k0, v0, None, D**-0.5), want[0], atol=1e-2)


def test_sdpa_takes_the_per_document_path_past_the_threshold(monkeypatch):
    """No (B, 1, T, T) mask is built for long packed rows."""
    t = attention.DENSE_MASK_MAX_T + 1
    ids = (torch.arange(t) * 3 // t)[None]
    meta = AttentionMeta(ids)
    monkeypatch.setattr(AttentionMeta, "dense_mask", lambda self: pytest.fail("dense mask built"))
    q, k, v = torch.randn(1, t, HQ, D), torch.randn(1, t, HK, D), torch.randn(1, t, HK, D)
    assert sdpa_attention(q, k, v, meta).shape == q.shape
