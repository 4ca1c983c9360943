"""What the trainer calls to go distributed: process group from torchrun's env, the mesh, the plans.

    env = init_distributed(cfg.parallel, cfg.train.device)            # before anything else
    check_layout(cfg.parallel, env, cfg.model, seq_len, engine)        # the one validation, before work
                                                                       # (`megaqwen-train --check` runs
                                                                       # start_settings + validate_layout)
    model = spec.build(cfg.model, ops, device="meta")                  # nothing allocated
    shards = parallelize(model, spec, cfg.parallel, env)               # TP/SP -> recompute -> compile
                                                                       # -> FSDP2, all on meta
    materialize(model, shards, env.device, seed) / load_hf_sharded(...) / load_model(...)
    model = wrap_data_parallel(model, cfg.parallel, env)               # DDP (needs real weights)
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
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from megaqwen.parallel.activation import RECOMPUTE_MODES, apply_compile, apply_recompute, compile_enabled
from megaqwen.parallel.config import ParallelConfig
from megaqwen.parallel.data_parallel import DP_MODES, apply_fsdp, wrap_ddp
from megaqwen.parallel.dims import BACKENDS, ParallelDims, ParallelMesh, resolve_backend
from megaqwen.parallel.metrics import device_peak_flops, mfu, peak_memory_per_rank
from megaqwen.parallel.shards import ShardMap
from megaqwen.parallel.tensor_parallel import check_linear_backend
from megaqwen.suggest import check_choice

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


def start_settings(pcfg: ParallelConfig, device_name: str, world: int,
                   local_rank: int = 0) -> tuple[ParallelDims, str | None, torch.device]:
    """(degrees, backend, device) that `init_distributed` joins `world` processes with, checked
    without a process group, so `megaqwen-train --check` refuses what the ranks would: degrees that
    do not multiply to the world size, a backend or device this machine lacks. Backend None: one process."""
    try:
        dims = ParallelDims.from_config(pcfg, world)
    except ValueError as e:
        if world == 1:
            raise ValueError(f"{e} (a single process was started: launch several with "
                             "launch/torchrun.sh --nproc-per-node N)") from e
        raise
    check_choice("parallel.backend", pcfg.backend, BACKENDS)  # a typo is refused in one process too
    if world == 1:
        return dims, None, resolve_device(device_name)
    backend = resolve_backend(pcfg.backend)
    return dims, backend, resolve_device(device_name, backend, local_rank)


def init_distributed(pcfg: ParallelConfig, device_name: str = "auto") -> DistEnv:
    """Join the torchrun job (RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*) and build the mesh; collective."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0")) if world > 1 else 0
    dims, backend, device = start_settings(pcfg, device_name, world, local_rank)  # before any work
    if world == 1:
        return DistEnv(0, 1, 0, device, dims, None)
    rank = int(os.environ["RANK"])
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = timedelta(seconds=pcfg.collective_timeout_s)
    # every group made later (the mesh's, ours, DCP's) defaults to the same timeout as the world's
    c10d = dist.distributed_c10d
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timeout
    if not dist.is_initialized():
        dist.init_process_group(backend, device_id=device if device.type == "cuda" else None, timeout=timeout)
    mesh = dims.build_mesh(device.type)
    if rank != 0:  # rank 0 alone writes logs; the others keep warnings and errors
        logging.getLogger("megaqwen").setLevel(logging.WARNING)
    log.info("rank %d/%d on %s (%s): mesh %s", rank, world, device, backend,
             dict(zip(mesh.mesh.mesh_dim_names, mesh.mesh.shape)))
    return DistEnv(rank, world, local_rank, device, dims, mesh)


def deepspeed_config(pcfg: ParallelConfig, grad_clip: float = 0.0, bf16: bool = False):
    """The DeepSpeed engine's settings from `parallel.*` (validated on construction)."""
    from megaqwen.parallel.deepspeed_engine import DeepSpeedConfig

    return DeepSpeedConfig(stage=pcfg.zero_stage, offload_optimizer=pcfg.offload_optimizer,
                           offload_params=pcfg.offload_params, gradient_clipping=grad_clip, bf16=bf16,
                           bucket_elements=pcfg.zero_bucket_elements)


def check_pipeline(pcfg: ParallelConfig, model_cfg: Any, engine: str, microbatches: int, spec: Any = None):
    """The pipeline plan for pp > 1 (None otherwise), after refusing what it cannot run yet: the
    DeepSpeed engine, and what the model (`spec`, by default its config's) refuses at this pp alone
    (`ParallelDims.validate_model`: too few layers, the spec's pipeline rules)."""
    if pcfg.pp == 1:
        return None
    from megaqwen.parallel.pipeline import plan_from_config

    if engine == "deepspeed":
        raise ValueError(f"parallel.pp={pcfg.pp} with train.engine=deepspeed is not supported (DeepSpeed's "
                         "pipeline engine needs its own model format); use train.engine=native with "
                         "parallel.dp_mode=ddp|zero1|fsdp")
    ParallelDims(world_size=pcfg.pp, pp=pcfg.pp).validate_model(model_cfg, spec or model_cfg.spec)
    return plan_from_config(pcfg, model_cfg.num_layers, microbatches)


def accumulation_steps(global_batch_size: int, micro_batch_size: int, dp: int) -> int:
    """Micro-batches per optimizer step on each data-parallel rank; ValueError when the batch does
    not split into whole micro-batches over `dp` ranks."""
    steps, rem = divmod(global_batch_size, micro_batch_size * dp)
    if rem or steps == 0:
        raise ValueError(f"train.global_batch_size={global_batch_size} is not a multiple of micro_batch_size "
                         f"({micro_batch_size}) x dp ({dp}) = {micro_batch_size * dp}; use a multiple of it")
    return steps


def validate_layout(pcfg: ParallelConfig, dims: ParallelDims, model_cfg: Any, seq_len: int,
                    engine: str = "native", microbatches: int = 1, spec: Any = None):
    """The one validation of the layout (and of the DeepSpeed settings with engine=deepspeed)
    against the model: pure arithmetic and look-ups, no process group, so the ranks (`check_layout`)
    and `megaqwen-train --check` ask the same questions. Fixed-choice settings are refused at any
    degree (`pp_schedule` at pp=1 too). What the architecture needs is its model spec's to say
    (`spec`, by default `model_cfg.spec`: `validate`, `expert_parallel`, `attention_heads`). Returns
    the pipeline plan (None without pipeline parallelism); `microbatches` per optimizer step feed
    its checks."""
    from megaqwen.parallel.context_parallel import check_context_parallel
    from megaqwen.parallel.pipeline import SCHEDULES

    check_choice("parallel.dp_mode", pcfg.dp_mode, DP_MODES)
    check_choice("parallel.recompute", pcfg.recompute, RECOMPUTE_MODES)
    compile_enabled(pcfg.compile, "cpu")  # refuses an unknown setting
    check_choice("parallel.pp_schedule", pcfg.pp_schedule, SCHEDULES)
    spec = spec or model_cfg.spec
    dims.validate_model(model_cfg, spec, seq_len=seq_len, sequence_parallel=pcfg.sequence_parallel)
    d = dims
    heads = spec.attention_heads(model_cfg) // d.tp if spec.attention_heads is not None else None
    check_context_parallel(pcfg.cp_mode, pcfg.cp_tile, d.cp, heads)
    check_linear_backend(pcfg.tp_linear_backend)
    plan = check_pipeline(pcfg, model_cfg, engine, microbatches, spec)
    if (plan is not None and plan.v_shape and getattr(model_cfg, "tie_word_embeddings", False)
            and engine == "native" and pcfg.dp_mode == "fsdp" and d.dp * d.cp > 1):
        raise ValueError(f"parallel.dp_mode=fsdp cannot shard the tied embedding that "
                         f"parallel.pp_schedule={pcfg.pp_schedule} puts on pp rank 0 twice (first and last "
                         "stage, model.tie_word_embeddings=true); use dp_mode=ddp or zero1, or a looped "
                         "schedule (1f1b, interleaved_1f1b, zero_bubble)")
    if pcfg.fsdp_keep_gathered and (pcfg.dp_mode != "fsdp" or plan is not None or engine != "native"):
        raise ValueError(f"parallel.fsdp_keep_gathered=true needs train.engine=native, dp_mode=fsdp and pp=1 "
                         f"(got engine={engine}, dp_mode={pcfg.dp_mode}, pp={pcfg.pp}): pipeline stages "
                         "and the other modes hold no FSDP2 units across micro-batches; set it false")
    if engine == "deepspeed":
        from megaqwen.parallel.deepspeed_engine import check_installed

        deepspeed_config(pcfg)
        if d.world_size == 1:
            raise ValueError("train.engine=deepspeed needs a distributed launch (launch/torchrun.sh)")
        if str(pcfg.compile).lower() == "true":
            raise ValueError("parallel.compile=true is not supported with train.engine=deepspeed "
                             "(DeepSpeed wraps the model itself); use train.engine=native")
        check_installed()
    if d.ep > 1 and engine == "deepspeed":
        raise ValueError(f"parallel.ep={d.ep} is not supported with train.engine=deepspeed (DeepSpeed "
                         "builds expert-data-parallel groups only for its own MoE layer classes, and "
                         "ZeRO-3 refuses MoE); use train.engine=native with parallel.dp_mode=zero1 or "
                         "fsdp (experts sharded over their expert-data-parallel group)")
    if d.cp > 1 and engine == "deepspeed":
        raise ValueError(f"parallel.cp={d.cp} is not supported yet with train.engine=deepspeed (its "
                         "gradient averaging is over dp only)")
    return plan


def check_layout(pcfg: ParallelConfig, env: DistEnv, model_cfg: Any, seq_len: int,
                 engine: str = "native", microbatches: int = 1, spec: Any = None):
    """`validate_layout` on this rank's degrees, before anything is built; the plans rely on it.
    Returns the pipeline plan (None without pipeline parallelism)."""
    plan = validate_layout(pcfg, env.dims, model_cfg, seq_len, engine, microbatches, spec)
    if pcfg.sequence_parallel and env.dims.tp == 1:
        log.warning("parallel.sequence_parallel=true has no effect with tp=1")
    return plan


def parallelize(model: nn.Module, spec: Any, pcfg: ParallelConfig, env: DistEnv,
                fsdp: bool = True, mp_param_dtype: torch.dtype | None = None, plan: Any = None,
                low_precision: Callable[[nn.Module, nn.ModuleDict, ShardMap], Any] | None = None) -> ShardMap:
    """Apply the plans in place, in the design's order: pipeline cut (`plan`: this rank keeps its
    stages' layers) -> TP/SP (the spec's plan) -> EP (`spec.expert_parallel`: experts over the ep
    group) -> CP (the attention core over the cp group) -> activation recomputation -> compile ->
    [stage modules] -> FSDP2 (dp_mode=fsdp and `fsdp`); `low_precision(model, layers, shards)` (FP8
    linears) runs after CP, before recompute. Run it on the meta-device model, then
    materialise or load; DDP comes after that (`wrap_data_parallel`). Returns where every sharded
    parameter's piece sits (and, under pipelining, this rank's stage modules)."""
    pp_rank = env.mesh.rank("pp") if plan is not None else 0
    if plan is not None:
        from megaqwen.parallel.pipeline import prune_to_rank

        if spec.pipeline is None:
            raise ValueError(f"parallel.pp={plan.pp}: architecture {spec.arch!r} declares no pipeline split")
        prune_to_rank(model, plan, pp_rank, spec.pipeline)
    shards = spec.parallelize_tp(model, env.mesh, sequence_parallel=pcfg.sequence_parallel,
                                 linear_backend=pcfg.tp_linear_backend)
    use_fsdp = fsdp and env.mesh is not None and pcfg.dp_mode == "fsdp"
    if spec.expert_parallel and env.mesh is not None:
        from megaqwen.parallel.expert_parallel import apply_expert_parallel, apply_fsdp_experts, ep_groups

        shards.ep_groups = ep_groups(env.mesh, env.dims.ep, env.dims.etp)  # collective: same order everywhere
        shards.expert_fqns = apply_expert_parallel(model, shards.ep_groups, shards)
        if use_fsdp and env.dims.ep > 1:  # experts sharded over their own (edp) group, before apply_fsdp
            apply_fsdp_experts(model, env.mesh, shards.ep_groups, mp_param_dtype)
    if env.mesh is not None and env.dims.cp > 1:
        from megaqwen.parallel.context_parallel import apply_context_parallel

        apply_context_parallel(model, spec, env.mesh.group("cp"), pcfg.cp_mode)
    layers = spec.layers(model)
    if low_precision is not None:  # e.g. FP8 linears (train.fp8): swapped before recompute/compile/FSDP2
        low_precision(model, layers, shards)
    apply_recompute(layers, pcfg.recompute, spec.selective_recompute)
    if compile_enabled(pcfg.compile, env.device.type, native_engine=fsdp):  # fsdp=False: DeepSpeed
        apply_compile(layers)
    if plan is None:
        if use_fsdp:
            apply_fsdp(model, env.mesh, layers, reshard_after_forward=pcfg.fsdp_reshard_after_forward,
                       mp_param_dtype=mp_param_dtype, keep_gathered=pcfg.fsdp_keep_gathered)
        return shards
    from megaqwen.parallel.data_parallel import dp_reduce_mesh
    from megaqwen.parallel.pipeline import apply_fsdp_stages, stage_modules

    use_fsdp = use_fsdp and dp_reduce_mesh(env.mesh).size() > 1
    # activations between stages: FSDP2's compute dtype, else the fp32 residual stream (autocast too)
    act_dtype = (mp_param_dtype if use_fsdp else None) or torch.float32
    cp_group = env.mesh.group("cp") if env.dims.cp > 1 else None
    shards.pp_views = stage_modules(model, plan, pp_rank, act_dtype=act_dtype, cp_group=cp_group,
                                    cp_tile=pcfg.cp_tile)
    if plan.first_rank != plan.last_rank:
        for name in spec.pipeline.shared_params(model):  # first and last stage: one tensor
            shards.extra_copies[name] = 2
    if use_fsdp:
        apply_fsdp_stages(shards.pp_views, layers, dp_reduce_mesh(env.mesh), mp_param_dtype,
                          reshard_after_forward=pcfg.fsdp_reshard_after_forward)
    return shards


def wrap_data_parallel(model: nn.Module, pcfg: ParallelConfig, env: DistEnv,
                       shards: ShardMap | None = None) -> nn.Module:
    """DDP around the materialised model for dp_mode ddp / zero1 (FSDP2 was applied by
    `parallelize`); the model itself otherwise, and under pipelining, whose stages are called
    outside the model's forward (`Pipeline.reduce_grads` all-reduces over dp after the schedule)."""
    if env.mesh is None or pcfg.dp_mode == "fsdp" or pcfg.pp > 1:
        return model
    if shards is not None and env.dims.ep > 1 and shards.expert_fqns:
        from megaqwen.parallel.expert_parallel import ddp_ignore_experts

        ddp_ignore_experts(model, shards.expert_fqns)  # reduced over their edp group instead
    return wrap_ddp(model, env.mesh, bucket_cap_mb=pcfg.ddp_bucket_cap_mb)


def build_optimizer_or_engine(model: nn.Module, pcfg: ParallelConfig, env: DistEnv, engine: str,
                              native: Callable[[nn.Module], torch.optim.Optimizer],
                              param_groups: Callable[[nn.Module], list[dict]], adamw: dict[str, Any],
                              micro_batch_size: int, accum_steps: int, grad_clip: float,
                              shards: ShardMap | None = None, bf16: bool = False,
                              optimizer_class: type[torch.optim.Optimizer] = torch.optim.AdamW):
    """(model to call, optimizer). `native(model)` builds the usual optimizer; with dp_mode=zero1 it
    is replaced by ZeRO-1 of `optimizer_class` over `param_groups(model)`; with engine=deepspeed the
    model becomes the DeepSpeed engine (`optimizer_class` with `adamw` kwargs as its client
    optimizer, bf16 with fp32 master weights when `bf16`, clipping at grad_clip)."""
    if engine == "deepspeed":
        from megaqwen.parallel.deepspeed_engine import build_deepspeed_engine

        if env.mesh is None:  # check_layout says so before the model is built
            raise ValueError("train.engine=deepspeed needs a distributed launch (launch/torchrun.sh)")
        eng = build_deepspeed_engine(model, env.mesh, deepspeed_config(pcfg, grad_clip, bf16),
                                     micro_batch_size, accum_steps, param_groups=param_groups(model),
                                     shards=shards, optimizer_class=optimizer_class, **adamw)
        return eng, eng.optimizer
    if pcfg.dp_mode == "zero1" and env.mesh is not None and env.dims.dp > 1:
        from megaqwen.parallel.data_parallel import build_optimizer, unwrap

        experts = edp = None
        if shards is not None and env.dims.ep > 1 and shards.expert_fqns:  # own ZeRO over edp
            experts = {id(p) for n, p in unwrap(model).named_parameters() if n in shards.expert_fqns}
            edp = shards.ep_groups.edp_group
        return model, build_optimizer(param_groups(model), env.mesh, "zero1", optimizer_class=optimizer_class,
                                      expert_params=experts, edp_group=edp, **adamw)
    return model, native(model)


def grad_sync(model: nn.Module, sync: bool, keep_gathered: bool = False):
    """Context for one micro-batch's forward and backward (DDP decides in its forward whether the
    backward reduces): skip the DDP/FSDP2 gradient reduction unless `sync` (the last micro-batch of
    an accumulation), so it happens once per optimizer step. FSDP2 with `keep_gathered`
    (parallel.fsdp_keep_gathered): parameters also stay gathered until the last micro-batch."""
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        from megaqwen.parallel.fsdp_step import microbatch_sync

        microbatch_sync(model, last=sync, keep_gathered=keep_gathered)
        return contextlib.nullcontext()
    if hasattr(model, "no_sync") and not sync:  # DDP
        return model.no_sync()
    return contextlib.nullcontext()


def dp_sum(x: torch.Tensor, env_mesh: ParallelMesh | None, with_cp: bool = False) -> torch.Tensor:
    """Sum of a scalar over the dp group (TP ranks already agree), or over dp x cp with `with_cp`
    (values that differ between sequence shards); a copy, never in place."""
    x = x.detach().clone()
    if env_mesh is None:
        return x
    if with_cp and env_mesh.dims.cp > 1:
        from megaqwen.parallel.data_parallel import dp_reduce_mesh

        dist.all_reduce(x, group=dp_reduce_mesh(env_mesh).get_group())
    elif env_mesh.dims.dp > 1:
        dist.all_reduce(x, group=env_mesh.dp_group)
    return x


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
