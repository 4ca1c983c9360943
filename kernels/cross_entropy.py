"""LM-head matmul fused with cross-entropy: a plain reference and a chunked version.

Shapes: hidden (N, H) tokens x width; weight (V, H), or this rank's vocabulary shard (V_local, H)
holding rows [rank * V_local, (rank + 1) * V_local) when `tp_group` is given; labels (N,) global
ids, `ignore_index` rows contribute nothing. Optional z-loss adds `z_loss * lse^2` per token
(PaLM), keeping the softmax normaliser near 1. Label smoothing is not supported.

`linear_cross_entropy_ref` materialises the (N, V) logits in fp32. With `tp_group` every version
computes the loss Megatron-style without gathering logits: the row max, the target logit and the
sum of exponentials are all-reduced over the group (the reference is then the chunked pass below
with a single chunk of (N, V_local) logits). The returned loss and every gradient equal the
unsharded version; the gradient of `hidden` is all-reduced over the group inside, so callers need
no extra region.

`linear_cross_entropy_chunked` never holds more than (chunk_rows, V_local) logits: for 8K tokens
of the 0.5B model's 151,936 vocabulary the full fp32 logits are 5.0 GB, their gradient another
5.0 GB. For reduction mean/sum the gradients are computed during the forward pass (the chunk's
logits are turned into their gradient in place and multiplied into dhidden/dweight at once), so
backward only rescales them by the incoming scalar; reduction "none" recomputes chunk logits in
backward. The per-chunk softmax statistics and gradient run in Triton (`backend="triton"`) or
PyTorch (`backend="torch"`); the matmuls are always cuBLAS/ATen.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megaqwen.kernels._triton import next_pow2, tl, triton_kernel

IGNORE_INDEX = -100


def _reduce(per_token: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str):
    if reduction == "sum":
        return per_token.sum()
    if reduction == "mean":
        return per_token.sum() / (labels != ignore_index).sum().clamp(min=1)
    if reduction == "none":
        return per_token
    raise ValueError(f"reduction must be mean|sum|none, got {reduction!r}")


def _check_inputs(hidden, weight, labels, reduction):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)} must be (N, H) and weight "
                         f"{tuple(weight.shape)} (V, H) with the same H")
    if labels.shape != hidden.shape[:1]:
        raise ValueError(f"linear_cross_entropy: labels {tuple(labels.shape)} must be (N,) = "
                         f"({hidden.shape[0]},)")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be mean|sum|none, got {reduction!r}")


def linear_cross_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    tp_group: dist.ProcessGroup | None = None,
    z_loss: float = 0.0,
) -> torch.Tensor:
    """hidden (N, H), weight (V or V_local, H), labels (N,) -> loss (fp32)."""
    _check_inputs(hidden, weight, labels, reduction)
    if tp_group is not None and dist.get_world_size(tp_group) > 1:
        # Megatron's vocab-parallel CE is the chunked pass with a single chunk: full local logits
        return linear_cross_entropy_chunked(hidden, weight, labels, ignore_index, reduction, tp_group,
                                            z_loss, chunk_rows=max(1, hidden.shape[0]))
    logits = (hidden @ weight.t()).float()
    if not z_loss:
        return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)
    per_token = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    lse = torch.logsumexp(logits, dim=-1)
    per_token = per_token + z_loss * lse.square() * (labels != ignore_index)
    return _reduce(per_token, labels, ignore_index, reduction)


# ----------------------------------------------------------------------------- chunk kernels


@triton_kernel
def _ce_stats_kernel(LOGITS, LABELS, MAX, SUMEXP, TARGET, stride, V, vocab_start,
                     BLOCK: tl.constexpr):
    """Per row of fp32 logits (n, V): running max, sum exp(x - max), and the target logit if local."""
    row = tl.program_id(0).to(tl.int64)  # row * stride passes 2^31 for large chunks
    base = LOGITS + row * stride
    m = float("-inf")
    s = 0.0
    for off in range(0, V, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf"))
        new_m = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - new_m) + tl.sum(tl.exp(x - new_m), axis=0)
        m = new_m
    label = tl.load(LABELS + row) - vocab_start
    is_local = (label >= 0) & (label < V)
    target = tl.load(base + tl.where(is_local, label, 0), mask=is_local, other=0.0)
    tl.store(MAX + row, m)
    tl.store(SUMEXP + row, s)
    tl.store(TARGET + row, tl.where(is_local, target, 0.0))


@triton_kernel
def _ce_grad_kernel(LOGITS, LABELS, LSE, SCALE, stride, V, vocab_start, z_loss,
                    BLOCK: tl.constexpr):
    """Overwrite fp32 logits (n, V) with dloss/dlogits = scale * ((1 + 2 z lse) softmax - onehot)."""
    row = tl.program_id(0).to(tl.int64)  # row * stride passes 2^31 for large chunks
    base = LOGITS + row * stride
    lse = tl.load(LSE + row)
    scale = tl.load(SCALE + row)
    label = tl.load(LABELS + row) - vocab_start
    coef = scale * (1.0 + 2.0 * z_loss * lse)
    for off in range(0, V, BLOCK):
        cols = off + tl.arange(0, BLOCK)
        mask = cols < V
        x = tl.load(base + cols, mask=mask, other=0.0)
        g = tl.exp(x - lse) * coef - tl.where(cols == label, scale, 0.0)
        tl.store(base + cols, g, mask=mask)


def _stats_torch(logits, labels, vocab_start):
    v = logits.shape[1]
    m = logits.max(dim=1).values
    s = (logits - m[:, None]).exp_().sum(dim=1)
    local = (labels >= vocab_start) & (labels < vocab_start + v)
    idx = (labels - vocab_start).clamp(0, v - 1)
    target = logits.gather(1, idx[:, None]).squeeze(1) * local
    return m, s, target


def _grad_torch_(logits, labels, vocab_start, lse, scale, z_loss):
    v = logits.shape[1]
    logits.sub_(lse[:, None]).exp_().mul_((scale * (1.0 + 2.0 * z_loss * lse))[:, None])
    local = (labels >= vocab_start) & (labels < vocab_start + v)
    idx = (labels - vocab_start).clamp(0, v - 1)
    logits.scatter_add_(1, idx[:, None], -(scale * local)[:, None])
    return logits


def _stats_triton(logits, labels, vocab_start):
    n, v = logits.shape
    m, s, target = (torch.empty(n, dtype=torch.float32, device=logits.device) for _ in range(3))
    _ce_stats_kernel[(n,)](logits, labels, m, s, target, logits.stride(0), v, vocab_start,
                           BLOCK=min(4096, next_pow2(v)))
    return m, s, target


def _grad_triton_(logits, labels, vocab_start, lse, scale, z_loss):
    n, v = logits.shape
    _ce_grad_kernel[(n,)](logits, labels, lse.contiguous(), scale.contiguous(), logits.stride(0), v,
                          vocab_start, float(z_loss), BLOCK=min(4096, next_pow2(v)))
    return logits


_BACKENDS = {"torch": (_stats_torch, _grad_torch_), "triton": (_stats_triton, _grad_triton_)}


# ----------------------------------------------------------------------------- chunked pass


def _chunked_pass(hidden, weight, labels, ignore_index, group, z_loss, chunk_rows, backend,
                  grad_scale, need_dh, need_dw):
    """Loss per token (N,) fp32 and, where grad_scale (N,) is given, dhidden and dweight.

    grad_scale[i] multiplies token i's gradient (1/n_valid for mean, the incoming per-token
    gradient for "none"); ignored tokens must already have scale 0.
    """
    stats, grad_ = _BACKENDS[backend]
    n, v_local = hidden.shape[0], weight.shape[0]
    tp = group is not None and dist.get_world_size(group) > 1
    vocab_start = dist.get_rank(group) * v_local if tp else 0
    valid = labels != ignore_index
    loss = torch.empty(n, dtype=torch.float32, device=hidden.device)
    dh = torch.empty_like(hidden) if grad_scale is not None and need_dh else None
    dw32 = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            if grad_scale is not None and need_dw else None)
    for s in range(0, n, chunk_rows):
        e = min(s + chunk_rows, n)
        h_c, y_c = hidden[s:e], labels[s:e]
        logits = (h_c @ weight.t()).float()  # (n_c, V_local): the only vocab-sized buffer
        m, sum_exp, target = stats(logits, y_c, vocab_start)
        if tp:  # combine the shards' partial softmax statistics (Megatron's vocab-parallel CE)
            m_all = m.clone()
            dist.all_reduce(m_all, op=dist.ReduceOp.MAX, group=group)
            sum_exp = sum_exp * (m - m_all).exp()
            m = m_all
            dist.all_reduce(sum_exp, group=group)
            dist.all_reduce(target, group=group)
        lse = sum_exp.log() + m
        loss[s:e] = (lse - target + z_loss * lse * lse) * valid[s:e]
        if grad_scale is None:
            continue
        dlogits = grad_(logits, y_c, vocab_start, lse, grad_scale[s:e], z_loss)
        if dh is not None:
            dh[s:e] = dlogits.to(weight.dtype) @ weight
        if dw32 is not None:
            if weight.dtype == torch.float32:
                dw32.addmm_(dlogits.t(), h_c)
            else:  # low-precision GEMM, fp32 accumulation across chunks
                dw32 += (dlogits.t().to(weight.dtype) @ h_c).float()
    if dh is not None and tp:
        dist.all_reduce(dh, group=group)  # every rank's vocab shard contributes to dhidden
    dw = dw32.to(weight.dtype) if dw32 is not None else None
    return loss, dh, dw


class _ChunkedLinearCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, group, z_loss, chunk_rows,
                backend):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        valid = labels != ignore_index
        ctx.args = (ignore_index, group, z_loss, chunk_rows, backend)
        ctx.reduction = reduction
        grad_scale = None
        if reduction != "none" and (need_dh or need_dw):
            denom = valid.sum().clamp(min=1).float() if reduction == "mean" else 1.0
            grad_scale = valid.float() / denom
        loss, dh, dw = _chunked_pass(hidden, weight, labels, *ctx.args, grad_scale, need_dh, need_dw)
        if reduction == "none":
            ctx.save_for_backward(hidden, weight, labels)
        else:
            ctx.save_for_backward(dh, dw)
        return _reduce(loss, labels, ignore_index, reduction)

    @staticmethod
    def backward(ctx, grad_out):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if ctx.reduction == "none":
            hidden, weight, labels = ctx.saved_tensors
            grad_scale = grad_out.float() * (labels != ctx.args[0])
            _, dh, dw = _chunked_pass(hidden, weight, labels, *ctx.args, grad_scale, need_dh, need_dw)
        else:
            dh, dw = ctx.saved_tensors
            if not bool((grad_out == 1).all()):  # skip a (V, H) temporary in the usual case
                dh = dh * grad_out.to(dh.dtype) if dh is not None else None
                dw = dw * grad_out.to(dw.dtype) if dw is not None else None
        return dh, dw, None, None, None, None, None, None, None


# fp32 logits held per chunk. Liger's "about ceil(V/H) chunks" gives 1-2 rows per chunk at
# V = 151,936 and H = 64..896, and every chunk re-reads the (V, H) weight and its fp32 gradient:
# 6-7x slower than full logits on CPU at 256 tokens (benchmarks/RESULTS.md). A byte budget keeps
# chunks a few hundred rows long (220 rows at V = 151,936) while still never allocating more than
# this per chunk.
CHUNK_LOGITS_BYTES = 128 * 2**20


def default_chunk_rows(n: int, hidden: int, vocab_local: int) -> int:
    """Rows per chunk so that one chunk of fp32 logits stays within CHUNK_LOGITS_BYTES."""
    del hidden  # the budget is on the vocabulary-sized buffer alone
    return max(1, min(n, CHUNK_LOGITS_BYTES // (4 * vocab_local)))


def linear_cross_entropy_chunked(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    tp_group: dist.ProcessGroup | None = None,
    z_loss: float = 0.0,
    chunk_rows: int | None = None,
    backend: str = "torch",
) -> torch.Tensor:
    """Same contract as `linear_cross_entropy_ref`, holding at most (chunk_rows, V_local) logits."""
    _check_inputs(hidden, weight, labels, reduction)
    if backend not in _BACKENDS:
        raise ValueError(f"linear_cross_entropy_chunked: backend must be one of {list(_BACKENDS)}, "
                         f"got {backend!r}")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"linear_cross_entropy_chunked: chunk_rows must be >= 1, got {chunk_rows}")
    rows = chunk_rows or default_chunk_rows(hidden.shape[0], hidden.shape[1], weight.shape[0])
    if not torch.is_grad_enabled() or not (hidden.requires_grad or weight.requires_grad):
        # evaluation: the loss alone (the autograd path computes gradients during its forward)
        loss, _, _ = _chunked_pass(hidden, weight, labels, ignore_index, tp_group, float(z_loss), rows,
                                   backend, None, False, False)
        return _reduce(loss, labels, ignore_index, reduction)
    return _ChunkedLinearCE.apply(hidden.contiguous(), weight, labels.contiguous(), ignore_index,
                                  reduction, tp_group, float(z_loss), rows, backend)


def linear_cross_entropy_triton(hidden, weight, labels, ignore_index=IGNORE_INDEX, reduction="mean",
                                tp_group=None, z_loss=0.0, chunk_rows=None):
    """Chunked linear + CE with the per-chunk softmax and gradient in Triton."""
    return linear_cross_entropy_chunked(hidden, weight, labels, ignore_index, reduction, tp_group,
                                        z_loss, chunk_rows, backend="triton")


class LossParts(NamedTuple):
    """A loss as the pieces any split reduces exactly: summed over valid tokens, and their count.

    Micro-batches, data-parallel ranks, pipeline stages and sequence shards each add their `sum` and
    `count`; the mean is taken once, at the end, over everything (ignored and padding tokens never
    weigh in). `mean()` is that division for a single piece.
    """

    sum: torch.Tensor
    """fp32 scalar: per-token cross-entropy summed over tokens whose label is not ignored."""
    count: torch.Tensor
    """int64 scalar: number of such tokens."""

    def mean(self) -> torch.Tensor:
        return self.sum / self.count.clamp(min=1)


class LMLoss(nn.Module):
    """LM head + cross-entropy as a module (no parameters): (N, H) hidden, (V, H) head -> LossParts.

    `ce` is a `linear_cross_entropy_*` implementation. With `tp_group` the head is this rank's
    vocabulary shard and the loss is vocab-parallel (logits never gathered); a plan installs that
    version by replacing the model's loss module, so the model itself never names a group.
    """

    def __init__(self, ce, tp_group: dist.ProcessGroup | None = None, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        if tp_group is not None and "tp_group" not in inspect.signature(ce).parameters:
            raise ValueError(f"cross-entropy kernel {getattr(ce, '__name__', ce)!r} takes no tp_group; "
                             "tensor parallelism needs a vocab-parallel loss")
        self.ce = ce
        self.tp_group = tp_group
        self.ignore_index = ignore_index

    def forward(self, hidden_NH: torch.Tensor, weight_VH: torch.Tensor, labels_N: torch.Tensor) -> LossParts:
        kw = {"tp_group": self.tp_group} if self.tp_group is not None else {}
        total = self.ce(hidden_NH, weight_VH, labels_N, ignore_index=self.ignore_index, reduction="sum", **kw)
        return LossParts(total, (labels_N != self.ignore_index).sum())

    def per_token(self, hidden_NH: torch.Tensor, weight_VH: torch.Tensor,
                  labels_N: torch.Tensor) -> torch.Tensor:
        """(N,) cross-entropy of each row (0 where the label is ignored), same kernel and vocab split."""
        kw = {"tp_group": self.tp_group} if self.tp_group is not None else {}
        return self.ce(hidden_NH, weight_VH, labels_N, ignore_index=self.ignore_index, reduction="none", **kw)
