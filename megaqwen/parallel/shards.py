"""Shard metadata, declared once: where each rank's piece of a parameter sits in the full tensor.

Plans record a `TensorShard` per tensor-parallel parameter in the run's `ShardMap`; checkpointing
(DCP descriptions of local shards), the global grad norm, initialisation and sharded loading all
read it from there. Parameters absent from the map are whole on every TP rank (norm weights).
FSDP2's further dp split is not recorded: it lives in the DTensor FSDP makes of each parameter.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from megaqwen.parallel.dims import ParallelMesh


@dataclass(frozen=True)
class TensorShard:
    full_shape: tuple[int, ...]
    """Shape of the unsharded parameter."""
    dim: int
    """Dimension split over the tp group."""
    start: int
    """Index along `dim` in the full tensor where this rank's piece starts."""
    length: int
    """Extent of this rank's piece along `dim`."""
    replicas: int = 1
    """TP ranks holding an identical piece (> 1 for KV heads replicated when tp > num_kv_heads)."""

    def box(self) -> list[tuple[int, int]]:
        """Per dimension, [start, stop) of this piece in the full tensor."""
        b = [(0, n) for n in self.full_shape]
        b[self.dim] = (self.start, self.start + self.length)
        return b


@dataclass
class ShardMap:
    """FQN (as in the plain model) -> TensorShard, with the mesh the pieces are spread over."""

    mesh: ParallelMesh | None = None
    """The run's mesh; None in a single process."""
    shards: dict[str, TensorShard] = field(default_factory=dict)
    """Tensor-parallel parameters only."""
    extra_copies: dict[str, int] = field(default_factory=dict)
    """FQN -> pipeline ranks holding the same tensor (a tied embedding on the first and last stage)."""
    pp_views: list = field(default_factory=list)
    """Under pipelining: this rank's stage modules (`megaqwen.parallel.pipeline.StageModule`)."""
    expert_fqns: set[str] = field(default_factory=set)
    """MoE: the routed-expert parameters this rank holds (all of them at ep=1)."""
    ep_groups: Any = None
    """MoE: `megaqwen.parallel.expert_parallel.EPGroups` (ep and expert-data-parallel groups)."""

    def add(self, fqn: str, shard: TensorShard) -> None:
        if fqn in self.shards:
            raise ValueError(f"{fqn}: sharded twice")
        self.shards[fqn] = shard

    def get(self, fqn: str) -> TensorShard | None:
        return self.shards.get(fqn)

    def __iter__(self) -> Iterator[tuple[str, TensorShard]]:
        return iter(self.shards.items())

    @property
    def tp(self) -> int:
        return self.mesh.dims.tp if self.mesh is not None else 1

    def tp_copies(self, fqn: str) -> int:
        """TP ranks holding the same values as this rank's piece of `fqn`."""
        shard = self.shards.get(fqn)
        return shard.replicas if shard is not None else self.tp

    def pp_copies(self, fqn: str) -> int:
        """Pipeline ranks holding the same tensor as this rank's `fqn` (1 but for a tied embedding)."""
        return self.extra_copies.get(fqn, 1)

    def box(self, fqn: str, p: torch.Tensor) -> list[tuple[int, int]]:
        """Where this rank's local tensor of parameter `fqn` sits in the full tensor: the TP piece,
        then FSDP2's chunk of it when `p` is a DTensor."""
        shard = self.shards.get(fqn)
        box = shard.box() if shard is not None else [(0, n) for n in p.shape]
        if isinstance(p, DTensor):
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            local_shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
            box = [(a + o, a + o + n) for (a, _), o, n in zip(box, offset, local_shape)]
        return box

    def full_shape(self, fqn: str, p: torch.Tensor) -> tuple[int, ...]:
        shard = self.shards.get(fqn)
        return shard.full_shape if shard is not None else tuple(p.shape)


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """This rank's values of a parameter (FSDP2's DTensors: the local chunk)."""
    return p.to_local() if isinstance(p, DTensor) else p


def local_param_bytes(model: nn.Module) -> int:
    """Bytes of parameters this rank holds (local shards; FSDP DTensors count their local part)."""
    return sum(local_tensor(p).numel() * local_tensor(p).element_size() for p in model.parameters())
