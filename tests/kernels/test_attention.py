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
