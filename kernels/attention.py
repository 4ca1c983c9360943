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

Generation (KV cache): `KVCache` holds every layer's keys (after RoPE) and values; each forward of
the generation engine gets one `CachedAttention` step object in the `attn` slot, the model's
`hidden_states` hands each layer its `LayerCache` view, the attention appends its new k/v there and
calls `ops.attention(q, k_all, v_all, layer_cache)`. Every backend above routes such a call to
`cached_attention` (SDPA with the step's (B, 1, Tq, S) mask), so q has Tq new tokens and k/v the S
cached ones. See `CachedAttention` for what a backend (e.g. Dual Chunk Attention decode) can read.
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


class KVCache:
    """Keys (after RoPE) and values of every decoder layer for one batch being generated.

    Slots: each row's tokens sit at slots 0..S-1 of a preallocated (B, capacity, Hk, D) buffer per
    layer (allocated at the layer's first append, with its local head count and dtype: a tensor-
    parallel rank keeps its own KV heads). Every forward of the batch appends the same number of
    slots to every row (prompts left-padded: a padding slot is invalid, never attended). Per slot the
    cache records the token's position (its RoPE position, per row) and whether it is valid.
    """

    def __init__(self, batch: int, capacity: int, device: torch.device | str):
        self.capacity = capacity
        self.length = 0
        """Slots filled so far (the same in every row)."""
        self.positions_BS = torch.zeros(batch, capacity, dtype=torch.long, device=device)
        self.valid_BS = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.k: dict[str, torch.Tensor] = {}
        """layer name -> (B, capacity, Hk, D) keys after RoPE."""
        self.v: dict[str, torch.Tensor] = {}

    @property
    def batch(self) -> int:
        return self.positions_BS.shape[0]

    def step(self, positions_BT: torch.Tensor, valid_BT: torch.Tensor | None = None) -> CachedAttention:
        """Reserve the next T slots for a forward over tokens at `positions_BT` (valid_BT: False for
        left padding); returns the attention metadata that forward passes as `document_ids`."""
        b, t = positions_BT.shape
        if b != self.batch:
            raise ValueError(f"KV cache holds {self.batch} rows, the step has {b}")
        if self.length + t > self.capacity:
            raise ValueError(f"KV cache full: {self.length} + {t} slots > capacity {self.capacity}")
        start = self.length
        self.positions_BS[:, start:start + t] = positions_BT
        self.valid_BS[:, start:start + t] = True if valid_BT is None else valid_BT
        self.length += t
        return CachedAttention(self, start, t)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these rows (index tensor), in this order: drop finished sequences."""
        self.positions_BS = self.positions_BS.index_select(0, rows)
        self.valid_BS = self.valid_BS.index_select(0, rows)
        for d in (self.k, self.v):
            for name, buf in d.items():
                d[name] = buf.index_select(0, rows)


class CachedAttention(AttentionMeta):
    """Attention metadata of one forward over a `KVCache` (prefill: the padded prompts; decode: one
    new token per row), built once per forward and handed to every layer as the `attn` argument.

    Backends read, per layer (`LayerCache`, returned by `for_layer`, carries the same fields):
      q_positions_BT (B, Tq) int64   RoPE positions of the new tokens (the queries)
      k_positions_BS (B, S) int64    positions of every cached key, S = slots filled incl. these
      k_valid_BS     (B, S) bool     False for padding slots (never attended)
      q_slots        (Tq,) int64     cache slots of the queries (= S - Tq ... S - 1)
      mask()         (B, 1, Tq, S) bool: key valid and k_position <= q_position, plus each query's
                     own slot (so a padding query attends itself: no all-masked row, no NaN)
    The keys are stored after RoPE at `q_positions` (plain RoPE); an ops bundle whose `apply_rope`
    rotates differently (DCA: keys at their chunk offset) stores what its own rope returned, and its
    attention can rebuild whatever relative positions it needs from the positions above.
    A subclass of AttentionMeta only so the model's `prepare_inputs` passes it through unchanged;
    it has no document ids (generation never packs documents).
    """

    def __init__(self, cache: KVCache, start: int, t: int):  # no document ids: no super().__init__
        self.cache = cache
        self.start = start
        self.t = t
        end = start + t
        self.q_positions_BT = cache.positions_BS[:, start:end]
        self.k_positions_BS = cache.positions_BS[:, :end]
        self.k_valid_BS = cache.valid_BS[:, :end]
        self.q_slots = torch.arange(start, end, device=cache.positions_BS.device)
        self._mask: torch.Tensor | None = None

    def varlen(self):
        raise ValueError("cached (generation) attention has no packed documents / cu_seqlens")

    def dense_mask(self) -> torch.Tensor:
        return self.mask()

    def mask(self) -> torch.Tensor:
        if self._mask is None:
            s = self.k_positions_BS.shape[1]
            causal = self.k_positions_BS[:, None, :] <= self.q_positions_BT[:, :, None]  # (B, Tq, S)
            own = self.q_slots[:, None] == torch.arange(s, device=self.q_slots.device)[None]  # (Tq, S)
            self._mask = ((causal & self.k_valid_BS[:, None, :]) | own)[:, None]
        return self._mask

    def for_layer(self, name: str) -> LayerCache:
        return LayerCache(self, name)


class LayerCache(CachedAttention):
    """One layer's view of a `CachedAttention` step: `append` stores its new keys/values."""

    def __init__(self, step: CachedAttention, name: str):  # shares the step's fields
        self.__dict__.update(step.__dict__)
        self.step_meta = step
        self.name = name

    def mask(self) -> torch.Tensor:
        return self.step_meta.mask()  # built once per forward, shared by every layer

    def append(self, k_BTHD: torch.Tensor, v_BTHD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this forward's keys (after RoPE) and values; -> every filled slot's (B, S, Hk, D)."""
        c = self.cache
        if self.name not in c.k:
            shape = (c.batch, c.capacity, *k_BTHD.shape[2:])
            c.k[self.name] = k_BTHD.new_zeros(shape)
            c.v[self.name] = v_BTHD.new_zeros(shape[:2] + v_BTHD.shape[2:])
        end = self.start + self.t
        c.k[self.name][:, self.start:end] = k_BTHD
        c.v[self.name][:, self.start:end] = v_BTHD
        return c.k[self.name][:, :end], c.v[self.name][:, :end]


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn: CachedAttention,
                     scale: float | None = None) -> torch.Tensor:
    """q (B, Tq, Hq, D) new tokens, k/v (B, S, Hk, D) every cached slot -> (B, Tq, Hq, D): one SDPA
    call with the step's (B, 1, Tq, S) mask (the reference every cached backend is tested against)."""
    groups = q.shape[2] // k.shape[2]
    q_, k_, v_ = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T|S, D)
    k_, v_ = _repeat_kv(k_, v_, groups, dim=1)
    out = F.scaled_dot_product_attention(q_, k_, v_, attn_mask=attn.mask(), scale=scale)
    return out.transpose(1, 2)


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
    if isinstance(attn, CachedAttention):
        return cached_attention(q, k, v, attn, scale)
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
    if isinstance(attn, CachedAttention):  # generation: a decode step is one query per row
        return cached_attention(q, k, v, attn, scale)
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
    if isinstance(attn, CachedAttention):
        return cached_attention(q, k, v, attn, scale)
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
