"""DeepSpeed as the alternative data-parallel engine (`train.engine=deepspeed`): ZeRO 1/2/3 + offload.

TP/SP are applied by our plan first; DeepSpeed then receives the TP-local model and our groups
through a Megatron-style `mpu` object, so it shards optimizer state / gradients / parameters over
the dp group only and counts TP-sharded parameters correctly in its gradient norm: DeepSpeed reads
Megatron's `tensor_model_parallel` attribute, which is set here, and only here, from the ShardMap.
The optimizer (`kernels.adam`'s AdamW) is handed in as a client optimizer: torch's needs no
compiled op, so the engine runs on CPU (`DS_ACCELERATOR=cpu`, gloo) and matches the DDP path.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from megaqwen.parallel.data_parallel import dp_reduce_mesh
from megaqwen.parallel.dims import ParallelMesh
from megaqwen.parallel.shards import ShardMap

INSTALL = "pip install -e '.[deepspeed]'"
"""The extra that brings DeepSpeed, installed from the repository root."""


@dataclass
class DeepSpeedConfig:
    stage: int = 1
    """ZeRO stage: 1 optimizer state, 2 + gradients, 3 + parameters sharded over dp."""
    offload_optimizer: bool = False
    """Keep optimizer state (and its step) in CPU memory."""
    offload_params: bool = False
    """Keep parameters in CPU memory between uses (stage 3 only)."""
    bf16: bool = False
    """bf16 training with fp32 master weights inside DeepSpeed."""
    bucket_elements: int = 10_000_000
    """Elements per gradient-reduce / all-gather / ZeRO-3 prefetch bucket, and ZeRO-3's cap on
    parameters kept gathered. DeepSpeed's defaults (5e8, 1e9) hold GBs of fp32 buffers: with them
    ZeRO-3 at dp=2 was killed for memory on the 0.5B model; 5e7 peaked at 12.4 GiB on one rank,
    1e7 at 9.9 (benchmarks/RESULTS.md). Raise it on GPUs for fewer, larger collectives."""
    gradient_clipping: float = 0.0
    """Global grad-norm clip (0 = off); DeepSpeed computes the norm with our TP group."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Raw DeepSpeed config keys merged on top (for anything not modelled here)."""

    def __post_init__(self) -> None:
        if self.stage not in (1, 2, 3):
            raise ValueError(f"ZeRO stage (parallel.zero_stage) must be 1, 2 or 3, got {self.stage}")
        if self.bucket_elements < 1:
            raise ValueError(f"parallel.zero_bucket_elements must be >= 1, got {self.bucket_elements}")
        if self.offload_params and self.stage != 3:
            raise ValueError(f"parallel.offload_params needs ZeRO stage 3, got stage {self.stage}")


class MegatronStyleMPU:
    """The `mpu` interface DeepSpeed queries for model-/data-parallel groups, over our mesh."""

    def __init__(self, mesh: ParallelMesh):
        self._mesh = mesh
        self._dp = dp_reduce_mesh(mesh).get_group()

    def get_model_parallel_group(self):
        return self._mesh.tp_group

    def get_model_parallel_rank(self) -> int:
        return self._mesh.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self._mesh.dims.tp

    get_tensor_model_parallel_group = get_model_parallel_group
    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size

    def get_data_parallel_group(self):
        return self._dp

    def get_data_parallel_rank(self) -> int:
        return dist.get_rank(self._dp)

    def get_data_parallel_world_size(self) -> int:
        return dist.get_world_size(self._dp)

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self._mesh.dims.pp


def deepspeed_config(cfg: DeepSpeedConfig, micro_batch_size: int, grad_accum: int = 1) -> dict[str, Any]:
    n = int(cfg.bucket_elements)
    zero: dict[str, Any] = {"stage": cfg.stage, "reduce_bucket_size": n, "allgather_bucket_size": n}
    if cfg.stage == 3:
        zero.update(stage3_prefetch_bucket_size=n, stage3_max_live_parameters=n, stage3_max_reuse_distance=n)
    if cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    if cfg.offload_params:
        zero["offload_param"] = {"device": "cpu"}
    out = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "zero_optimization": zero,
        "gradient_clipping": cfg.gradient_clipping,
        "bf16": {"enabled": cfg.bf16},
        # torch AdamW as client optimizer: no DeepSpeed CPU-Adam/FusedAdam build needed
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    return {**out, **cfg.extra}


def mark_tensor_parallel(model: nn.Module, shards: ShardMap | None) -> None:
    """DeepSpeed's (Megatron's) per-parameter flag: True for TP-sharded parameters."""
    for fqn, p in model.named_parameters():
        p.tensor_model_parallel = shards is not None and shards.get(fqn) is not None


def build_deepspeed_engine(model: nn.Module, mesh: ParallelMesh, cfg: DeepSpeedConfig,
                           micro_batch_size: int, grad_accum: int = 1, param_groups: Any = None,
                           shards: ShardMap | None = None,
                           optimizer_class: type[torch.optim.Optimizer] = torch.optim.AdamW, **adamw: Any):
    """`deepspeed.initialize` over our groups; returns the engine (call it, `.backward`, `.step`)."""
    deepspeed = _import_deepspeed()
    if not dist.is_initialized():
        raise RuntimeError("initialise torch.distributed before building the DeepSpeed engine")
    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
    mark_tensor_parallel(model, shards)
    params = param_groups if param_groups is not None else [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer_class(params, **adamw)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg, micro_batch_size, grad_accum),
        mpu=MegatronStyleMPU(mesh), dist_init_required=False)
    return engine


def full_grad_deepspeed(param: nn.Parameter, engine) -> torch.Tensor:
    """The dp-complete (still TP-local) gradient of `param` after `engine.backward`, any ZeRO stage."""
    from deepspeed.utils import safe_get_full_grad

    g = safe_get_full_grad(param)
    if g is None:
        raise RuntimeError("DeepSpeed holds no gradient for this parameter "
                           "(call after backward, before step)")
    return g


@torch.no_grad()
def materialize_zero3(model: nn.Module, blocks: nn.ModuleDict, mesh: ParallelMesh, cfg: DeepSpeedConfig,
                      device: torch.device, filler) -> nn.Module:
    """ZeRO-3 through DeepSpeed's own partitioned construction, for a planned meta-device model:
    block by block, allocate this rank's TP pieces, fill them (`filler(fqn, tensor)`: fresh init or
    HF slices), and hand the block to `deepspeed.zero.Init(module=...)`, which keeps only this dp
    rank's partition and frees the rest. The remaining parameters (embedding, final norm, head) go
    last the same way. Peak: one block's TP-local parameters, never the whole model."""
    if cfg.stage != 3:
        raise ValueError(f"materialize_zero3 is for ZeRO stage 3, got {cfg.stage}")
    deepspeed = _import_deepspeed()
    deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
    names = {id(p): n for n, p in model.named_parameters()}
    ds_config = deepspeed_config(cfg, micro_batch_size=1)
    mpu = MegatronStyleMPU(mesh)
    for unit in [*blocks.values(), model]:
        for mod in unit.modules():
            for pname, p in list(mod._parameters.items()):
                if p is None or p.device.type != "meta":
                    continue
                real = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
                filler(names[id(p)], real)
                mod._parameters[pname] = real
        deepspeed.zero.Init(module=unit, data_parallel_group=mpu.get_data_parallel_group(),
                            config_dict_or_path=ds_config, mpu=mpu, mem_efficient_linear=False,
                            remote_device="cpu" if cfg.offload_params else None)
    return model


def check_installed() -> None:
    """ValueError naming the install command when the `deepspeed` package is absent. Looked up, not
    imported: the import takes seconds and picks DeepSpeed's accelerator for the whole process."""
    if importlib.util.find_spec("deepspeed") is None:
        raise ValueError(f"train.engine=deepspeed needs the deepspeed package, which is not installed: "
                         f"{INSTALL} (or use train.engine=native)")


def _import_deepspeed():
    if not torch.cuda.is_available():
        # must be set before deepspeed is imported: its accelerator is chosen at import time
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise ImportError(f"train.engine=deepspeed needs the `deepspeed` package ({INSTALL})") from e
    return deepspeed
