"""Dual Chunk Attention (DCA; An et al. 2024, "Training-Free Long-Context Scaling of Large Language
Models"): inference past the trained context without retraining, by keeping every query-key relative
position below the trained window.

Terms (HF/vLLM `dual_chunk_attention_config` names): `chunk_size` c is the window relative positions
stay below (at most the trained length), `local_size` w the local window, and the sequence is cut
into chunks of s = c - w tokens. Token t sits in chunk t // s at offset o = t % s; keys are rotated
at their offset. A query at offset o sees
- its own chunk (intra-chunk) from position o: relative position i - j, exactly as plain RoPE;
- the previous chunk (successive-chunk) from position min(s + o, c - 1): the true distance for the
  first w queries of a chunk, so neighbours across a chunk border keep their locality;
- every earlier chunk (inter-chunk) from position c - 1: relative positions in [w, c - 1].
The three partial attentions are merged by log-sum-exp (one softmax over all keys). The paper caps
positions at c - 1 (every relative position seen in training); vLLM's Qwen2.5-1M kernel uses c, one
more. We follow the paper.

How the model runs it: `dca_ops(ops)` swaps the RoPE and attention ops; the model's `rope()` then
returns `dca_rope` tables (B, T, 4, D) [q intra, q successive, q inter, k], `dca_apply_rope` rotates
q three ways into (B, T, 3, Hq, D), and `dca_attention` attends chunk by chunk, memory O(s^2) per
chunk pair. Unpacked sequences from position 0 only (inference), no sequence shards.

`dca_relative_positions` and `dca_attention_ref` (explicit per-pair relative positions, O(T^2 D))
are the plain-PyTorch reference.
"""

from __future__ import annotations

import dataclasses

import torch

from megaqwen.kernels.registry import KernelOps
from megaqwen.kernels.rope import rope_cos_sin, rotate_half


def _check_sizes(chunk_size: int, local_size: int) -> int:
    if not 0 < local_size < chunk_size:
        raise ValueError(f"DCA needs 0 < local_size ({local_size}) < chunk_size ({chunk_size})")
    return chunk_size - local_size


def dca_positions(t: int, chunk_size: int, local_size: int,
                  device: torch.device | None = None) -> torch.Tensor:
    """(4, T) int64 position ids of tokens 0..T-1: [q intra, q successive, q inter, k]."""
    s = _check_sizes(chunk_size, local_size)
    offset = torch.arange(t, device=device) % s
    succ = (offset + s).clamp(max=chunk_size - 1)
    inter = torch.full_like(offset, chunk_size - 1)
    return torch.stack([offset, succ, inter, offset])


def dca_rope(position_ids: torch.Tensor, inv_freq: torch.Tensor, scale: float, chunk_size: int,
             local_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids (B, T), which must be 0..T-1 in every row -> cos, sin (B, T, 4, D) fp32."""
    b, t = position_ids.shape
    if not torch.equal(position_ids, torch.arange(t, device=position_ids.device).expand(b, t)):
        raise ValueError("Dual Chunk Attention needs position ids 0..T-1 in every row (unpacked "
                         "sequences, no sequence shards); it is an inference-time method")
    pos = dca_positions(t, chunk_size, local_size, position_ids.device).t()  # (T, 4)
    cos, sin = rope_cos_sin(pos[None], inv_freq, scale)  # (1, T, 4, D)
    return cos.expand(b, -1, -1, -1), sin.expand(b, -1, -1, -1)


def dca_apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q (B, T, Hq, D), k (B, T, Hk, D), tables (B, T, 4, D) -> q (B, T, 3, Hq, D) rotated at the
    intra/successive/inter positions, k (B, T, Hk, D) rotated at its chunk offset."""
    if cos.dim() != 4 or cos.shape[2] != 4:
        raise ValueError(f"dca_apply_rope needs DCA tables (B, T, 4, D), got {tuple(cos.shape)}: "
                         "set model.dca_chunk_size / dca_local_size")
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    q_ = q[:, :, None]  # (B, T, 1, Hq, D)
    q3 = q_ * cos[:, :, :3, None] + rotate_half(q_) * sin[:, :, :3, None]
    k_ = k * cos[:, :, 3:] + rotate_half(k) * sin[:, :, 3:]
    return q3, k_


def _attend(q, k, v, scale, causal):
    """q (B, H, Tq, D), k/v (B, H, Tk, D) -> out (B, H, Tq, D), lse (B, H, Tq, 1), fp32 softmax."""
    scores = (q @ k.transpose(-1, -2)).float() * scale
    if causal:
        tq, tk = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(tq, tk, dtype=torch.bool, device=q.device)
                                    .triu(1 + tk - tq), float("-inf"))
    lse = scores.logsumexp(-1, keepdim=True)
    return (scores - lse).exp().to(v.dtype) @ v, lse


def merge_lse(out_a, lse_a, out_b, lse_b):
    """Two partial attentions over disjoint key sets -> the attention over their union."""
    lse = torch.logaddexp(lse_a, lse_b)
    return (out_a * (lse_a - lse).exp() + out_b * (lse_b - lse).exp()).to(out_a.dtype), lse


def dca_attention(q3, k, v, attn=None, scale=None, *, chunk_size: int, local_size: int):
    """q3 (B, T, 3, Hq, D) from `dca_apply_rope`, k/v (B, T, Hk, D) -> (B, T, Hq, D)."""
    if attn is not None:
        raise ValueError("Dual Chunk Attention does not support packed documents (document_ids)")
    s = _check_sizes(chunk_size, local_size)
    b, t, _, hq, d = q3.shape
    groups = hq // k.shape[2]
    scale = d**-0.5 if scale is None else scale
    q3 = q3.permute(2, 0, 3, 1, 4)  # (3, B, Hq, T, D)
    k_, v_ = (x.transpose(1, 2).repeat_interleave(groups, dim=1) for x in (k, v))  # (B, Hq, T, D)
    out = torch.empty(b, hq, t, d, dtype=v.dtype, device=v.device)
    for n, qs in enumerate(range(0, t, s)):
        qe = min(qs + s, t)
        acc = _attend(q3[0, :, :, qs:qe], k_[:, :, qs:qe], v_[:, :, qs:qe], scale, causal=True)
        for m in range(n):  # earlier chunks: n - 1 successive, the rest inter-chunk
            which = 1 if m == n - 1 else 2
            part = _attend(q3[which, :, :, qs:qe], k_[:, :, m * s:(m + 1) * s],
                           v_[:, :, m * s:(m + 1) * s], scale, causal=False)
            acc = merge_lse(*acc, *part)
        out[:, :, qs:qe] = acc[0]
    return out.transpose(1, 2)


def dca_ops(ops: KernelOps, chunk_size: int, local_size: int) -> KernelOps:
    """`ops` with DCA's RoPE and attention; the model must carry the same `dca_chunk_size` and
    `dca_local_size` (its `rope()` builds the tables)."""
    _check_sizes(chunk_size, local_size)

    def attention(q3, k, v, attn=None, scale=None):
        return dca_attention(q3, k, v, attn, scale, chunk_size=chunk_size, local_size=local_size)

    return dataclasses.replace(
        ops, apply_rope=dca_apply_rope, attention=attention,
        choices={**ops.choices, "rope": "dca", "attention": f"dca(c={chunk_size},w={local_size})"},
        reasons={**ops.reasons, "attention": "Dual Chunk Attention requested"})


def uses_dca(ops: KernelOps) -> bool:
    return ops.apply_rope is dca_apply_rope


# ----------------------------------------------------------------------------- reference


def dca_relative_positions(t: int, chunk_size: int, local_size: int) -> torch.Tensor:
    """(T, T) int64: the relative position DCA gives query i and key j <= i (-1 above the diagonal),
    written from the three rules directly."""
    s = _check_sizes(chunk_size, local_size)
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    ci, cj, oi, oj = i // s, j // s, i % s, j % s
    rel = torch.where(ci == cj, oi - oj,
                      torch.where(cj == ci - 1, (s + oi).clamp(max=chunk_size - 1) - oj,
                                  chunk_size - 1 - oj))
    return torch.where(j <= i, rel, torch.full_like(rel, -1))


def dca_attention_ref(q, k, v, inv_freq, rope_scale, chunk_size, local_size, scale=None):
    """Un-rotated q (B, T, Hq, D), k/v (B, T, Hk, D): each pair's score from q rotated by that pair's
    relative position, <R(rel) q_i, k_j> (= <R(a) q_i, R(b) k_j> for any a - b = rel)."""
    b, t, hq, d = q.shape
    groups = hq // k.shape[2]
    scale = d**-0.5 if scale is None else scale
    rel = dca_relative_positions(t, chunk_size, local_size)  # (T, T)
    ang = rel.clamp(min=0).double()[..., None] * inv_freq.double()  # (T, T, D/2)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)  # (T, T, D)
    q_, k_, v_ = (x.double().transpose(1, 2) for x in (q, k, v))  # (B, H, T, D)
    k_, v_ = k_.repeat_interleave(groups, 1), v_.repeat_interleave(groups, 1)
    qr = q_[:, :, :, None] * cos + rotate_half(q_)[:, :, :, None] * sin  # (B, H, T, T, D)
    scores = (qr * k_[:, :, None]).sum(-1) * (rope_scale**2 * scale)
    scores = scores.masked_fill(rel < 0, float("-inf"))
    return (scores.softmax(-1) @ v_).transpose(1, 2).to(q.dtype)
