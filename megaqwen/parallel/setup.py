"""What the trainer calls to go distributed: process group from torchrun's env, the mesh, the plans.

    env = init_distributed(cfg.parallel, cfg.train.device)            # before anything else
    check_layout(cfg.parallel, env, cfg.model, seq_len, engine)        # fails before any work starts
    model = parallelize(build_model(...), cfg.parallel, env)           # TP/SP, then DDP/FSDP2
    model, optimizer = build_optimizer_or_engine(model, ...)           # or the DeepSpeed engine

A single process (no WORLD_SIZE, or 1) gets no process group and `mesh=None`; every helper then
returns its input unchanged, so the single-device path stays the plain model.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from megaqwen.parallel.config import ParallelConfig
from megaqwen.parallel.data_parallel import DP_MODES, apply_data_parallel
from megaqwen.parallel.dims import ParallelDims, ParallelMesh, resolve_backend
from megaqwen.parallel.metrics import device_peak_flops, mfu, peak_memory_per_rank
from megaqwen.parallel.tensor_parallel import apply_tensor_parallel, check_linear_backend

log = logging.getLogger(__name__)


@dataclass
class DistEnv:
    rank: int
    """Global rank."""
    world_size: int
    """Number of processes."""
    local_rank: int
    """Rank on this node (picks the GPU)."""
    device: torch.device
    """This rank's compute device."""
    dims: ParallelDims
    """Validated degrees (dp inferred)."""
    mesh: ParallelMesh | None
    """Named mesh and groups; None in a single process."""

    @property
    def dp_rank(self) -> int:
        return self.mesh.dp_rank if self.mesh is not None else 0

    @property
    def dp_size(self) -> int:
        return self.dims.dp


def resolve_device(name: str, backend: str | None = None, local_rank: int = 0) -> torch.device:
    """`train.device` (auto | cpu | cuda) -> this rank's device; auto takes CUDA when present."""
    want_cuda = name == "cuda" or (name == "auto" and torch.cuda.is_available())
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but torch.cuda.is_available() is False")
    if backend == "nccl" and not want_cuda:
        raise ValueError(f"parallel.backend=nccl needs train.device=cuda/auto on a GPU, got {name!r}")
    if want_cuda and backend != "gloo":
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_distributed(pcfg: ParallelConfig, device_name: str = "auto") -> DistEnv:
    """Join the torchrun job (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*) and build the mesh; collective."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        dims = ParallelDims.from_config(pcfg, world)  # a wrong world size fails here, before any work
    except ValueError as e:
        if world == 1:
            raise ValueError(f"{e} (a single process was started: launch several with "
                             "launch/torchrun.sh --nproc-per-node N)") from e
        raise
    if pcfg.dp_mode not in DP_MODES:
        raise ValueError(f"parallel.dp_mode={pcfg.dp_mode!r}; choose from {DP_MODES}")
    if world == 1:
        return DistEnv(0, 1, 0, resolve_device(device_name), dims, None)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = resolve_backend(pcfg.backend)
    device = resolve_device(device_name, backend, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    mesh = dims.build_mesh(device.type)
    if rank != 0:  # rank 0 alone writes logs; the others keep warnings and errors
        logging.getLogger("megaqwen").setLevel(logging.WARNING)
    log.info("rank %d/%d on %s (%s): mesh %s", rank, world, device, backend,
             dict(zip(mesh.mesh.mesh_dim_names, mesh.mesh.shape)))
    return DistEnv(rank, world, local_rank, device, dims, mesh)


def _deepspeed_config(pcfg: ParallelConfig, grad_clip: float = 0.0):
    """The DeepSpeed engine's settings from `parallel.*` (validated on construction)."""
    from megaqwen.parallel.deepspeed_engine import DeepSpeedConfig

    return DeepSpeedConfig(stage=pcfg.zero_stage, offload_optimizer=pcfg.offload_optimizer,
                           offload_params=pcfg.offload_params, gradient_clipping=grad_clip)


def check_layout(pcfg: ParallelConfig, env: DistEnv, model_cfg: Any, seq_len: int,
                 engine: str = "native") -> None:
    """Validate the layout (and the DeepSpeed settings with engine=deepspeed) against the model,
    before the model is built."""
    env.dims.validate_model(model_cfg, seq_len=seq_len, sequence_parallel=pcfg.sequence_parallel)
    check_linear_backend(pcfg.tp_linear_backend)
    if engine == "deepspeed":
        _deepspeed_config(pcfg)
        if env.mesh is None:
            raise ValueError("train.engine=deepspeed needs a distributed launch (launch/torchrun.sh)")
    if pcfg.sequence_parallel and env.dims.tp == 1:
        log.warning("parallel.sequence_parallel=true has no effect with tp=1")
    if env.dims.pp > 1 or env.dims.cp > 1 or env.dims.ep > 1:
        raise ValueError(f"pp={env.dims.pp} cp={env.dims.cp} ep={env.dims.ep}: pipeline, context and "
                         "expert parallelism are not implemented yet; use tp and dp")


def parallelize(model: nn.Module, pcfg: ParallelConfig, env: DistEnv, wrap_dp: bool = True) -> nn.Module:
    """TP/SP plan, then (unless wrap_dp is False, as for DeepSpeed) the data-parallel wrapper."""
    if env.mesh is None:
        return model
    apply_tensor_parallel(model, env.mesh, sequence_parallel=pcfg.sequence_parallel,
                          linear_backend=pcfg.tp_linear_backend)
    if not wrap_dp:
        return model
    return apply_data_parallel(model, env.mesh, pcfg.dp_mode, bucket_cap_mb=pcfg.ddp_bucket_cap_mb,
                               reshard_after_forward=pcfg.fsdp_reshard_after_forward)


def build_optimizer_or_engine(model: nn.Module, pcfg: ParallelConfig, env: DistEnv, engine: str,
                              native: Callable[[nn.Module], torch.optim.Optimizer],
                              param_groups: Callable[[nn.Module], list[dict]], adamw: dict[str, Any],
                              micro_batch_size: int, accum_steps: int, grad_clip: float):
    """(model to call, optimizer). `native(model)` builds the usual optimizer; with dp_mode=zero1 it
    is replaced by ZeRO-1 over `param_groups(model)`; with engine=deepspeed the model becomes the
    DeepSpeed engine (AdamW with `adamw` kwargs, clipping at grad_clip) and the optimizer its own."""
    if engine == "deepspeed":
        from megaqwen.parallel.deepspeed_engine import build_deepspeed_engine

        if env.mesh is None:  # check_layout says so before the model is built
            raise ValueError("train.engine=deepspeed needs a distributed launch (launch/torchrun.sh)")
        eng = build_deepspeed_engine(model, env.mesh, _deepspeed_config(pcfg, grad_clip), micro_batch_size,
                                     accum_steps, param_groups=param_groups(model), **adamw)
        return eng, eng.optimizer
    if pcfg.dp_mode == "zero1" and env.mesh is not None and env.dims.dp > 1:
        from megaqwen.parallel.data_parallel import build_optimizer

        return model, build_optimizer(param_groups(model), env.mesh, "zero1", **adamw)
    return model, native(model)


def grad_sync(model: nn.Module, sync: bool):
    """Context for one micro-batch's backward: skip the DDP/FSDP2 gradient reduction unless `sync`
    (the last micro-batch of an accumulation), so it happens once per optimizer step."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if hasattr(model, "no_sync") and not sync:  # DDP
        return model.no_sync()
    return contextlib.nullcontext()


def dp_mean(x: torch.Tensor, env_mesh: ParallelMesh | None) -> torch.Tensor:
    """Mean of a scalar over the dp group (TP ranks already agree). gloo has no ReduceOp.AVG."""
    if env_mesh is None or env_mesh.dims.dp == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x, group=env_mesh.dp_group)
    return x / env_mesh.dims.dp


def throughput_metrics(device: torch.device, world_size: int, tokens_per_s: float,
                       flops_per_token: float, peak_flops: float = 0.0) -> dict[str, float]:
    """Collective: per-rank peak memory (max/min/each), tokens/s per device and MFU when the peak is known."""
    out = peak_memory_per_rank(device)
    out["tokens_per_s_per_device"] = tokens_per_s / world_size
    m = mfu(flops_per_token, tokens_per_s, device_peak_flops(device, peak_flops), world_size)
    if m is not None:
        out["mfu"] = m
    return out


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
