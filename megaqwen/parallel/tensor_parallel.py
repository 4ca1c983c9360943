"""Megatron-style tensor (+ sequence) parallel building blocks over plain local-shard tensors.

A model's plan (e.g. `megaqwen/models/qwen2/parallelize.py`) uses these to rewrite the model in
place; nothing here names a model's modules. Each replacement keeps the parameter's name (FQN) and
records where the local piece sits in the full tensor in the run's `ShardMap`:

  column_parallel   nn.Linear -> LocalLinear keeping output rows [start, start + length) (+ bias)
  row_parallel      nn.Linear -> LocalLinear keeping input columns [start, start + length)
  VocabParallelEmbedding  rows [vocab_start, ...) of the table; lookups outside are zero and the
                    partial embeddings are summed over TP (SP: reduce-scattered onto sequence shards)
  SequenceParallelRMSNorm norm on (B, T/tp, H) shards; weight grads all-reduced over TP; optionally
                    all-gathers its output for a consumer that needs the full sequence (the LM head)
  tp_region         hooks making a module a TP region: its input enters through copy_to_tp (SP:
                    gather_from_sp) and its output leaves through reduce_from_tp (SP:
                    reduce_scatter_to_sp), so q/k/v (gate/up) share one backward all-reduce.

Plans run on the meta device as well as on real tensors: slicing a meta weight allocates nothing.
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from megaqwen.parallel.collectives import (
    copy_to_tp,
    gather_from_sp,
    gather_from_sp_split_grad,
    reduce_from_tp,
    reduce_scatter_to_sp,
)
from megaqwen.parallel.shards import ShardMap, TensorShard


class LocalLinear(nn.Linear):
    """`nn.Linear` over a local shard. With `grad_group`, weight/bias grads are summed over that group
    (ranks holding replicas of the same shard, e.g. a KV head at tp > num_kv_heads)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None,
                 grad_group: dist.ProcessGroup | None = None):
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias) if bias is not None else None
        self.grad_group = grad_group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w, b = self.weight, self.bias
        if self.grad_group is not None:
            w = copy_to_tp(w, self.grad_group)
            b = copy_to_tp(b, self.grad_group) if b is not None else None
        return F.linear(x, w, b)


class VocabParallelEmbedding(nn.Embedding):
    """Rows [vocab_start, vocab_start + V_local) of the table; partial lookups summed over TP."""

    def __init__(self, weight: torch.Tensor, vocab_start: int, group: dist.ProcessGroup,
                 sequence_parallel: bool):
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = weight.shape
        self.padding_idx, self.max_norm, self.norm_type = None, None, 2.0
        self.scale_grad_by_freq, self.sparse = False, False
        self.weight = nn.Parameter(weight)
        self.vocab_start = vocab_start
        self.group = group
        self.sequence_parallel = sequence_parallel

    def forward(self, ids_BT: torch.Tensor) -> torch.Tensor:
        local = (ids_BT >= self.vocab_start) & (ids_BT < self.vocab_start + self.num_embeddings)
        idx = (ids_BT - self.vocab_start).masked_fill(~local, 0)
        partial = F.embedding(idx, self.weight) * local[..., None].to(self.weight.dtype)  # (B, T, H)
        if self.sequence_parallel:
            if partial.shape[1] % dist.get_world_size(self.group):
                raise ValueError(f"sequence parallel: seq_len={partial.shape[1]} is not divisible by "
                                 f"tp={dist.get_world_size(self.group)}")
            return reduce_scatter_to_sp(partial, self.group, dim=1)  # (B, T/tp, H)
        return reduce_from_tp(partial, self.group)


class SequenceParallelRMSNorm(nn.Module):
    """RMSNorm over sequence shards (B, T/tp, H). Each rank's weight grad covers its T/tp tokens, so
    the weight enters through copy_to_tp (all-reduce in backward). With `gather_output` the output
    is all-gathered to (B, T, H) and backward keeps this rank's slice (for a consumer that
    all-reduces its input grad itself, as the vocab-parallel loss does)."""

    def __init__(self, weight: nn.Parameter, eps: float, rms_norm, group: dist.ProcessGroup,
                 gather_output: bool = False):
        super().__init__()
        self.weight = weight
        self.eps = eps
        self.rms_norm = rms_norm
        self.group = group
        self.gather_output = gather_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rms_norm(x, copy_to_tp(self.weight, self.group), self.eps)
        return gather_from_sp_split_grad(out, self.group, dim=1) if self.gather_output else out


def tp_region(module: nn.Module, group: dist.ProcessGroup, sequence_parallel: bool) -> None:
    """Make `module` a TP region: its first positional input enters, its output leaves, through
    paired collectives (module-level hooks: parameter names unchanged)."""
    enter = functools.partial(gather_from_sp, dim=1) if sequence_parallel else copy_to_tp
    leave = functools.partial(reduce_scatter_to_sp, dim=1) if sequence_parallel else reduce_from_tp

    def pre(mod, args):
        if not args:
            raise TypeError(f"{type(mod).__name__}: a TP region takes its activation as the first "
                            "positional argument")
        return (enter(args[0], group), *args[1:])

    module.register_forward_pre_hook(pre)
    module.register_forward_hook(lambda _mod, _args, out: leave(out, group))


def check_linear_backend(backend: str) -> str:
    """`torch` (ours) | `te` (Transformer Engine's Linear as the local GEMM, our collectives around it)."""
    if backend not in ("torch", "te"):
        raise ValueError(f"parallel.tp_linear_backend must be torch|te, got {backend!r}")
    if backend == "te":
        try:
            import transformer_engine.pytorch  # noqa: F401
        except ImportError as e:
            raise ValueError("parallel.tp_linear_backend=te needs transformer-engine installed "
                             f"(GPU extra): {e}") from e
    return backend


def _local_linear(w: torch.Tensor, b: torch.Tensor | None, backend: str,
                  grad_group: dist.ProcessGroup | None) -> nn.Module:
    if backend == "te" and grad_group is None:
        import transformer_engine.pytorch as te  # optional GPU extra; see check_linear_backend

        mod = te.Linear(w.shape[1], w.shape[0], bias=b is not None, params_dtype=w.dtype, device=w.device)
        with torch.no_grad():
            mod.weight.copy_(w)
            if b is not None:
                mod.bias.copy_(b)
        return mod
    return LocalLinear(w.clone(), b.clone() if b is not None else None, grad_group)


def column_parallel(parent: nn.Module, name: str, fqn: str, shards: ShardMap, start: int, length: int,
                    replicas: int = 1, grad_group: dist.ProcessGroup | None = None,
                    backend: str = "torch") -> None:
    """Replace `parent.<name>` (an nn.Linear at `fqn`) by output rows [start, start + length)."""
    src: nn.Linear = getattr(parent, name)
    rows = slice(start, start + length)
    w = src.weight.detach()[rows]
    b = src.bias.detach()[rows] if src.bias is not None else None
    setattr(parent, name, _local_linear(w, b, backend, grad_group))
    shards.add(f"{fqn}.weight", TensorShard(tuple(src.weight.shape), 0, start, length, replicas))
    if src.bias is not None:
        shards.add(f"{fqn}.bias", TensorShard(tuple(src.bias.shape), 0, start, length, replicas))


def row_parallel(parent: nn.Module, name: str, fqn: str, shards: ShardMap, start: int, length: int,
                 backend: str = "torch") -> None:
    """Replace `parent.<name>` (an nn.Linear at `fqn`, no bias) by input columns [start, start + length)."""
    src: nn.Linear = getattr(parent, name)
    if src.bias is not None:
        raise ValueError(f"{fqn}: row-parallel linear with a bias is not supported")
    w = src.weight.detach()[:, start:start + length]
    setattr(parent, name, _local_linear(w, None, backend, None))
    shards.add(f"{fqn}.weight", TensorShard(tuple(src.weight.shape), 1, start, length))


def vocab_parallel_embedding(parent: nn.Module, name: str, fqn: str, shards: ShardMap, start: int,
                             length: int, group: dist.ProcessGroup, sequence_parallel: bool) -> None:
    src: nn.Embedding = getattr(parent, name)
    w = src.weight.detach()[start:start + length].clone()
    setattr(parent, name, VocabParallelEmbedding(w, start, group, sequence_parallel))
    shards.add(f"{fqn}.weight", TensorShard(tuple(src.weight.shape), 0, start, length))


def even_block(n: int, tp: int, rank: int) -> tuple[int, int]:
    """(start, length) of rank's contiguous 1/tp block of n items (n divisible by tp)."""
    return rank * n // tp, n // tp
