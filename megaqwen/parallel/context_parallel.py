"""Context parallelism: the sequence sharded over the `cp` group, attention across the shards.

Legend: B batch, T the full sequence, Tl = T / cp this rank's tokens, Hq/Hk query/KV heads (local
to the TP rank), G = Hq / Hk, D head_dim, c = T / (2 cp) the zig-zag chunk.

Zig-zag sharding (causal load balance): the sequence is cut into 2*cp chunks and cp rank r holds
chunks r and 2*cp-1-r, so every rank has one early and one late chunk and the same number of
causal (query, key) pairs, c^2 (2cp-1) + c(c+1), where contiguous shards give rank r
c^2 (4r+1) + c(c+1): at cp=4 the last rank does 6.5x the first's work (tests count both).
Packed documents make the work data-dependent; zig-zag still spreads each row's late tokens.
Positions (position_ids) stay the full sequence's, sharded like the tokens.

    local, meta = context_parallel_inputs(batch, cp_group)   # batch: (B, T) tensors, every cp rank
    parts = model(local["tokens"], labels=local["labels"], position_ids=local["position_ids"],
                  document_ids=meta)                          # LossParts of this rank's tokens

`ContextParallelMeta` (an `AttentionMeta`) is the per-batch metadata the CP attention core needs:
this rank's document ids (the base class's `document_ids`, (B, Tl)), the full sequence's
document ids (B, T) and segment numbers, the global sequence index of every local token, and the
ring's tile plan, built once per batch. Every cp rank loads the whole micro-batch, so the visiting
block's document ids and positions are sliced from the full ids locally instead of travelling
with K/V (one message per step fewer; the full ids cost 8 B/token).

Two attention cores (`apply_context_parallel(model, spec, group, mode)` swaps the spec's
attention core, the class swap `activation.py` uses for recomputation, keeping parameter names):
  ring      K/V blocks passed around the ring (isend/irecv, prefetched one step ahead); each step
            attends the local queries to the visiting block, tiled (tile x tile scores at a time,
            never (Tl)^2), with the causal-by-global-index and same-document mask; tiles the mask
            empties are skipped, fully visible ones take no mask; partial results merged by
            log-sum-exp (online softmax: running max and sum, lse = max + log sum). Fully
            visible tiles run a fused kernel that returns the lse (`cp_flash_tiles`; CPU: ATen's
            flash kernel; CUDA: flash-attn's when installed, in bf16), masked ones fp32 PyTorch
            ops (the reference; on CUDA without flash-attn every tile takes it).
            Backward is a second ring (custom autograd Function): K/V travel again with their
            dK/dV accumulators, which arrive home after cp hops - exact gradients.
  alltoall  Ulysses: all-to-all (B, Tl, H, D) -> (B, T, H/cp, D) per head group, the model's own
            attention backend (`ops.attention`) on the full sequence with the full document ids,
            all-to-all back. Needs Hq divisible by cp; KV heads are replicated up to a multiple of
            cp when Hk is not (GQA groups stay aligned).
Loss: each rank's LossParts covers its Tl tokens; sum and count add over the cp group exactly
(one all-reduce in `train.forward.validation_parts`). Gradients: the data-parallel wrapper reduces
over dp x cp (`data_parallel.dp_reduce_mesh`), so the objective is scaled by dp*cp / global token
count.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist
import torch.nn as nn

from megaqwen.kernels.attention import AttentionMeta
from megaqwen.parallel import cp_flash_tiles
from megaqwen.suggest import check_choice

CP_MODES = ("ring", "alltoall")
SEQUENCE_KEYS = ("tokens", "labels", "position_ids", "document_ids")
DEFAULT_TILE = 512
"""Ring tile edge: a (B, Hq, 512, 512) fp32 score tile is 4 MiB for the debug model's 4 heads; on
CPU 256-512 ran 1.5-2x faster than 1024-2048 (cache), 128 pays Python overhead per tile."""


# ---------------------------------------------------------------------------------------------
# zig-zag sharding


def check_seq_len(seq_len: int, cp: int) -> None:
    if seq_len % (2 * cp):
        raise ValueError(f"seq_len={seq_len} is not divisible by 2*cp={2 * cp} (zig-zag context "
                         f"parallelism cuts the sequence into 2*cp chunks); use a seq_len that is a "
                         f"multiple of {2 * cp} or a smaller cp")


def zigzag_index(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """(T/cp,) int64 global sequence indices of cp rank `rank`'s tokens: chunks rank, 2cp-1-rank."""
    if cp == 1:
        return torch.arange(seq_len, device=device)
    check_seq_len(seq_len, cp)
    c = seq_len // (2 * cp)
    lo, hi = rank * c, (2 * cp - 1 - rank) * c
    return torch.cat([torch.arange(lo, lo + c, device=device), torch.arange(hi, hi + c, device=device)])


def shard_sequence(x: torch.Tensor, cp: int, rank: int, dim: int = 1) -> torch.Tensor:
    """This cp rank's zig-zag shard of `x` along `dim` (a copy)."""
    return x.index_select(dim, zigzag_index(x.shape[dim], cp, rank, x.device))


def unshard_sequence(pieces: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """Inverse of `shard_sequence`: every cp rank's piece, in rank order -> the full sequence."""
    cp = len(pieces)
    t = pieces[0].shape[dim] * cp
    order = torch.cat([zigzag_index(t, cp, r, pieces[0].device) for r in range(cp)])
    return torch.cat(pieces, dim).index_select(dim, torch.argsort(order))


def gather_sequence(x: torch.Tensor, group: dist.ProcessGroup, dim: int = 1) -> torch.Tensor:
    """All-gather the cp group's shards of `x` and return the full sequence (no autograd)."""
    pieces = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, x.contiguous(), group=group)
    return unshard_sequence(pieces, dim)


def shard_batch(batch: dict[str, torch.Tensor], cp: int, rank: int) -> dict[str, torch.Tensor]:
    """The sequence tensors of `batch` (tokens, labels, position_ids, document_ids, and any other
    per-token field an objective reads: a tensor whose first two dims are the tokens' (B, T)) cut to
    this rank's zig-zag shard (B, T/cp); any other entry is passed through."""
    bt = tuple(batch["tokens"].shape[:2]) if "tokens" in batch else None

    def per_token(k, v) -> bool:
        return k in SEQUENCE_KEYS or (isinstance(v, torch.Tensor) and v.dim() >= 2
                                      and tuple(v.shape[:2]) == bt)

    return {k: shard_sequence(v, cp, rank) if per_token(k, v) else v for k, v in batch.items()}


def document_segments(document_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) document ids -> (B, T) int64 segment numbers, non-decreasing along each row: a new one
    wherever the id changes (the varlen backends' reading of packed ids)."""
    starts = torch.zeros_like(document_ids, dtype=torch.int64)
    starts[:, 1:] = (document_ids[:, 1:] != document_ids[:, :-1]).to(torch.int64)
    return starts.cumsum(1)


# ---------------------------------------------------------------------------------------------
# per-batch metadata


class ContextParallelMeta(AttentionMeta):
    """`AttentionMeta` of one cp rank's zig-zag shard; built once per batch (see module doc).

    `document_ids` (base class) are this rank's (B, Tl); `full_document_ids` (B, T) the whole
    sequence's (None-given ids mean one document per row: plain causal); `index` (Tl,) the global
    sequence index of each local token. The base class's `varlen()`/`dense_mask()` would describe
    the shard as if it were a sequence of its own, so they refuse: only the CP cores read this.
    """

    def __init__(self, full_document_ids: torch.Tensor | None, group: dist.ProcessGroup | None,
                 shape: tuple[int, int] | None = None, device=None, tile: int = DEFAULT_TILE,
                 count_work: bool = False):
        self.cp = dist.get_world_size(group) if group is not None else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        self.documents = full_document_ids is not None
        if full_document_ids is None:
            if shape is None:
                raise ValueError("ContextParallelMeta needs the full document ids or the batch shape (B, T)")
            full_document_ids = torch.zeros(shape, dtype=torch.int64, device=device)
        if full_document_ids.dim() != 2:
            raise ValueError(f"document_ids must be (B, T), got shape {tuple(full_document_ids.shape)}")
        if tile < 1:
            raise ValueError(f"ring tile={tile} must be >= 1")
        t = full_document_ids.shape[1]
        self.index = zigzag_index(t, self.cp, self.rank, full_document_ids.device)
        super().__init__(full_document_ids.index_select(1, self.index))
        self.full_document_ids = full_document_ids
        self.segments = document_segments(full_document_ids)  # (B, T)
        self.tile = tile
        self.count_work = count_work
        self.work = {"computed": 0, "unmasked": 0}
        """With count_work: (query, key) pairs, summed over batch rows, of one head in the tiles the
        ring computed / the unmasked pairs among them (the attention work this rank did)."""
        self._full_meta: AttentionMeta | None = None
        self._plan: list | None = None

    def varlen(self):
        raise RuntimeError("ContextParallelMeta describes a zig-zag shard; it needs the context-parallel "
                           "attention core (apply_context_parallel), not a plain backend")

    dense_mask = varlen

    def full_meta(self) -> AttentionMeta | None:
        """The whole sequence's AttentionMeta (None without documents), for the all-to-all core."""
        if self.documents and self._full_meta is None:
            self._full_meta = AttentionMeta(self.full_document_ids)
        return self._full_meta

    def gathered_order(self) -> torch.Tensor:
        """(T,) global index of each token in rank-major (all-gathered) order."""
        t = self.full_document_ids.shape[1]
        return torch.cat([zigzag_index(t, self.cp, r, self.index.device) for r in range(self.cp)])

    def ring_plan(self) -> list[tuple[int, list[tuple[int, int, int, int, bool]]]]:
        """Per ring step s: (owner rank of the visiting K/V block, tiles), a tile being (q start,
        q end, k start, k end, fully visible) over local positions; tiles every row masks are left
        out. Decided from index and segment ranges per tile, so it is cheap and exact-or-conservative
        (a tile kept as partial may still turn out empty; its mask handles that)."""
        if self._plan is None:
            self._plan = [(o, self._tiles(o)) for o in ((self.rank - s) % self.cp for s in range(self.cp))]
        return self._plan

    def _tile_stats(self, index: torch.Tensor):
        """Per tile of `index`: bounds, min/max global index (n,), min/max segment (B, n)."""
        n = index.numel()
        bounds = list(range(0, n, self.tile)) + [n]
        pad = bounds[-2] + self.tile - n  # pad the last tile by repeating its last token
        idx = torch.cat([index, index[-1:].expand(pad)]).view(-1, self.tile)
        seg = self.segments.index_select(1, idx.flatten()).view(-1, *idx.shape)  # (B, n, tile)
        return bounds, idx.amin(1), idx.amax(1), seg.amin(2), seg.amax(2)

    def _tiles(self, owner: int):
        qb, qimin, qimax, qsmin, qsmax = self._tile_stats(self.index)
        kb, kimin, kimax, ksmin, ksmax = self._tile_stats(
            zigzag_index(self.segments.shape[1], self.cp, owner, self.index.device))
        # (nq, nk): all keys after all queries, or no document in common in any row -> skip
        causal_empty = qimax[:, None] < kimin[None, :]
        doc_empty = ((qsmax[:, :, None] < ksmin[:, None, :]) | (qsmin[:, :, None] > ksmax[:, None, :])).all(0)
        one_doc = ((qsmin == qsmax)[:, :, None] & (ksmin == ksmax)[:, None, :]
                   & (qsmin[:, :, None] == ksmin[:, None, :])).all(0)
        full = (qimin[:, None] >= kimax[None, :]) & one_doc
        keep = ~(causal_empty | doc_empty)
        return [(qb[i], qb[i + 1], kb[j], kb[j + 1], bool(full[i, j]))
                for i, j in keep.nonzero().tolist()]

    def tile_mask(self, owner_index: torch.Tensor, qa: int, qb: int, ka: int, kb: int) -> torch.Tensor:
        """bool (B, qb-qa, kb-ka): query may attend key (causal by global index, same document)."""
        qi, ki = self.index[qa:qb], owner_index[ka:kb]
        qseg, kseg = self.segments[:, qi], self.segments[:, ki]
        return (qi[:, None] >= ki[None, :]) & (qseg[:, :, None] == kseg[:, None, :])


def context_parallel_inputs(batch: dict[str, torch.Tensor], group: dist.ProcessGroup | None,
                            document_mask: bool = True, tile: int = DEFAULT_TILE
                            ) -> tuple[dict[str, torch.Tensor], ContextParallelMeta]:
    """(this rank's shard of the batch, its ContextParallelMeta). `batch` holds the full (B, T)
    tensors on every cp rank; without `document_mask` (or document ids) attention is plain causal."""
    cp = dist.get_world_size(group) if group is not None else 1
    rank = dist.get_rank(group) if group is not None else 0
    tokens = batch["tokens"]
    docs = batch.get("document_ids") if document_mask else None
    meta = ContextParallelMeta(docs, group, shape=tuple(tokens.shape[:2]), device=tokens.device, tile=tile)
    return shard_batch(batch, cp, rank), meta


# ---------------------------------------------------------------------------------------------
# ring attention


def _ring_send_recv(x: torch.Tensor, group: dist.ProcessGroup, tag: int) -> tuple[list, torch.Tensor]:
    """Post: send `x` to the next cp rank, receive a same-shaped tensor from the previous one."""
    cp, r = dist.get_world_size(group), dist.get_rank(group)
    nxt, prv = dist.get_global_rank(group, (r + 1) % cp), dist.get_global_rank(group, (r - 1) % cp)
    buf = torch.empty_like(x)
    # one batch: NCCL fuses the pair (separate isend/irecv would serialise on one stream and
    # deadlock a ring whose ranks all send first); gloo posts both asynchronously
    ops = [dist.P2POp(dist.isend, x.contiguous(), nxt, group, tag),
           dist.P2POp(dist.irecv, buf, prv, group, tag)]
    return dist.batch_isend_irecv(ops), buf


def _wait(handles: list) -> None:
    for h in handles:
        h.wait()


def _rows(x: torch.Tensor, hk: int) -> torch.Tensor:
    """(B, T, Hq, D) -> (B, Hk, T*G, D): a query head group's rows t*G + g next to each other, so a
    tile of tokens is a contiguous row range and GQA needs no K/V copies."""
    b, t, hq, d = x.shape
    return x.reshape(b, t, hk, hq // hk, d).permute(0, 2, 1, 3, 4).reshape(b, hk, t * (hq // hk), d)


def _unrows(x: torch.Tensor, t: int) -> torch.Tensor:
    b, hk, tg, d = x.shape
    return x.view(b, hk, t, tg // t, d).permute(0, 2, 1, 3, 4).reshape(b, t, hk * (tg // t), d)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Tiles, softmax statistics and accumulators: fp32 (fp64 for fp64 inputs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tile_scores(meta, q, k, g, owner_index, tile):
    """Scores (B, Hk, Cq*G, Ck) of one tile from pre-scaled rows `q`, masked entries -inf (none
    when the tile is fully visible), and the (B, Cq, Ck) mask (None when fully visible)."""
    qa, qb, ka, kb, full = tile
    s = torch.matmul(q[:, :, qa * g:qb * g], k[:, :, ka:kb].to(q.dtype).transpose(-1, -2))
    if full:
        return s, None
    mask = meta.tile_mask(owner_index, qa, qb, ka, kb)  # (B, Cq, Ck), broadcast over heads and G
    b, hk = s.shape[:2]
    s.view(b, hk, qb - qa, g, kb - ka).masked_fill_(~mask[:, None, :, None, :], float("-inf"))
    return s, mask


def _block_forward(meta, q, k, v, g, owner, tiles, acc, m, l_):
    """Online softmax of the local (pre-scaled) queries over one visiting K/V block: running row
    max `m`, sum `l_` and unnormalised output `acc` updated in place (log-sum-exp = m + log l)."""
    owner_index = zigzag_index(meta.segments.shape[1], meta.cp, owner, q.device)
    fused = cp_flash_tiles.fused_tile_kernel(q.device)
    for tile in tiles:
        qa, qb, ka, kb, full = tile
        rows = slice(qa * g, qb * g)
        if meta.count_work:
            meta.work["computed"] += q.shape[0] * (qb - qa) * (kb - ka)
            meta.work["unmasked"] += q.shape[0] * (qb - qa) * (kb - ka) if full else \
                int(meta.tile_mask(owner_index, qa, qb, ka, kb).sum())
        if full and fused is not None:  # rows of a KV head group = queries of one head: no mask needed
            o_t, lse_t = fused[0](q[:, :, rows], k[:, :, ka:kb].to(q.dtype), v[:, :, ka:kb].to(q.dtype),
                                  0.0, False, scale=1.0)
            m_new = torch.maximum(m[:, :, rows], lse_t)
            alpha, beta = torch.exp(m[:, :, rows] - m_new), torch.exp(lse_t - m_new)
            l_[:, :, rows] = l_[:, :, rows] * alpha + beta
            acc[:, :, rows] = acc[:, :, rows] * alpha[..., None] + o_t * beta[..., None]
            m[:, :, rows] = m_new
            continue
        s, _ = _tile_scores(meta, q, k, g, owner_index, tile)
        m_new = torch.maximum(m[:, :, rows], s.amax(-1))
        m_new = m_new.masked_fill(torch.isinf(m_new), 0.0)  # rows with nothing visible yet
        alpha = torch.exp(m[:, :, rows] - m_new)
        p = s.sub_(m_new[..., None]).exp_()  # masked -> 0
        l_[:, :, rows] = l_[:, :, rows] * alpha + p.sum(-1)
        acc[:, :, rows] = acc[:, :, rows] * alpha[..., None] + torch.matmul(p, v[:, :, ka:kb].to(p.dtype))
        m[:, :, rows] = m_new


def _block_backward(meta, q, k, v, do, out, lse, delta, g, owner, tiles, dq, dk, dv):
    """Add one visiting block's share of dq (local, w.r.t. the pre-scaled q) and dk/dv (the
    block's) given the final output `out`, log-sum-exp `lse` and delta = rowsum(dO * O)."""
    owner_index = zigzag_index(meta.segments.shape[1], meta.cp, owner, q.device)
    fused = cp_flash_tiles.fused_tile_kernel(q.device)
    for tile in tiles:
        qa, qb, ka, kb, full = tile
        rows = slice(qa * g, qb * g)
        do_t = do[:, :, rows]
        if full and fused is not None:  # the final out and lse make each tile's share exact
            dq_t, dk_t, dv_t = fused[1](do_t, q[:, :, rows], k[:, :, ka:kb].to(q.dtype),
                                        v[:, :, ka:kb].to(q.dtype), out[:, :, rows], lse[:, :, rows],
                                        0.0, False, scale=1.0)
            dq[:, :, rows] += dq_t
            dk[:, :, ka:kb] += dk_t
            dv[:, :, ka:kb] += dv_t
            continue
        p, _ = _tile_scores(meta, q, k, g, owner_index, tile)
        p = p.sub_(lse[:, :, rows, None]).exp_()  # (B, Hk, Cq*G, Ck) probabilities; masked -> 0
        dv[:, :, ka:kb] += torch.matmul(p.transpose(-1, -2), do_t)
        ds = torch.matmul(do_t, v[:, :, ka:kb].to(do.dtype).transpose(-1, -2))
        ds = ds.sub_(delta[:, :, rows, None]).mul_(p)  # dS = P * (dP - delta)
        dq[:, :, rows] += torch.matmul(ds, k[:, :, ka:kb].to(ds.dtype))
        dk[:, :, ka:kb] += torch.matmul(ds.transpose(-1, -2), q[:, :, rows])


class _RingAttention(torch.autograd.Function):
    """Forward: K/V ring, tiled online softmax (the log-sum-exp merge of every block's partial
    result). Backward: K/V ring again, dK/dV accumulators travelling with their block and arriving
    home after the last hop."""

    @staticmethod
    def forward(ctx, q, k, v, meta: ContextParallelMeta, group, scale: float):
        b, t, hq, d = q.shape
        hk = k.shape[2]
        g, dt = hq // hk, _acc_dtype(q.dtype)
        qr = _rows(q, hk).to(dt) * scale  # (B, Hk, Tl*G, D), scale folded into q
        kv = torch.stack([_rows(k, hk), _rows(v, hk)])  # (2, B, Hk, Tl, D)
        acc = torch.zeros(qr.shape, dtype=dt, device=q.device)
        m = torch.full(qr.shape[:3], float("-inf"), dtype=dt, device=q.device)
        l_ = torch.zeros(qr.shape[:3], dtype=dt, device=q.device)
        plan = meta.ring_plan()
        for s, (owner, tiles) in enumerate(plan):
            pending = _ring_send_recv(kv, group, tag=0) if s < len(plan) - 1 else None
            _block_forward(meta, qr, kv[0], kv[1], g, owner, tiles, acc, m, l_)
            if pending is not None:
                _wait(pending[0])
                kv = pending[1]
        out = (acc / l_[..., None]).to(q.dtype)  # every token sees itself: l > 0
        lse = m + torch.log(l_)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.meta, ctx.group, ctx.scale = meta, group, scale
        return _unrows(out, t)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        meta, group, scale = ctx.meta, ctx.group, ctx.scale
        t, hk = q.shape[1], k.shape[2]
        g, dt = q.shape[2] // hk, _acc_dtype(q.dtype)
        qr = _rows(q, hk).to(dt) * scale
        kv = torch.stack([_rows(k, hk), _rows(v, hk)])
        do, out = _rows(dout, hk).to(dt), out.to(dt)
        delta = (do * out).sum(-1)  # (B, Hk, Tl*G)
        dq = torch.zeros(qr.shape, dtype=dt, device=q.device)
        dkv = torch.zeros(kv.shape, dtype=dt, device=q.device)  # the visiting block's
        plan = meta.ring_plan()
        for s, (owner, tiles) in enumerate(plan):
            pending = _ring_send_recv(kv, group, tag=0) if s < len(plan) - 1 else None
            _block_backward(meta, qr, kv[0], kv[1], do, out, lse, delta, g, owner, tiles, dq, dkv[0],
                            dkv[1])
            if group is not None and len(plan) > 1:  # hand the accumulator on; the last hop brings ours
                handles, dkv = _ring_send_recv(dkv, group, tag=1)
                _wait(handles)
            if pending is not None:
                _wait(pending[0])
                kv = pending[1]
        dk, dv = (_unrows(x, t).to(k.dtype) for x in dkv)
        return _unrows(dq * scale, t).to(q.dtype), dk, dv, None, None, None


def ring_attention(q, k, v, meta: ContextParallelMeta, group: dist.ProcessGroup | None,
                   scale: float | None = None) -> torch.Tensor:
    """q (B, Tl, Hq, D), k/v (B, Tl, Hk, D) of this rank's zig-zag shard -> (B, Tl, Hq, D)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    with torch.autocast(q.device.type, enabled=False):  # tiles compute in fp32 themselves
        return _RingAttention.apply(q, k, v, meta, group, scale)


# ---------------------------------------------------------------------------------------------
# all-to-all (Ulysses) attention


def _seq_to_head(x: torch.Tensor, group) -> torch.Tensor:
    """(B, Tl, H, D) sequence shard -> (B, cp*Tl, H/cp, D): head group r of every rank's tokens,
    tokens in rank-major order."""
    cp = dist.get_world_size(group)
    b, tl, h, d = x.shape
    send = x.reshape(b, tl, cp, h // cp, d).permute(2, 0, 1, 3, 4).contiguous()  # (cp, B, Tl, H/cp, D)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[i]: rank i's tokens, my head group
    return recv.permute(1, 0, 2, 3, 4).reshape(b, cp * tl, h // cp, d)


def _head_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    """Inverse of `_seq_to_head`: (B, cp*Tl, H/cp, D) -> (B, Tl, H, D)."""
    cp = dist.get_world_size(group)
    b, t, hc, d = x.shape
    send = x.reshape(b, cp, t // cp, hc, d).transpose(0, 1).contiguous()  # (cp, B, Tl, H/cp, D)
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j]: my tokens, rank j's head group
    return recv.permute(1, 2, 0, 3, 4).reshape(b, t // cp, cp * hc, d)


def _a2a_pair(name: str, forward, backward) -> type[torch.autograd.Function]:
    def fwd(ctx, x, group):
        ctx.group = group
        return forward(x, group)

    def bwd(ctx, grad):
        return backward(grad.contiguous(), ctx.group), None

    methods = {"forward": staticmethod(fwd), "backward": staticmethod(bwd)}
    return type(name, (torch.autograd.Function,), methods)


_SeqToHead = _a2a_pair("_SeqToHead", _seq_to_head, _head_to_seq)  # a2a seq->head / a2a head->seq
_HeadToSeq = _a2a_pair("_HeadToSeq", _head_to_seq, _seq_to_head)  # a2a head->seq / a2a seq->head


def check_context_parallel(mode: str, tile: int, cp: int, heads_per_tp_rank: int | None) -> None:
    """`parallel.cp_mode` / `cp_tile` (refused at any cp, as a typo is a typo) and, with cp > 1,
    what the chosen core needs (query heads unknown, None: checked at the first forward); pure
    arithmetic, so the launcher's pre-flight runs it too."""
    check_choice("parallel.cp_mode", mode, CP_MODES)
    if tile < 1:
        raise ValueError(f"parallel.cp_tile={tile} must be >= 1 (the ring's tile edge in tokens; "
                         f"default {DEFAULT_TILE})")
    if cp > 1 and mode == "alltoall" and heads_per_tp_rank is not None:
        check_alltoall_heads(heads_per_tp_rank, cp)


def check_alltoall_heads(num_heads: int, cp: int) -> None:
    if num_heads % cp:
        raise ValueError(f"context parallel all-to-all: {num_heads} query heads (per tp rank) are not "
                         f"divisible by cp={cp}; use parallel.cp_mode=ring or a cp dividing the heads")


def alltoall_attention(q, k, v, meta: ContextParallelMeta, group: dist.ProcessGroup,
                       attention, scale: float | None = None) -> torch.Tensor:
    """Ulysses: q (B, Tl, Hq, D), k/v (B, Tl, Hk, D) -> (B, Tl, Hq, D) through `attention` (a
    backend with the `ops.attention` call) on the full sequence for Hq/cp heads."""
    cp = dist.get_world_size(group)
    hq, hk = q.shape[2], k.shape[2]
    check_alltoall_heads(hq, cp)
    if hk % cp:  # replicate KV heads up to lcm(Hk, cp), which divides Hq: GQA groups stay aligned
        rep = cp // math.gcd(hk, cp)
        k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
    order = meta.gathered_order()
    natural = torch.argsort(order)
    q, k, v = (_SeqToHead.apply(x, group).index_select(1, natural) for x in (q, k, v))  # (B, T, H/cp, D)
    out = attention(q, k, v, meta.full_meta(), scale)
    return _HeadToSeq.apply(out.index_select(1, order), group)


# ---------------------------------------------------------------------------------------------
# plugging into a model


def context_parallel_attention(q, k, v, attn, group, mode: str, attention, scale: float):
    if not isinstance(attn, ContextParallelMeta):
        raise ValueError("context parallelism needs the batch's ContextParallelMeta as the model's "
                         f"document_ids (build it with context_parallel_inputs), got {type(attn).__name__}")
    cp = dist.get_world_size(group) if group is not None else 1
    if (attn.cp, attn.rank) != (cp, dist.get_rank(group) if group is not None else 0):
        raise ValueError(f"ContextParallelMeta was built for cp={attn.cp} rank {attn.rank}, but the "
                         f"attention runs on a cp group of {cp}")
    if mode == "ring":
        return ring_attention(q, k, v, attn, group, scale)
    return alltoall_attention(q, k, v, attn, group, attention, scale)


@functools.cache
def _cp_class(cls: type, method: str, mode: str) -> type:
    def core(self, q, k, v, attn):
        return context_parallel_attention(q, k, v, attn, self.cp_group, mode, self.ops.attention,
                                          self.head_dim**-0.5)

    core.__doc__ = f"{mode} context-parallel attention over `self.cp_group` (see context_parallel.py)"
    return type(f"ContextParallel{cls.__name__}", (cls,), {method: core})


def apply_context_parallel(model: nn.Module, spec, cp_group: dist.ProcessGroup | None,
                           mode: str = "ring") -> None:
    """Swap the attention core (`spec.selective_recompute`: module class, method with the call
    `core(q, k, v, attn)`) of every layer for the `mode` (ring | alltoall) context-parallel one, in
    place; parameter names are unchanged. Apply after TP/SP and EP, before recomputation, compile
    and data-parallel wrapping; a cp group of one leaves the model as it is. Works on meta."""
    check_choice("parallel.cp_mode", mode, CP_MODES)
    if cp_group is None or dist.get_world_size(cp_group) == 1:
        return
    cp = dist.get_world_size(cp_group)
    cls, method = spec.selective_recompute
    for layer in spec.layers(model).values():
        targets = [m for m in layer.modules() if isinstance(m, cls)]
        if not targets:
            raise ValueError(f"context parallelism: no {cls.__name__} in {type(layer).__name__}")
        for m in targets:
            if mode == "alltoall" and spec.local_attention_heads is not None:  # after TP's split
                check_alltoall_heads(spec.local_attention_heads(m), cp)
            m.__class__ = _cp_class(type(m), method, mode)
            m.cp_group = cp_group
