"""torchao's float8 linear over our tensor-parallel local shards (see megaqwen/train/fp8.py).

Our TP keeps plain local tensors and its own paired collectives around each TP region
(`megaqwen.parallel.tensor_parallel.tp_region`). For the FP8 GEMM alone the local pieces are viewed
as DTensors over the tp mesh, so torchao computes every amax over the whole tensor (DTensor reduces
the partial maxima) and picks the scale one process would pick:

  column-parallel  x (B, T, H) Replicate   @ W (N/tp, H) Shard(0) -> y (B, T, N/tp) Shard(-1)
  row-parallel     x (B, T, K/tp) Shard(-1) @ W (H, K/tp) Shard(1) -> y (B, T, H) Partial(sum)

No collective on the activations is added: the column input's gradient leaves as this rank's
partial sum (the region's copy_to_tp all-reduces it), the row output leaves as a partial sum (the
region's reduce_from_tp / reduce_scatter_to_sp sums it) and its gradient arrives replicated.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from megaqwen.parallel.collectives import copy_to_tp


class _LocalAsDTensor(torch.autograd.Function):
    """Forward: the local tensor as a DTensor with `placement` (no communication). Backward: the
    gradient's local tensor as it is (a Partial sum stays partial: the TP region reduces it)."""

    @staticmethod
    def forward(ctx, x, mesh, placement):
        return DTensor.from_local(x, mesh, [placement], run_check=False)

    @staticmethod
    def backward(ctx, grad):
        return (grad.to_local() if isinstance(grad, DTensor) else grad), None, None


def _float8_linear_cls():
    from torchao.float8.float8_linear import Float8Linear

    return Float8Linear


class Float8TPLinear(_float8_linear_cls()):
    """torchao `Float8Linear` whose weight is this rank's column (shard_dim 0) or row (shard_dim 1)
    piece; parameters and their names are those of the LocalLinear it replaces."""

    tp_mesh = None
    shard_dim = 0
    grad_group = None

    @classmethod
    def from_local(cls, mod: nn.Linear, config, tp_mesh, shard_dim: int) -> Float8TPLinear:
        new = cls.from_float(mod, config=config)
        new.tp_mesh, new.shard_dim = tp_mesh, shard_dim
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torchao.float8.float8_linear import matmul_with_hp_or_float8_args

        if torch.is_autocast_enabled():  # as torchao's Float8Linear: the CUDA autocast dtype
            x = x.to(torch.get_autocast_gpu_dtype())
        w, b = self.weight, self.bias
        if self.grad_group is not None:  # KV piece replicated over tp ranks: weight grads summed
            w = copy_to_tp(w, self.grad_group)
            b = copy_to_tp(b, self.grad_group) if b is not None else None
        column = self.shard_dim == 0
        x_d = _LocalAsDTensor.apply(x, self.tp_mesh, Replicate() if column else Shard(x.dim() - 1))
        w_d = DTensor.from_local(w, self.tp_mesh, [Shard(self.shard_dim)], run_check=False)
        y_d = matmul_with_hp_or_float8_args.apply(x_d, w_d.t(), self.linear_mm_config, self.config)
        y = y_d.to_local(grad_placements=[Shard(y_d.dim() - 1) if column else Replicate()])
        return y + b.to(y.dtype) if b is not None else y
