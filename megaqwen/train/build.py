"""Building a run's model and optimizer: from the meta device to this rank's pieces, filled from
`train.init_from` (HF slices or native DCP pieces), from train.seed, or left for the resumed
checkpoint; then the optimizer or the DeepSpeed engine around it."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from megaqwen.kernels.registry import adamw_factory
from megaqwen.models.spec import get_spec
from megaqwen.parallel import setup as par
from megaqwen.parallel.materialize import hf_filler, init_filler, materialize
from megaqwen.parallel.shards import ShardMap
from megaqwen.train import checkpoint as ckpt
from megaqwen.train.config import Config
from megaqwen.train.fp8 import Fp8Settings, check_fp8, convert_linears, precompute_scales_hook
from megaqwen.train.optim import build_optimizer, param_groups

log = logging.getLogger(__name__)


def use_bf16(dtype: str, device: torch.device) -> bool:
    """`train.dtype`: bf16, or auto on a bf16-capable GPU."""
    return dtype == "bf16" or (dtype == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())


def initial_source(path: str, cfg: Config, spec) -> tuple[str, Path]:
    """`train.init_from` -> ("hf" | "native", folder), after checking that the source's model
    config matches the run's (HF folder: config.json + safetensors; native: a checkpoint)."""
    src = Path(path)
    if (src / "config.json").exists():
        import json

        hf_config = json.loads((src / "config.json").read_text())
        kind, src_cfg = "hf", spec.hf.config_from_hf(hf_config, name=src.name)
    else:
        src = ckpt.resolve_checkpoint(src)
        kind, src_cfg = "native", type(cfg.model).from_dict(ckpt.read_meta(src)["model_config"])
    # training-only settings may differ from the source's: they shape the run, not the weights
    free = ("name", "init_std", "router_aux_loss_coef", "router_z_loss_coef", "moe_capacity_factor",
            "moe_routing_bias_update_rate", "moe_balance")
    mismatched = {k: (getattr(src_cfg, k), getattr(cfg.model, k)) for k in src_cfg.to_dict()
                  if k not in free and getattr(src_cfg, k) != getattr(cfg.model, k)}
    if mismatched:
        raise ValueError(f"train.init_from={path}: model config differs (checkpoint, run): {mismatched}")
    return kind, src


def fp8_all_gather(cfg: Config, env: par.DistEnv) -> bool:
    """FSDP2 all-gathers the FP8 weights in FP8 (torchao, tensorwise; at tp=1, where the dp
    all-reduced amax is the whole weight's)."""
    t, p = cfg.train, cfg.parallel
    return (t.fp8 == "tensorwise" and p.tp_linear_backend == "torch" and t.engine == "native"
            and p.dp_mode == "fsdp" and env.dims.tp == 1 and env.dims.dp * env.dims.cp > 1)


def fp8_converter(cfg: Config, env: par.DistEnv):
    """`train.fp8`'s module swap for `parallelize` (None without FP8), after refusing in one line a
    recipe this device or install cannot run."""
    t = cfg.train
    check_fp8(t.fp8, env.device, cfg.parallel.tp_linear_backend, env.dims.tp)
    if t.fp8 == "none" or cfg.parallel.tp_linear_backend == "te":  # TE: fp8_autocast in the forward
        return None
    s = Fp8Settings(t.fp8, t.fp8_skip_first_last, tuple(t.fp8_skip_modules), cfg.model.num_layers,
                    fp8_all_gather(cfg, env))
    return lambda model, layers, shards: convert_linears(model, layers, shards, s)


def build_model_for_run(cfg: Config, env: par.DistEnv, ops, resuming: bool, plan=None):
    """The run's model as this rank holds it: built on meta, planned (TP/SP, recompute, compile,
    FSDP2), then only the local pieces allocated and filled - from `train.init_from` (HF slices or
    native DCP pieces), from train.seed, or left for the resumed checkpoint. DeepSpeed ZeRO-3
    materialises block by block inside its own partitioned construction. Returns (model, shards)."""
    t = cfg.train
    spec = get_spec(cfg.model)
    source = initial_source(t.init_from, cfg, spec) if t.init_from and not resuming else None
    model = spec.build(cfg.model, ops, device="meta")
    mp_dtype = torch.bfloat16 if use_bf16(t.dtype, env.device) else None
    shards = par.parallelize(model, spec, cfg.parallel, env, fsdp=t.engine == "native",
                             mp_param_dtype=mp_dtype, plan=plan, low_precision=fp8_converter(cfg, env))
    if source is not None and source[0] == "hf":
        filler = hf_filler(model, shards, source[1], spec.hf.hf_key, spec.hf.optional_hf_keys(cfg.model))
    elif resuming or source is not None:  # the checkpoint's values overwrite these right after
        filler = lambda fqn, p: None  # noqa: E731  (allocate only)
    else:
        filler = init_filler(model, shards, seed=t.seed)
    if t.engine == "deepspeed" and cfg.parallel.zero_stage == 3:
        from megaqwen.parallel.deepspeed_engine import materialize_zero3

        # a native checkpoint is read into the engine's partitions once it exists (`build_engine`)
        materialize_zero3(model, spec.layers(model), env.mesh, par.deepspeed_config(cfg.parallel),
                          env.device, filler)
    else:
        materialize(model, shards, env.device, filler=filler)
        if source is not None and source[0] == "native":
            from megaqwen.parallel.checkpoint import load_model

            load_model(str(source[1]), model, shards)
    if source is not None and not _zero3_native_init(cfg, source):
        log.info("initialised weights from %s (this rank's slices only)", t.init_from)
    return model, shards


def _zero3_native_init(cfg: Config, source: tuple[str, Path] | None) -> bool:
    """DeepSpeed ZeRO-3 starting from a native checkpoint: read after the engine is built."""
    return (source is not None and source[0] == "native" and cfg.train.engine == "deepspeed"
            and cfg.parallel.zero_stage == 3)


def build_engine(cfg: Config, env: par.DistEnv, model, shards: ShardMap | None, accum_steps: int,
                 resuming: bool = False):
    """The optimizer (native) or the DeepSpeed engine around `model`: (model or engine, optimizer).
    ZeRO-3 started from a native checkpoint (`train.init_from`) reads it into its partitions here."""
    t = cfg.train
    model, optimizer = par.build_optimizer_or_engine(
        model, cfg.parallel, env, t.engine,
        native=lambda m: build_optimizer(m, t, impl=cfg.kernels.adam, device=env.device.type),
        param_groups=lambda m: param_groups(m, t.weight_decay),
        adamw=dict(lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps),
        micro_batch_size=t.micro_batch_size, accum_steps=accum_steps, grad_clip=t.grad_clip,
        shards=shards, bf16=use_bf16(t.dtype, env.device),
        optimizer_class=adamw_factory(cfg.kernels.adam, env.device.type))
    if t.init_from and not resuming and t.engine == "deepspeed" and cfg.parallel.zero_stage == 3:
        source = initial_source(t.init_from, cfg, get_spec(cfg.model))  # read again only here
        if _zero3_native_init(cfg, source):
            from megaqwen.parallel.checkpoint import load_model

            load_model(str(source[1]), model, shards)  # fp32 partitions and the module's weights
            log.info("initialised weights from %s (this rank's ZeRO-3 partitions only)", t.init_from)
    if fp8_all_gather(cfg, env):  # one amax all-reduce per step for all FP8-gathered weights
        optimizer.register_step_post_hook(precompute_scales_hook(model))
    return model, optimizer


def build_pipeline(cfg: Config, env: par.DistEnv, plan, model, shards: ShardMap):
    """The pipeline schedule over this rank's stage modules (`shards.pp_views`); None without pp.
    Activations between stages are this rank's cp shard of the sequence, SP-split over tp."""
    if plan is None:
        return None
    from megaqwen.parallel.pipeline import Pipeline

    t = cfg.train
    sp_shard = (env.dims.tp if cfg.parallel.sequence_parallel else 1) * env.dims.cp
    return Pipeline(plan, shards.pp_views, model, env.mesh, env.device, t.micro_batch_size, t.seq_len,
                    cfg.model.hidden_size, seq_shard=sp_shard)
