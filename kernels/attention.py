"""Causal self-attention, with optional per-document masking for packed sequences.

Layout (B, T, H, D) in and out. Only the PyTorch SDPA path lives here for now; it handles GQA by
repeating KV heads and packed documents with an explicit block-diagonal causal mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def document_causal_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """document_ids (B, T) -> bool mask (B, 1, T, T): True where query i may attend key j."""
    t = document_ids.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=document_ids.device).tril()
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]
    return (same_doc & causal)[:, None]


def sdpa_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    document_ids: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """q (B, T, Hq, D), k/v (B, T, Hk, D) -> (B, T, Hq, D)."""
    groups = q.shape[2] // k.shape[2]
    q_, k_, v_ = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    if groups > 1:
        k_ = k_.repeat_interleave(groups, dim=1)
        v_ = v_.repeat_interleave(groups, dim=1)
    if document_ids is None:
        out = F.scaled_dot_product_attention(q_, k_, v_, is_causal=True, scale=scale)
    else:
        mask = document_causal_mask(document_ids)
        out = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)
