"""Data parallelism, applied last (after TP/SP, recompute, compile): DDP, ZeRO-1 and FSDP2 over dp.

  ddp    DistributedDataParallel over the dp group, gradients all-reduced in buckets during backward.
  zero1  DDP for gradients + `ZeroRedundancyOptimizer`: each dp rank keeps the optimizer state of
         its share of the parameters, steps it, and broadcasts the updated parameters. With expert
         parallelism the experts (different on every rank of an ep group) get their own ZeRO-1 over
         the expert-data-parallel group (`ExpertZero1`), the other parameters keep the dp one.
  fsdp   FSDP2 `fully_shard` on every decoder layer and on the root (ZeRO-3-like: parameters,
         gradients and optimizer state sharded over dp, layers all-gathered just in time).
DeepSpeed, the alternative engine, lives in `deepspeed_engine.py`.

With tp > 1 the wrapped parameters are TP-local shards, so every wrapper only ever talks to the
dp group: TP and DP reductions are over disjoint groups and commute.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from megaqwen.parallel.dims import ParallelMesh

log = logging.getLogger(__name__)

DP_MODES = ("ddp", "zero1", "fsdp")


def dp_reduce_mesh(mesh: ParallelMesh) -> DeviceMesh:
    """Ranks that hold the same parameters and average gradients: dp, times cp when cp > 1."""
    if mesh.dims.cp == 1:
        return mesh.mesh["dp"]
    return mesh.mesh["dp", "cp"]._flatten("dp_cp")


def apply_fsdp(model: nn.Module, mesh: ParallelMesh, layers: nn.ModuleDict,
               reshard_after_forward: bool = True, mp_param_dtype: torch.dtype | None = None,
               keep_gathered: bool = False) -> nn.Module:
    """FSDP2 in place: every block in `layers`, then the root. Works on the meta device (apply it
    before materialising). `mp_param_dtype` (e.g. bf16) is the dtype parameters are all-gathered
    and computed in; gradients are reduced in fp32 and the sharded fp32 parameters stay the
    optimizer's master weights. `keep_gathered`: no unit is freed after forward, and the step's
    micro-batches keep them gathered (`fsdp_step.microbatch_sync`); layers prefetch one ahead."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from megaqwen.parallel.fsdp_step import set_prefetch

    reshard_after_forward = reshard_after_forward and not keep_gathered

    dp_mesh = dp_reduce_mesh(mesh)
    if dp_mesh.size() == 1:
        log.info("dp=1: no FSDP sharding")
        return model
    mp = MixedPrecisionPolicy(param_dtype=mp_param_dtype, reduce_dtype=torch.float32)
    blocks = list(layers.values())
    for i, layer in enumerate(blocks):
        # the last layer is resharded by the root right after anyway
        fully_shard(layer, mesh=dp_mesh, mp_policy=mp,
                    reshard_after_forward=reshard_after_forward and i < len(blocks) - 1)
    fully_shard(model, mesh=dp_mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    set_prefetch(blocks)
    return model


def wrap_ddp(model: nn.Module, mesh: ParallelMesh, bucket_cap_mb: float = 25.0) -> nn.Module:
    """DistributedDataParallel over the dp (x cp) group, for materialised weights (DDP broadcasts
    rank 0's values on construction, so it is the one wrapper applied after initialisation)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    dp_mesh = dp_reduce_mesh(mesh)
    if dp_mesh.size() == 1:
        return model
    device_ids = [torch.cuda.current_device()] if dp_mesh.device_type == "cuda" else None
    return DDP(model, process_group=dp_mesh.get_group(), bucket_cap_mb=bucket_cap_mb,
               device_ids=device_ids)  # no buffers to broadcast (RoPE tables are built per batch)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model under a DDP wrapper (FSDP2 and TP modify the model in place)."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def build_optimizer(params: Iterable[Any], mesh: ParallelMesh, mode: str,
                    optimizer_class: type[torch.optim.Optimizer] = torch.optim.AdamW,
                    expert_params: set[int] | None = None, edp_group: dist.ProcessGroup | None = None,
                    **kwargs: Any) -> torch.optim.Optimizer:
    """`optimizer_class(params, **kwargs)`, or its ZeRO-1 sharded form when mode == "zero1".
    `params` are tensors or param-group dicts, as for any torch optimizer. Under expert parallelism
    (`expert_params`: ids of this rank's expert parameters, `edp_group`: the ranks holding the same
    experts) ZeRO-1 is `ExpertZero1`: experts sharded over edp, the rest over dp (x cp)."""
    dp_mesh = dp_reduce_mesh(mesh)
    if mode == "zero1" and dp_mesh.size() > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        if expert_params:
            return ExpertZero1(params, expert_params, dp_mesh.get_group(), edp_group, optimizer_class,
                               **kwargs)
        return ZeroRedundancyOptimizer(params, optimizer_class=optimizer_class,
                                       process_group=dp_mesh.get_group(), **kwargs)
    return optimizer_class(params, **kwargs)


class LocalOptimizers:
    """The optimizers that hold state on this rank, as one (what a checkpoint saves per rank and
    `_init_optim_state` steps): ZeRO-1's local optimizer of the dense shard, then the experts'."""

    def __init__(self, dense: torch.optim.Optimizer, experts: torch.optim.Optimizer):
        self.parts = {"dense": dense, "experts": experts}

    @property
    def state(self) -> dict:
        return {p: s for o in self.parts.values() for p, s in o.state.items()}

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.parts.values() for g in o.param_groups]

    def step(self, closure=None) -> None:
        for o in self.parts.values():
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.parts.values():
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {k: o.state_dict() for k, o in self.parts.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, o in self.parts.items():
            o.load_state_dict(state[k])


class ExpertZero1(torch.optim.Optimizer):
    """ZeRO-1 for a model with expert parallelism: one `ZeroRedundancyOptimizer` over the dp (x cp)
    group for the parameters every dp rank holds alike, another over the expert-data-parallel group
    for this rank's experts (a plain optimizer when edp = 1). A single ZeRO over dp would broadcast
    rank r's updated expert 0 into the slot of rank r+1's expert 4. Hyperparameters (`lr`) are set
    on this optimizer's groups, as for any optimizer, and copied into both parts at each step.
    `optim` is this rank's state (`LocalOptimizers`; what checkpoints save per rank)."""

    def __init__(self, params: Iterable[Any], expert_params: set[int], dp_group: dist.ProcessGroup,
                 edp_group: dist.ProcessGroup | None, optimizer_class: type[torch.optim.Optimizer],
                 **kwargs: Any):
        from torch.distributed.optim import ZeroRedundancyOptimizer

        groups = [dict(g) if isinstance(g, dict) else {"params": [g]} for g in params]
        super().__init__(groups, dict(kwargs))
        split: dict[str, tuple[list[dict], list[int]]] = {"dense": ([], []), "experts": ([], [])}
        for i, g in enumerate(self.param_groups):
            for part, keep in (("dense", False), ("experts", True)):
                ps = [p for p in g["params"] if (id(p) in expert_params) is keep]
                if ps:  # an empty group would trip ZeRO's partitioning
                    split[part][0].append({**{k: v for k, v in g.items() if k != "params"}, "params": ps})
                    split[part][1].append(i)
        self.dense = ZeroRedundancyOptimizer(split["dense"][0], optimizer_class=optimizer_class,
                                             process_group=dp_group, **kwargs)
        edp = dist.get_world_size(edp_group) if edp_group is not None else 1
        self.experts = (ZeroRedundancyOptimizer(split["experts"][0], optimizer_class=optimizer_class,
                                                process_group=edp_group, **kwargs) if edp > 1
                        else optimizer_class(split["experts"][0], **kwargs))
        self._links = [(self.dense, split["dense"][1]), (self.experts, split["experts"][1])]
        self.optim = LocalOptimizers(self.dense.optim, getattr(self.experts, "optim", self.experts))

    @torch.no_grad()
    def step(self, closure=None):
        for opt, parents in self._links:
            for child, i in zip(opt.param_groups, parents):
                child.update({k: v for k, v in self.param_groups[i].items() if k != "params"})
            opt.step()

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard only (each rank saves its own, as for ZeroRedundancyOptimizer.optim)."""
        return self.optim.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.optim.load_state_dict(state_dict)
