"""LM-head matmul fused with cross-entropy, plain-PyTorch references.

`linear_cross_entropy_ref` materialises the (N, V) logits in fp32. With `tp_group` the weight is
this rank's vocabulary shard (rows [rank * V_local, (rank + 1) * V_local)) and the loss is computed
Megatron-style without gathering logits: the row max, the target logit and the sum of exponentials
are all-reduced over the group. The returned loss and every gradient equal the unsharded version;
the gradient of `hidden` is all-reduced over the group inside, so callers need no extra region.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

IGNORE_INDEX = -100


class _AllReduceBackward(torch.autograd.Function):
    """Identity forward, all-reduce (sum) backward: replicated input feeding a sharded matmul."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token loss from vocab-sharded fp32 logits (N, V_local); labels are global ids (N,)."""

    @staticmethod
    def forward(ctx, logits, labels, vocab_start, group, ignore_index):
        vocab_end = vocab_start + logits.shape[-1]
        row_max = logits.max(dim=-1).values
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
        shifted = logits - row_max[:, None]
        local = (labels >= vocab_start) & (labels < vocab_end)
        local_idx = (labels - vocab_start).clamp(0, logits.shape[-1] - 1)
        target = shifted.gather(1, local_idx[:, None]).squeeze(1) * local
        dist.all_reduce(target, group=group)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        dist.all_reduce(sum_exp, group=group)
        valid = labels != ignore_index
        loss = (sum_exp.log() - target) * valid
        ctx.save_for_backward(exp / sum_exp[:, None], local, local_idx, valid)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, local, local_idx, valid = ctx.saved_tensors
        grad = softmax
        grad.scatter_add_(1, local_idx[:, None], -local[:, None].to(grad.dtype))
        grad.mul_((grad_loss * valid)[:, None])
        return grad, None, None, None, None


def vocab_parallel_cross_entropy(logits_local, labels, group, ignore_index=IGNORE_INDEX):
    """Per-token losses (N,) from this rank's (N, V_local) logits; zero where ignored."""
    vocab_start = dist.get_rank(group) * logits_local.shape[-1]
    return _VocabParallelCrossEntropy.apply(logits_local.float(), labels, vocab_start, group,
                                            ignore_index)


def _reduce(per_token: torch.Tensor, labels: torch.Tensor, ignore_index: int, reduction: str):
    if reduction == "sum":
        return per_token.sum()
    if reduction == "mean":
        return per_token.sum() / (labels != ignore_index).sum().clamp(min=1)
    if reduction == "none":
        return per_token
    raise ValueError(f"reduction must be mean|sum|none, got {reduction!r}")


def linear_cross_entropy_ref(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
    tp_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """hidden (N, H), weight (V or V_local, H), labels (N,) -> loss (fp32)."""
    if tp_group is None or dist.get_world_size(tp_group) == 1:
        logits = (hidden @ weight.t()).float()
        return F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)
    hidden = _AllReduceBackward.apply(hidden, tp_group)
    per_token = vocab_parallel_cross_entropy(hidden @ weight.t(), labels, tp_group, ignore_index)
    return _reduce(per_token, labels, ignore_index, reduction)
