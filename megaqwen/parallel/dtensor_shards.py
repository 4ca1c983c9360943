"""TP-local (and FSDP2-local) tensors described as DTensors of the full tensor, for DCP.

DCP de-duplicates plain tensors that share a key across ranks, so a TP shard is saved as a DTensor
saying where it sits: Shard(tp_shard_dim) over the tp mesh; [Shard(dim), Shard(0)] over (tp, dp)
under FSDP2; [Shard(0), Replicate()] over (kv_shard, kv_replica) for KV heads replicated when
tp > KV heads. Shared by both engines' checkpointing (`checkpoint`, `deepspeed_checkpoint`).
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from megaqwen.parallel.dims import ParallelMesh
from megaqwen.parallel.shards import ShardMap


def _shard_mesh(mesh: ParallelMesh, reps: int, fsdp: bool) -> DeviceMesh:
    """Mesh over which a TP-sharded tensor is described, reusing (or making) the groups:
    tp | (kv_shard, kv_replica) when KV heads are replicated, each followed by dp under FSDP2."""
    coord = mesh.mesh.get_coordinate()
    pp, dp, cp = coord[0], coord[1], coord[2]
    ranks = mesh.mesh.mesh[pp, :, cp, :].T  # (tp, dp) global ranks
    if not fsdp:
        ranks = ranks[:, dp]
    if reps == 1:
        groups, names = [mesh.tp_group], ["tp"]
    else:
        tp = mesh.dims.tp
        ranks = ranks.reshape(tp // reps, reps, *ranks.shape[1:])
        groups = [mesh.tp_subgroup(reps, strided=True), mesh.tp_subgroup(reps)]
        names = ["kv_shard", "kv_replica"]
    if fsdp:
        groups, names = [*groups, mesh.dp_group], [*names, "dp"]
    return DeviceMesh.from_group(groups, mesh.mesh.device_type, mesh=ranks, mesh_dim_names=tuple(names))


def param_tags(shards: ShardMap | None) -> dict[str, tuple[int, int]]:
    """FQN -> (sharded dim, replicas) of every TP-sharded parameter (none without TP)."""
    if shards is None or shards.tp == 1:
        return {}
    return {fqn: (sh.dim, sh.replicas) for fqn, sh in shards}


class DTensorWrapper:
    """Describes TP-local (and FSDP-local) tensors as DTensors of the full tensor; caches meshes."""

    def __init__(self, mesh: ParallelMesh):
        self.mesh = mesh
        self._meshes: dict[tuple[int, bool], DeviceMesh] = {}

    def __call__(self, t: torch.Tensor, dim: int, reps: int) -> torch.Tensor:
        fsdp = isinstance(t, DTensor)  # FSDP2: Shard(0) of the TP-local tensor over dp
        key = (reps, fsdp)
        if key not in self._meshes:
            self._meshes[key] = _shard_mesh(self.mesh, reps, fsdp)
        placements = [Shard(dim)] + ([Replicate()] if reps > 1 else []) + ([Shard(0)] if fsdp else [])
        full = list(t.shape)
        full[dim] *= self.mesh.dims.tp // reps  # replicas hold the same rows: stored once
        local = t.to_local() if fsdp else t
        return DTensor.from_local(local, self._meshes[key], placements, run_check=False,
                                  shape=torch.Size(full), stride=contiguous_stride(full))


def contiguous_stride(shape: list[int]) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(shape):
        stride.append(acc)
        acc *= s
    return tuple(reversed(stride))
