"""Causal self-attention backends, with optional per-document masking for packed sequences.

Layout (B, T, H, D) in and out; k/v may have fewer heads than q (GQA). All backends share the call
`(q, k, v, attn=None, scale=None)`; `attn` is the batch's `AttentionMeta` (or its document ids
(B, T)) for packed documents, and a token attends only to earlier tokens of its own document (a new
document also starts every row); None is plain causal attention.

- `sdpa_attention`: PyTorch SDPA, memory O(T) at any length: plain causal attention runs SDPA's
  flash kernel (CPU too: 260 MB peak for fwd+bwd at T=16K, where a T x T fp32 score matrix alone
  is 4 GB per head), packed documents one SDPA call per document (`varlen_attention_torch`). Rows of
  at most `DENSE_MASK_MAX_T` tokens use one call with the (B, 1, T, T) mask instead: faster there.
- `flash_attention`: flash-attn 2 (`flash_attn_func`, or `flash_attn_varlen_func` over `cu_seqlens`
  when documents are packed, so no mask is ever built).
- `te_attention`: Transformer Engine `DotProductAttention` (bshd causal, or thd + cu_seqlens).
- `varlen_attention_torch`: a per-document SDPA loop with flash-attn's varlen signature: SDPA's
  packed-document path past DENSE_MASK_MAX_T, and the reference the varlen plumbing is tested
  against on CPU.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """document_ids (B, T) -> bool mask (B, 1, T, T): True where query i may attend key j."""
    t = document_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=document_ids.device).tril()
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]
    return (same_doc & causal)[:, None]


def document_ids_to_cu_seqlens(document_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """document_ids (B, T) -> cu_seqlens (S + 1,) int32 over the flattened B*T tokens, max_seqlen.

    A segment starts at every row start and wherever the id changes from the previous token, so
    segments never cross rows even when two rows reuse an id. Non-contiguous repeats of an id
    within a row count as separate documents (packing never produces them). Costs two host syncs
    (nonzero, .item()): build it once per batch through `AttentionMeta`, not once per layer.
    """
    if document_ids.dim() != 2:
        raise ValueError(f"document_ids must be (B, T), got shape {tuple(document_ids.shape)}")
    b, t = document_ids.shape
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    start_idx = starts.flatten().nonzero().squeeze(1)  # (S,) flat token index of each start
    total = torch.tensor([b * t], device=document_ids.device, dtype=start_idx.dtype)
    cu_seqlens = torch.cat([start_idx, total]).to(torch.int32)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())
    return cu_seqlens, max_seqlen


class AttentionMeta:
    """Per-batch attention metadata, built once by the model's forward and handed to every layer.

    Holds the packed documents' ids (B, T) and derives, on first use and only then, what a backend
    needs: `cu_seqlens`/`max_seqlen` for varlen kernels, the dense (B, 1, T, T) mask for SDPA. Each
    derived value is computed once per batch however many layers ask for it; nothing is cached
    beyond the batch's lifetime.
    """

    def __init__(self, document_ids: torch.Tensor):
        if document_ids.dim() != 2:
            raise ValueError(f"document_ids must be (B, T), got shape {tuple(document_ids.shape)}")
        self.document_ids = document_ids
        self._varlen: tuple[torch.Tensor, int] | None = None
        self._mask: torch.Tensor | None = None

    def varlen(self) -> tuple[torch.Tensor, int]:
        """(cu_seqlens (S + 1,) int32 over the flattened B*T tokens, max_seqlen)."""
        if self._varlen is None:
            self._varlen = document_ids_to_cu_seqlens(self.document_ids)
        return self._varlen

    def dense_mask(self) -> torch.Tensor:
        """bool (B, 1, T, T): True where query i may attend key j (O(T^2) memory)."""
        if self._mask is None:
            self._mask = document_causal_mask(self.document_ids)
        return self._mask


def as_attention_meta(attn: AttentionMeta | torch.Tensor | None) -> AttentionMeta | None:
    """Backends accept the per-batch `AttentionMeta`, raw document ids (B, T), or None (causal)."""
    if attn is None or isinstance(attn, AttentionMeta):
        return attn
    return AttentionMeta(attn)


def _repeat_kv(k_: torch.Tensor, v_: torch.Tensor, groups: int, dim: int):
    if groups == 1:
        return k_, v_
    return k_.repeat_interleave(groups, dim=dim), v_.repeat_interleave(groups, dim=dim)


# Packed rows up to this length use one SDPA call with the dense (B, 1, T, T) mask, longer ones one
# call per document. fwd+bwd on CPU, 1 thread, Hq 4, Hk 2, D 16 (dense mask / per document):
# T=128, 8 rows x 6 docs 15 / 90 ms; T=512, 4 x 5 docs 55 / 43 ms; T=2048, 2 x 20 docs 776 / 208 ms;
# T=8192, 40 docs 3.2 / 0.24 s. The mask here is at most 64K booleans per row.
DENSE_MASK_MAX_T = 256


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn: AttentionMeta | torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """q (B, T, Hq, D), k/v (B, T, Hk, D) -> (B, T, Hq, D); memory O(T) past DENSE_MASK_MAX_T."""
    attn = as_attention_meta(attn)
    if attn is not None and q.shape[1] > DENSE_MASK_MAX_T:
        return varlen_attention(q, k, v, attn, scale, varlen_attention_torch)
    return sdpa_dense(q, k, v, attn, scale)


def sdpa_dense(q, k, v, attn: AttentionMeta | None = None, scale: float | None = None):
    """One SDPA call: causal, or packed documents through the dense (B, 1, T, T) mask (O(T^2)); the
    reference the per-document path is tested against."""
    attn = as_attention_meta(attn)
    groups = q.shape[2] // k.shape[2]
    q_, k_, v_ = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    k_, v_ = _repeat_kv(k_, v_, groups, dim=1)
    if attn is None:
        out = F.scaled_dot_product_attention(q_, k_, v_, is_causal=True, scale=scale)
    else:
        out = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=attn.dense_mask(), scale=scale)
    return out.transpose(1, 2)


def varlen_attention_torch(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           softmax_scale=None, causal=True):
    """flash_attn_varlen_func's contract in plain PyTorch: q (total, Hq, D), k/v (total, Hk, D)."""
    if not causal or not torch.equal(cu_seqlens_q, cu_seqlens_k):
        raise ValueError("varlen_attention_torch supports causal self-attention only")
    bounds = cu_seqlens_q.tolist()
    groups = q.shape[1] // k.shape[1]
    outs = []
    for s, e in zip(bounds[:-1], bounds[1:]):
        # 4-D (1, H, len, D): SDPA takes its flash kernel only for 4-D inputs; 3-D ones go to the
        # math path, which materialises len x len (3.3 GB vs 245 MB peak at len 8K, 4 heads, CPU)
        q_, k_, v_ = (t[None, s:e].transpose(1, 2) for t in (q, k, v))
        k_, v_ = _repeat_kv(k_, v_, groups, dim=1)
        outs.append(F.scaled_dot_product_attention(q_, k_, v_, is_causal=True,
                                                   scale=softmax_scale)[0].transpose(0, 1))
    return torch.cat(outs)


def varlen_attention(q, k, v, attn, scale, varlen_fn: Callable):
    """Packed documents through a flash-attn-style varlen kernel: (B, T, H, D) -> (B, T, Hq, D)."""
    b, t = q.shape[:2]
    cu_seqlens, max_seqlen = as_attention_meta(attn).varlen()
    q_, k_, v_ = (x.reshape(b * t, x.shape[2], x.shape[3]) for x in (q, k, v))  # (B*T, H, D)
    out = varlen_fn(q_, k_, v_, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                    softmax_scale=scale, causal=True)
    return out.view(b, t, q.shape[2], q.shape[3])


@functools.cache
def _log_once(msg: str) -> None:
    log.warning(msg)


_HALF = (torch.float16, torch.bfloat16)


def flash_attention(q, k, v, attn=None, scale=None):
    """flash-attn 2 on CUDA fp16/bf16 tensors; other dtypes fall back to SDPA (logged once)."""
    if q.dtype not in _HALF or not q.is_cuda:
        _log_once(f"attention: flash-attn needs CUDA fp16/bf16 tensors, got {q.device.type} "
                  f"{q.dtype}; using sdpa for these calls")
        return sdpa_attention(q, k, v, attn, scale)
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    if attn is None:
        return flash_attn_func(q, k, v, softmax_scale=scale, causal=True)
    return varlen_attention(q, k, v, attn, scale, flash_attn_varlen_func)


@functools.lru_cache(maxsize=32)
def _te_attention_module(hq: int, hk: int, d: int, scale: float | None, qkv_format: str,
                         mask_type: str):
    import transformer_engine.pytorch as te

    return te.DotProductAttention(hq, d, num_gqa_groups=hk, attention_dropout=0.0,
                                  qkv_format=qkv_format, attn_mask_type=mask_type,
                                  softmax_scale=scale)


def te_attention(q, k, v, attn=None, scale=None):
    """Transformer Engine DotProductAttention (picks cuDNN / flash / unfused internally)."""
    if q.dtype not in _HALF or not q.is_cuda:
        _log_once(f"attention: Transformer Engine needs CUDA fp16/bf16 tensors, got "
                  f"{q.device.type} {q.dtype}; using sdpa for these calls")
        return sdpa_attention(q, k, v, attn, scale)
    b, t, hq, d = q.shape
    hk = k.shape[2]
    if attn is None:
        module = _te_attention_module(hq, hk, d, scale, "bshd", "causal")
        return module(q, k, v).view(b, t, hq, d)
    cu_seqlens, max_seqlen = as_attention_meta(attn).varlen()
    module = _te_attention_module(hq, hk, d, scale, "thd", "padding_causal")
    q_, k_, v_ = (x.reshape(b * t, x.shape[2], d) for x in (q, k, v))  # (B*T, H, D)
    out = module(q_, k_, v_, cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                 max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)
    return out.view(b, t, hq, d)
