"""Dual Chunk Attention (DCA; An et al. 2024, "Training-Free Long-Context Scaling of Large Language
Models"), as vLLM runs it for Qwen2.5-1M: inference past the trained context without retraining, by
keeping every query-key relative position within the trained window.

Terms (HF/vLLM `dual_chunk_attention_config` names): `chunk_size` c is the window relative positions
stay within, `local_size` w the local window, and the sequence is cut into chunks of s = c - w
tokens. Token p sits in chunk p // s at offset o = p % s; keys are rotated at their offset. A query
at offset o is rotated three ways and sees
- its own chunk (intra-chunk) from position o: relative position i - j, exactly as plain RoPE;
- the previous chunk (successive-chunk) from position min(o + s, c): the true distance for the
  first w queries of a chunk, so neighbours across a chunk border keep their locality;
- every earlier chunk (inter-chunk) from position min(2s - 1, c): c when w <= c/2 (s - 1 + s >= c),
  and 2s - 1 when w > c/2, so relative positions there are [s, 2s - 1], never below the successive
  chunk's.
These are vLLM's `DualChunkRotaryEmbedding` tables (q: o, qc: (o + s).clamp(max=c), inter: qc[s - 1],
k: o) and ChunkLlama's; the largest relative position is c. `variant="paper"` keeps the paper's text
instead (successive capped at c - 1, inter-chunk at c - 1: every relative position < c).

Length temperature (vLLM, whenever `original_max_position_embeddings` > 0): for a sequence of L
tokens the keys and the softmax scale are both multiplied by s_L = max(1, 0.1 ln(L / orig) + 1), so
logits by s_L^2 (YaRN's attention-scaling formula at factor L / orig: 1.14 -> x1.29 at 1,010,000
tokens over 262,144). L is the sequence's length: the row (unpacked), the document (packed), or the
largest cached position + 1 (generation: vLLM's `orig_seq_lens`). vLLM ignores `rope_scaling` when
a DCA config is present (its RoPE is built from rope_theta alone); so does the model here
(`dca_rope` takes plain frequencies).

The three partial attentions are merged by log-sum-exp (one softmax over all keys). How the model
runs it: `dca_ops(ops, DCAConfig(...))` swaps the RoPE and attention ops; the model's `rope()` then
returns `dca_rope` tables (B, T, 4, D) [q intra, q successive, q inter, k], `dca_apply_rope` rotates
q three ways into (B, T, 3, Hq, D), and the attention op
- with no metadata: every row is one sequence at positions 0..T-1 (chunk loop, O(s^2) per chunk pair);
- with packed documents (`AttentionMeta` / document ids (B, T)): each document on its own, its
  positions 0..len-1 (as the packer writes them), its own temperature;
- with a KV-cache step (`CachedAttention`: `q_positions_BT`, `k_positions_BS`, `k_valid_BS`, keys
  stored after `dca_apply_rope`, i.e. at their chunk offsets): a prefill into an empty cache runs
  each row's valid tokens through the chunk loop (O(s^2) memory at any prompt length); later steps
  (decode) `dca_attention_positions`, each pair's table chosen from the two positions' chunks (vLLM's
  decode: intra / succ / inter key ranges of the query's chunk), O(Tq x S) per row. The cached keys
  are stored without the temperature and the step's s_L^2 (L: the row's largest valid key position
  + 1) applies to all of its query's logits, so a decode step's attention equals the full-sequence
  attention of the same tokens. vLLM instead
  multiplies each cached key by the s of the length when it was cached (query by the current s):
  the same up to L = orig, a factor s_L / s_L' on those logits beyond. Either way, past orig a
  multi-layer model's decoding differs from its full-sequence prefill (there every earlier token is
  a query at s_L too, not at the s of its own step).
Not implemented: vLLM's sparse attention (`sparse_attention_config`, used above
`sparse_attention_threshold` tokens); a config carrying it is read with a warning (dense DCA here).

`dca_relative_positions` and `dca_attention_ref` (explicit per-pair relative positions, O(T^2 D),
float64) are the plain-PyTorch reference.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from megaqwen.kernels.attention import as_attention_meta
from megaqwen.kernels.registry import KernelOps
from megaqwen.kernels.rope import rope_cos_sin, rotate_half

VARIANTS = ("vllm", "paper")


@dataclasses.dataclass(frozen=True)
class DCAConfig:
    chunk_size: int
    """c: the window relative positions stay within (at most the trained length)."""
    local_size: int
    """w: local window; chunks hold c - w tokens."""
    original_max_position: int = 0
    """Length temperature's trained context (vLLM's original_max_position_embeddings); 0 = off."""
    variant: str = "vllm"
    """vllm (positions capped at c, inter-chunk at min(2s - 1, c)) | paper (both at c - 1)."""

    def __post_init__(self):
        if not 0 < self.local_size < self.chunk_size:
            raise ValueError(f"DCA needs 0 < local_size ({self.local_size}) < chunk_size ({self.chunk_size})")
        if self.variant not in VARIANTS:
            raise ValueError(f"DCA variant {self.variant!r}; choose {' | '.join(VARIANTS)}")
        if self.original_max_position < 0:
            raise ValueError(f"DCA original_max_position={self.original_max_position} must be >= 0 (0: off)")

    @property
    def chunk_len(self) -> int:
        return self.chunk_size - self.local_size

    def positions(self, position_ids: torch.Tensor) -> torch.Tensor:
        """position_ids (...) -> (..., 4) int64: [q intra, q successive, q inter, k]."""
        s, c = self.chunk_len, self.chunk_size
        cap = c if self.variant == "vllm" else c - 1
        offset = position_ids.long() % s
        succ = (offset + s).clamp(max=cap)
        inter = torch.full_like(offset, min(2 * s - 1, c) if self.variant == "vllm" else c - 1)
        return torch.stack([offset, succ, inter, offset], dim=-1)

    def temperature(self, length: int | torch.Tensor):
        """s_L = max(1, 0.1 ln(L / orig) + 1) for a sequence of L tokens (1 when the temperature is off);
        logits are multiplied by its square."""
        orig = self.original_max_position
        if isinstance(length, torch.Tensor):
            if orig <= 0:
                return torch.ones_like(length, dtype=torch.float64)
            return (0.1 * torch.log(length.double() / orig) + 1.0).clamp(min=1.0)
        return 1.0 if orig <= 0 else max(1.0, 0.1 * math.log(length / orig) + 1.0)


def dca_rope(position_ids: torch.Tensor, inv_freq: torch.Tensor, dca: DCAConfig,
             scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """position_ids (B, T) -> cos, sin (B, T, 4, D) fp32 at [q intra, q successive, q inter, k]."""
    return rope_cos_sin(dca.positions(position_ids), inv_freq, scale)


def dca_apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q (B, T, Hq, D), k (B, T, Hk, D), tables (B, T, 4, D) -> q (B, T, 3, Hq, D) rotated at the
    intra/successive/inter positions, k (B, T, Hk, D) rotated at its chunk offset."""
    if cos.dim() != 4 or cos.shape[2] != 4:
        raise ValueError(f"dca_apply_rope needs DCA tables (B, T, 4, D), got {tuple(cos.shape)}: "
                         "build the model with kernels.dca.dca_ops")
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    q_ = q[:, :, None]  # (B, T, 1, Hq, D)
    q3 = q_ * cos[:, :, :3, None] + rotate_half(q_) * sin[:, :, :3, None]
    k_ = k * cos[:, :, 3:] + rotate_half(k) * sin[:, :, 3:]
    return q3, k_


def _attend(q, k, v, scale, causal):
    """q (B, H, Tq, D), k/v (B, H, Tk, D) -> out (B, H, Tq, D), lse (B, H, Tq, 1), softmax in fp32 at
    least (fp64 inputs stay fp64: the reference tests)."""
    scores = _upcast(q @ k.transpose(-1, -2)) * scale
    if causal:
        tq, tk = scores.shape[-2:]
        scores = scores.masked_fill(torch.ones(tq, tk, dtype=torch.bool, device=q.device)
                                    .triu(1 + tk - tq), float("-inf"))
    lse = scores.logsumexp(-1, keepdim=True)
    return (scores - lse).exp().to(v.dtype) @ v, lse


def _upcast(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def merge_lse(out_a, lse_a, out_b, lse_b):
    """Two partial attentions over disjoint key sets -> the attention over their union."""
    lse = torch.logaddexp(lse_a, lse_b)
    return (out_a * (lse_a - lse).exp() + out_b * (lse_b - lse).exp()).to(out_a.dtype), lse


def _sequence_attention(q3, k, v, scale: float, s: int) -> torch.Tensor:
    """One sequence per row at positions 0..n-1: q3 (3, B, H, n, D), k/v (B, H, n, D) -> (B, H, n, D)."""
    n = k.shape[2]
    out = torch.empty_like(q3[0], dtype=v.dtype)
    for ci, qs in enumerate(range(0, n, s)):
        qe = min(qs + s, n)
        acc = _attend(q3[0, :, :, qs:qe], k[:, :, qs:qe], v[:, :, qs:qe], scale, causal=True)
        if ci >= 1:  # the previous chunk
            part = _attend(q3[1, :, :, qs:qe], k[:, :, qs - s:qs], v[:, :, qs - s:qs], scale, False)
            acc = merge_lse(*acc, *part)
        if ci >= 2:  # every older chunk, one call
            part = _attend(q3[2, :, :, qs:qe], k[:, :, :qs - s], v[:, :, :qs - s], scale, False)
            acc = merge_lse(*acc, *part)
        out[:, :, qs:qe] = acc[0]
    return out


def dca_attention(q3, k, v, attn=None, scale=None, *, dca: DCAConfig):
    """q3 (B, Tq, 3, Hq, D) from `dca_apply_rope`, k/v (B, Tk, Hk, D) -> (B, Tq, Hq, D); `attn` None
    (rows at 0..T-1), packed documents, or a KV-cache step (see the module docstring)."""
    if getattr(attn, "q_positions_BT", None) is not None:  # a KV-cache step (megaqwen.generate)
        if getattr(attn, "start", None) == 0:  # prefill into an empty cache: O(s^2) per chunk pair
            out = _prefill_rows(q3, k, v, attn, scale, dca)
            if out is not None:
                return out
        own = attn.q_slots[:, None] == torch.arange(k.shape[1], device=k.device)[None]  # (Tq, S)
        return dca_attention_positions(q3, k, v, attn.q_positions_BT, attn.k_positions_BS,
                                       attn.k_valid_BS, scale, dca, own_BQS=own[None])
    b, t, _, hq, d = q3.shape
    groups = hq // k.shape[2]
    scale = d**-0.5 if scale is None else scale
    q3_ = q3.permute(2, 0, 3, 1, 4)  # (3, B, Hq, T, D)
    k_, v_ = (x.transpose(1, 2).repeat_interleave(groups, dim=1) for x in (k, v))  # (B, Hq, T, D)
    meta = as_attention_meta(attn)
    if meta is None:
        out = _sequence_attention(q3_, k_, v_, scale * dca.temperature(t) ** 2, dca.chunk_len)
        return out.transpose(1, 2)
    bounds = meta.varlen()[0].tolist()  # documents over the flattened B*T tokens
    out = torch.empty(b * t, hq, d, dtype=v.dtype, device=v.device)
    for start, end in zip(bounds[:-1], bounds[1:]):
        row, a, e = start // t, start % t, start % t + (end - start)
        piece = _sequence_attention(q3_[:, row:row + 1, :, a:e], k_[row:row + 1, :, a:e],
                                    v_[row:row + 1, :, a:e], scale * dca.temperature(end - start) ** 2,
                                    dca.chunk_len)
        out[start:end] = piece[0].transpose(0, 1)
    return out.view(b, t, hq, d)


def _prefill_rows(q3, k, v, attn, scale, dca: DCAConfig) -> torch.Tensor | None:
    """A prefill step (queries = every slot, S = T): each row's valid slots as one sequence through
    the chunk loop, when they hold positions 0..n-1 in order (left padding); None otherwise (the
    caller takes the per-pair path). A padding query's output is its own value (the cached mask
    lets it see only its own slot)."""
    b, t, _, hq, d = q3.shape
    groups = hq // k.shape[2]
    scale = d**-0.5 if scale is None else scale
    out = v.repeat_interleave(groups, dim=2).clone()  # (B, T, Hq, D)
    for r in range(b):
        idx = attn.k_valid_BS[r].nonzero().squeeze(1)
        n = idx.numel()
        expect = torch.arange(n, device=idx.device)
        if not (torch.equal(attn.k_positions_BS[r, idx], expect)
                and torch.equal(attn.q_positions_BT[r, idx], expect)):
            return None
        if n == 0:
            continue
        q_ = q3[r:r + 1, idx].permute(2, 0, 3, 1, 4)  # (3, 1, Hq, n, D)
        k_, v_ = (x[r:r + 1, idx].transpose(1, 2).repeat_interleave(groups, dim=1) for x in (k, v))
        piece = _sequence_attention(q_, k_, v_, scale * dca.temperature(n) ** 2, dca.chunk_len)
        out[r, idx] = piece[0].transpose(0, 1)
    return out


def dca_attention_positions(q3, k, v, q_pos_BT, k_pos_BS, k_valid_BS, scale, dca: DCAConfig,
                            own_BQS: torch.Tensor | None = None) -> torch.Tensor:
    """Queries and keys at explicit positions (a KV cache): q3 (B, Tq, 3, Hq, D), k (B, S, Hk, D)
    rotated at their chunk offsets, v (B, S, Hk, D) -> (B, Tq, Hq, D). Query i sees the valid keys
    with position <= its own (plus `own_BQS`, each query's own slot, so padding never yields an
    all-masked row); the pair's table is intra (same chunk), successive (the previous chunk) or
    inter (older). Temperature length per row: the largest valid key position + 1."""
    b, tq, _, hq, d = q3.shape
    groups = hq // k.shape[2]
    scale = d**-0.5 if scale is None else scale
    s = dca.chunk_len
    cq, ck = (q_pos_BT // s)[:, :, None], (k_pos_BS // s)[:, None, :]  # (B, Tq, 1), (B, 1, S)
    which = torch.where(cq == ck, 0, torch.where(ck == cq - 1, 1, 2))  # (B, Tq, S)
    k_, v_ = (x.transpose(1, 2).repeat_interleave(groups, dim=1) for x in (k, v))  # (B, Hq, S, D)
    scores3 = torch.einsum("bqwhd,bhsd->bhqsw", q3, k_)  # (B, Hq, Tq, S, 3)
    scores = scores3.gather(-1, which[:, None, :, :, None].expand(b, hq, tq, -1, 1)).squeeze(-1)
    length = torch.where(k_valid_BS, k_pos_BS, -1).amax(1) + 1  # (B,)
    scores = _upcast(scores)
    temp = dca.temperature(length.clamp(min=1)).to(scores.dtype)  # (B,)
    scores = scores * (scale * temp**2)[:, None, None, None]
    allowed = k_valid_BS[:, None, :] & (k_pos_BS[:, None, :] <= q_pos_BT[:, :, None])  # (B, Tq, S)
    if own_BQS is not None:
        allowed = allowed | own_BQS
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    return (scores.softmax(-1).to(v.dtype) @ v_).transpose(1, 2)


class _DCARope:
    """`apply_rope` of a DCA ops bundle; carries the settings the model's `rope()` builds tables from."""

    def __init__(self, dca: DCAConfig):
        self.dca = dca

    def __call__(self, q, k, cos, sin):
        return dca_apply_rope(q, k, cos, sin)


def dca_ops(ops: KernelOps, dca: DCAConfig) -> KernelOps:
    """`ops` with DCA's RoPE and attention (the model's `rope()` reads the settings back through
    `dca_settings`)."""

    def attention(q3, k, v, attn=None, scale=None):
        return dca_attention(q3, k, v, attn, scale, dca=dca)

    temp = f",orig={dca.original_max_position}" if dca.original_max_position else ""
    return dataclasses.replace(
        ops, apply_rope=_DCARope(dca), attention=attention,
        choices={**ops.choices, "rope": "dca",
                 "attention": f"dca-{dca.variant}(c={dca.chunk_size},w={dca.local_size}{temp})"},
        reasons={**ops.reasons, "attention": "Dual Chunk Attention requested"})


def uses_dca(ops: KernelOps) -> bool:
    return isinstance(ops.apply_rope, _DCARope)


def dca_settings(ops: KernelOps) -> DCAConfig:
    if not uses_dca(ops):
        raise ValueError("these kernel ops do not run Dual Chunk Attention (see kernels.dca.dca_ops)")
    return ops.apply_rope.dca


def dca_config_of(cfg) -> DCAConfig:
    """The DCAConfig of a ModelConfig's dca_* fields (chunk size > 0)."""
    return DCAConfig(cfg.dca_chunk_size, cfg.dca_local_size, cfg.dca_original_max_position,
                     cfg.dca_variant)


# ----------------------------------------------------------------------------- reference


def dca_relative_positions(t: int, dca: DCAConfig) -> torch.Tensor:
    """(T, T) int64: the relative position DCA gives query i and key j <= i (-1 above the diagonal),
    written from the three rules directly."""
    s, c = dca.chunk_len, dca.chunk_size
    cap = c if dca.variant == "vllm" else c - 1
    inter = min(2 * s - 1, c) if dca.variant == "vllm" else c - 1
    i = torch.arange(t)[:, None]
    j = torch.arange(t)[None, :]
    ci, cj, oi, oj = i // s, j // s, i % s, j % s
    rel = torch.where(ci == cj, oi - oj,
                      torch.where(cj == ci - 1, (s + oi).clamp(max=cap) - oj, inter - oj))
    return torch.where(j <= i, rel, torch.full_like(rel, -1))


def dca_attention_ref(q, k, v, inv_freq, dca: DCAConfig, scale=None):
    """Un-rotated q (B, T, Hq, D), k/v (B, T, Hk, D), one sequence per row: each pair's score from q
    rotated by that pair's relative position, <R(rel) q_i, k_j> (= <R(a) q_i, R(b) k_j> for any
    a - b = rel), times the temperature squared; float64."""
    b, t, hq, d = q.shape
    groups = hq // k.shape[2]
    scale = d**-0.5 if scale is None else scale
    rel = dca_relative_positions(t, dca)  # (T, T)
    ang = rel.clamp(min=0).double()[..., None] * inv_freq.double()  # (T, T, D/2)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)  # (T, T, D)
    q_, k_, v_ = (x.double().transpose(1, 2) for x in (q, k, v))  # (B, H, T, D)
    k_, v_ = k_.repeat_interleave(groups, 1), v_.repeat_interleave(groups, 1)
    qr = q_[:, :, :, None] * cos + rotate_half(q_)[:, :, :, None] * sin  # (B, H, T, T, D)
    scores = (qr * k_[:, :, None]).sum(-1) * (scale * dca.temperature(t) ** 2)
    scores = scores.masked_fill(rel < 0, float("-inf"))
    return (scores.softmax(-1) @ v_).transpose(1, 2).to(q.dtype)
