"""The training loop: data, resume, step, log, checkpoint (building: `train.build`; pre-emption,
non-finite steps and stragglers: `train.reliability`).

One code path for one process and for torchrun: `megaqwen.parallel` plugs the process mesh, model
sharding and data-parallel wrappers (or the DeepSpeed engine) in through its `DistEnv` (rank, dp
coordinates, device, mesh) without changing the step logic.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from megaqwen.data.mix_metrics import MixMeter
from megaqwen.parallel import setup as par
from megaqwen.parallel.data_parallel import unwrap
from megaqwen.parallel.grad_norm import clip_grad_norm_
from megaqwen.parallel.metrics import local_peak_memory_gib
from megaqwen.parallel.shards import ShardMap, local_tensor
from megaqwen.parallel.watchdog import CollectiveWatch, begin_step, phase
from megaqwen.train import checkpoint as ckpt
from megaqwen.train.assemble import build_training, seed_and_ops
from megaqwen.train.config import Config
from megaqwen.train.forward import autocast_ctx, forward_step, model_inputs, validation_parts
from megaqwen.train.metrics import MetricsLogger
from megaqwen.train.objective import REFERENCE_FIELD, Objective, StepMeter
from megaqwen.train.objectives import objective_for
from megaqwen.train.optim import lr_at, set_lr
from megaqwen.train.profiling import StepProfiler
from megaqwen.train.reliability import LossHealth, StopSignal, rollback, straggler_metrics
from megaqwen.train.run_folder import RunFolder
from megaqwen.train.validation import build_validator, training_documents

log = logging.getLogger(__name__)


def resolve_data_path(path: str, out_dir: Path, env: par.DistEnv) -> str:
    """`sample` -> the shipped corpus tokenised once into out_dir/data/sample (rank 0 writes);
    `sample:NAME` -> a shipped toy chat set (`data_check.SHIPPED_CHAT`) into out_dir/data/NAME."""
    from megaqwen.train.data_check import SHIPPED_CHAT, is_sample, sample_prefix

    if not is_sample(path):
        return path
    prefix = sample_prefix(path, out_dir)
    if path != "sample" and env.rank == 0 and not prefix.with_suffix(".idx").exists():
        from megaqwen.data.chat import tokenize_chat, write_chat_summary
        from megaqwen.data.tokenize import shipped_sample_corpus

        file, fmt = SHIPPED_CHAT[path.split(":", 1)[1]]
        log.info("tokenising the shipped %s set %s into %s", fmt, file, prefix)
        write_chat_summary(tokenize_chat([str(shipped_sample_corpus().parent / file)], str(prefix), fmt))
    elif env.rank == 0 and not prefix.with_suffix(".idx").exists():
        # megaqwen.data, not the curation pipeline: the trainer never imports megaqwen.data_pipeline
        from megaqwen.data.tokenize import shipped_sample_corpus, tokenize_files, write_summary

        log.info("tokenising the shipped sample corpus into %s", prefix)
        try:
            write_summary(tokenize_files([shipped_sample_corpus()], str(prefix)))
        except (ValueError, OSError) as e:
            raise RuntimeError(f"tokenising the sample corpus failed: {e}") from e
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    return str(prefix)


def build_batches(cfg: Config, env: par.DistEnv, consumed_samples: int, steps_left: int | None = None):
    from megaqwen.data.blend import build_dataset
    from megaqwen.data.index_cache import IndexCache
    from megaqwen.data.sampler import BatchIterator

    t = cfg.train
    data_path = resolve_data_path(cfg.data.path, Path(t.out_dir), env)
    if steps_left is None:  # the stream position counts the steps done
        steps_left = t.steps - consumed_samples // t.global_batch_size
    d = cfg.data
    cache = IndexCache.for_rank(d.index_cache, d.index_cache_shared, env.rank, env.local_rank,
                                d.index_cache_timeout_s)
    dataset = build_dataset(data_path, seq_len=t.seq_len,
                            num_samples=consumed_samples + steps_left * t.global_batch_size, seed=t.seed,
                            documents=training_documents(cfg), cache=cache)
    return BatchIterator(dataset, global_batch_size=t.global_batch_size,
                         micro_batch_size=t.micro_batch_size, dp_rank=env.dp_rank, dp_size=env.dp_size,
                         consumed_samples=consumed_samples, num_workers=d.num_workers, prefetch=d.prefetch,
                         pin_memory=env.device.type == "cuda")


def pipeline_step(pipe, micro: list[dict[str, torch.Tensor]], cfg: Config, env: par.DistEnv,
                  meter: StepMeter, shards: ShardMap | None = None,
                  objective: Objective | None = None) -> None:
    """All micro-batches of one step through the pipeline schedule (forward and backward, each
    stage adding its share to `meter`), then the dp and tied-embedding gradient reductions."""
    inputs = [model_inputs(b, cfg, env.device) for b in micro]
    with autocast_ctx(cfg.train.dtype, env.device):
        pipe.step(inputs, meter, objective or objective_for(cfg), cfg.data.document_mask)
    exclude = shards.expert_fqns if shards is not None and env.dims.ep > 1 else frozenset()
    pipe.reduce_grads(cfg.parallel.dp_mode, exclude)  # experts: their edp group, in train_step


def train_step(model, optimizer, batches, cfg: Config, env: par.DistEnv, step: int,
               accum_steps: int, shards: ShardMap | None = None, pipe=None,
               reference=None, objective: Objective | None = None) -> dict[str, float]:
    """One optimizer step over `accum_steps` micro-batches; returns the step's metrics.

    The objective (`train.objective`, `megaqwen.train.objective`) is the mean over every unit
    (valid token for `lm`) of the step, on all dp ranks and micro-batches: each micro-batch
    backpropagates its summed objective divided by the step's global unit count (times dp x cp,
    since DDP/FSDP/DeepSpeed average gradients over those ranks; times accum for DeepSpeed, which
    divides by it), so ignored tokens and uneven micro-batches weigh exactly as in one process. The
    model's auxiliary terms (MoE router losses) are added by name with their coefficients, averaged
    over micro-batches, and logged under their names (`StepMeter`). Under pipeline parallelism
    (`pipe`) the schedule runs every micro-batch at once with the same meter. An objective that
    needs a reference model gets its per-token log-probabilities (`reference`, a
    `megaqwen.train.reference.ReferenceModel`) in each micro-batch first. `objective`: the run's,
    resolved once (`Training.objective`); default `objective_for(cfg)`, for callers of one step.
    """
    lr = lr_at(step, cfg.train)
    set_lr(optimizer, lr)
    objective = objective if objective is not None else objective_for(cfg)
    t_data = time.perf_counter()
    micro = [next(batches) for _ in range(accum_steps)]
    data_time_s = time.perf_counter() - t_data  # the step waited this long for its micro-batches
    if objective.needs_reference:
        if reference is None:
            raise ValueError(f"train.objective={cfg.train.objective} needs a reference model; none was built")
        with phase("reference forward"):
            micro = [{**b, REFERENCE_FIELD: reference.token_logprobs(b)} for b in micro]
    count = sum(int(objective.units(b)) for b in micro)
    with phase("token count all-reduce", step + 1):
        global_count = par.dp_sum(torch.tensor(float(count), device=env.device), env.mesh).clamp(min=1)
    deepspeed = cfg.train.engine == "deepspeed"
    cp = env.dims.cp
    cp_group = env.mesh.group("cp") if env.mesh is not None and cp > 1 else None
    # the wrappers average over dp x cp ranks; each cp rank back-propagates its shard's sum only
    scale = env.dp_size * cp * (accum_steps if deepspeed else 1) / global_count
    if cfg.train.inject_nan_at_step == step + 1:  # fault drill: this step's loss and gradients NaN
        scale = scale * float("nan")
    if cfg.model.spec.expert_parallel:  # the step's routing counts some balancing forms need
        from megaqwen.train.moe_balance import prepare_balance

        with phase("moe balance pre-pass"):
            prepare_balance(model, micro, cfg, env, pipe)
    meter = StepMeter(scale, aux_weight=1.0 if deepspeed else 1.0 / accum_steps,
                      metric_names=objective.metrics)
    if pipe is not None:
        with phase("pipeline schedule"):
            pipeline_step(pipe, micro, cfg, env, meter, shards, objective)
        micro = []
    for i, batch in enumerate(micro):
        # DDP decides in its forward whether the backward all-reduces: no_sync encloses both
        sync = contextlib.nullcontext() if deepspeed else par.grad_sync(
            model, sync=i == accum_steps - 1, keep_gathered=cfg.parallel.fsdp_keep_gathered)
        with sync, phase("forward/backward"):
            with autocast_ctx(cfg.train.dtype, env.device):
                out = forward_step(model, batch, cfg, env.device, objective, cp_group)
                loss = meter.add(out.parts, out.aux)
            if deepspeed:  # it divides by accumulation and steps at the boundary itself
                model.backward(loss)
                model.step()
            else:
                loss.backward()
    if cfg.model.spec.expert_parallel:
        from megaqwen.train.moe_balance import release_balance

        release_balance(model, pipe)
    ep = shards is not None and shards.ep_groups is not None and env.dims.ep > 1
    if deepspeed:
        grad_norm = torch.tensor(float(model.get_global_grad_norm() or 0.0))
    else:
        max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else math.inf
        plain = unwrap(model)
        with phase("gradient norm"):
            grad_norm = _clip_grads(plain, max_norm, cfg, shards, ep)
        # the norm is global (all-reduced over every rank), so every rank takes the same branch
        nonfinite = not math.isfinite(grad_norm.item())
        if nonfinite and cfg.train.on_nonfinite == "stop":
            raise FloatingPointError(
                f"gradient norm is {grad_norm.item()} at step {step + 1}: the weights were not updated "
                "(train.on_nonfinite=stop); train.on_nonfinite=skip drops such a step, rollback reloads "
                "the latest checkpoint")
        if not nonfinite:
            with phase("optimizer step"):
                optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    with phase("loss all-reduce"):
        pp_group = pipe.pp_group if pipe is not None else None
        reduced = meter.reduce(global_count, accum_steps, env.mesh, pp_group)
    out = {"loss": reduced.pop("loss"), "lr": lr, "grad_norm": grad_norm.item(), "data_time_s": data_time_s,
           **reduced}
    if not deepspeed and nonfinite:
        out["nonfinite"] = 1.0
    if not deepspeed:
        out.update(_routing_step(unwrap(model), cfg, env, out, update_bias="nonfinite" not in out))
    return out


def _clip_grads(plain, max_norm: float, cfg: Config, shards: ShardMap | None, ep: bool) -> torch.Tensor:
    """The global gradient norm (all-reduced over every rank), after clipping to `max_norm`."""
    if not ep:
        return clip_grad_norm_(plain.named_parameters(), max_norm, shards)  # TP/FSDP/PP-aware
    # expert grads: averaged over their expert-data-parallel group, counted once per copy
    from megaqwen.parallel.expert_parallel import clip_grad_norm_ep_, reduce_expert_grads

    if cfg.parallel.dp_mode != "fsdp":
        reduce_expert_grads(plain, shards.expert_fqns, shards.ep_groups)
    return clip_grad_norm_ep_(plain.named_parameters(), max_norm, shards, shards.expert_fqns,
                              shards.ep_groups)


def _routing_step(plain, cfg: Config, env: par.DistEnv, out: dict[str, float],
                  update_bias: bool = True) -> dict[str, Any]:
    """Collective over dp (x cp): this step's per-layer expert load (summed over the data-parallel
    ranks; nothing for a model without routers), the aux-loss-free routing-bias update from it, and
    the load metrics. The raw loads ride along under "_moe_loads" for the trainer's heat map."""
    if not cfg.model.spec.expert_parallel:  # no routers: skip the per-step walk over the modules
        return {}
    from megaqwen.parallel.data_parallel import dp_reduce_mesh
    from megaqwen.parallel.expert_parallel import collect_load, update_routing_bias
    from megaqwen.train.moe_metrics import moe_metrics

    group = dp_reduce_mesh(env.mesh).get_group() if env.mesh is not None else None
    loads = collect_load(plain, group)
    if update_bias and loads:  # not on a step whose update was dropped
        update_routing_bias(plain, loads, getattr(cfg.model, "moe_routing_bias_update_rate", 0.0))
    if env.mesh is not None and env.dims.pp > 1:  # every stage's layers, not this rank's only
        from megaqwen.train.moe_metrics import gather_stage_loads

        loads = gather_stage_loads(loads, env.mesh.group("pp"))
    if not loads:
        return {}
    res: dict[str, Any] = moe_metrics(loads, aux_loss=out.get("aux_loss"), z_loss=out.get("z_loss"))
    res["_moe_loads"] = loads
    return res


def pipeline_metrics(pipe, step_time_s: float, device: torch.device) -> dict[str, float]:
    """Collective over the pp group: the schedule's theoretical bubble, the measured one (1 - time in
    stage compute / step time, mean over pp ranks) and each stage rank's peak memory."""
    idle = torch.tensor([max(0.0, 1.0 - pipe.last_busy_s / step_time_s)], dtype=torch.float64,
                        device=device)
    torch.distributed.all_reduce(idle, group=pipe.pp_group)
    out = {"pp_bubble_theory": pipe.plan.bubble_fraction(), "pp_bubble_measured": idle.item() / pipe.plan.pp}
    for r, peak in enumerate(pipe.stage_peaks(local_peak_memory_gib(device))):
        out[f"pp_rank{r}_peak_mem_gib"] = peak
    return out


def train(cfg: Config) -> dict[str, Any]:
    """Run (or resume) training to cfg.train.steps; returns a summary of the run."""
    cfg.validate()
    t = cfg.train
    env = par.init_distributed(cfg.parallel, t.device)  # torchrun env; a wrong world size fails here
    accum_steps = par.accumulation_steps(t.global_batch_size, t.micro_batch_size, env.dp_size)
    # before any model is built; the pipeline plan (pp > 1) runs all accum_steps micro-batches
    plan = par.check_layout(cfg.parallel, env, cfg.model, t.seq_len, t.engine, microbatches=accum_steps)

    coords = {d: env.mesh.rank(d) for d in ("pp", "dp", "cp", "tp")} if env.mesh is not None else {}
    watch = CollectiveWatch.install(env.rank, env.world_size, cfg.parallel.collective_timeout_s, coords)
    try:
        return _train(cfg, env, accum_steps, plan)
    except Exception as e:
        named = watch.explain(e)
        if named is None:
            raise
        log.error("%s", named)
        raise named from e
    finally:
        watch.uninstall()


def _train(cfg: Config, env: par.DistEnv, accum_steps: int, plan) -> dict[str, Any]:
    t = cfg.train
    out_dir, ckpt_root = Path(t.out_dir), Path(t.out_dir) / "checkpoints"
    run = RunFolder(cfg, env.world_size)
    run.open(env.rank)  # data paths, resume contract, run-folder lock: before any model is built
    if t.fit_check and env.rank == 0:  # the pre-flight estimate, into this run's log too
        from megaqwen.train.fit_check import fit_report

        report = fit_report(cfg, env.world_size)
        log.info("memory estimate: %s%s", report.summary(), report.fixed_note())
    ops = seed_and_ops(cfg, env)
    latest = run.latest  # the checkpoint every rank agreed on (checksums verified), None: fresh start
    built = build_training(cfg, env, ops, plan, accum_steps, resuming=latest is not None)
    model, optimizer, shards, pipe, reference = (built.model, built.optimizer, built.shards, built.pipe,
                                                 built.reference)
    # ZeRO-3 parameters keep their partition in `ds_tensor`
    n_params = sum(getattr(p, "ds_tensor", local_tensor(p)).numel() for p in model.parameters())
    log.info("model %s: %.2fM parameters (this rank's shards) on %s; kernels: %s", cfg.model.name,
             n_params / 1e6, env.device, ops.describe())
    if cfg.model.active_params() != cfg.model.num_params():
        log.info("%.3fB parameters in total, %.3fB active per token (MFU counts the active ones); "
                 "ep=%d", cfg.model.num_params() / 1e9, cfg.model.active_params() / 1e9, env.dims.ep)

    start_step, consumed = 0, 0
    if latest is not None:
        with phase("checkpoint load"):
            meta = ckpt.load_checkpoint(latest, model, optimizer, shards=shards)
        start_step, consumed = meta["step"], meta["consumed_samples"]
        consumed = run.data_position(consumed)  # 0 when an allowed change starts a new sample stream
        log.info("resumed from %s (step %d, %d samples consumed)", latest, start_step, consumed)
    if t.objective == "grpo":  # rows made online by rollouts of the policy (megaqwen.train.rollout)
        from megaqwen.train.rollout import RolloutBatches

        batches = RolloutBatches(cfg, env, model, consumed, accum_steps, start_step=start_step)
    else:
        batches = build_batches(cfg, env, consumed, steps_left=t.steps - start_step)
    if reference is not None and cfg.dpo.precompute_reference:  # a second, identical stream
        from megaqwen.train.reference import PrecomputedReference

        with phase("reference precompute"):
            again = build_batches(cfg, env, consumed, steps_left=t.steps - start_step)
            try:
                reference = built.reference = PrecomputedReference.compute(  # the model: no references left
                    reference, again, (t.steps - start_step) * accum_steps)
            finally:
                again.close()
    mix = MixMeter(batches.dataset, cfg.data.path)  # mix/<source>: each blend source's share per step
    eval_fn = ((lambda m, b: pipe.eval_parts(model_inputs(b, cfg, env.device), built.objective,
                                             cfg.data.document_mask))
               if pipe is not None else (lambda m, b: validation_parts(m, b, cfg, env, built.objective)))
    validator = build_validator(cfg, env, resolve_data_path(cfg.data.path, out_dir, env), eval_fn,
                                lambda: autocast_ctx(t.dtype, env.device))
    profiler = StepProfiler(cfg.profile, out_dir, env.rank, env.device, start_step)

    config_dict = asdict(cfg)
    logger = MetricsLogger(out_dir, config_dict, cfg.logger.wandb, total_steps=t.steps,
                           enabled=env.rank == 0, log_every=t.log_every)
    tokens_per_step = t.global_batch_size * t.seq_len
    flops_per_token = cfg.model.flops_per_token(t.seq_len)
    metrics: dict[str, float] = {}
    expert_load: dict | None = None  # MoE: loads summed over the run's steps, for the heat map
    stop = StopSignal(env.device)  # SIGTERM / SIGUSR1 (SLURM pre-emption), Ctrl-C: save, exit cleanly
    health = LossHealth(t.spike_factor)
    saver = ckpt.Checkpointer(ckpt_root, t.async_save, keep_last=t.keep_last, keep_every=t.keep_every)
    saved: dict[str, float] = {}
    try:
        for step in range(start_step, t.steps):
            profiler.before_step(step + 1)
            begin_step(step + 1)
            t0 = time.perf_counter()
            metrics = train_step(model, optimizer, batches, cfg, env, step, accum_steps, shards, pipe,
                                 reference, built.objective)
            dt = time.perf_counter() - t0
            if "_moe_loads" in metrics:
                from megaqwen.train.moe_metrics import add_loads

                expert_load = add_loads(expert_load, metrics.pop("_moe_loads"))
            if pipe is not None:
                with phase("pipeline metrics"):
                    metrics.update(pipeline_metrics(pipe, dt, env.device))
            profiler.after_step(step + 1)
            if hasattr(batches, "step_metrics"):  # rollout/*: rewards, phase times
                metrics.update(batches.step_metrics(dt))
            metrics.update(step_time_s=dt, tokens_per_s=tokens_per_step / dt,
                           peak_mem_gib=local_peak_memory_gib(env.device),
                           consumed_samples=batches.consumed_samples)
            metrics.update(mix.step(batches.consumed_samples, t.global_batch_size))
            metrics.update(par.throughput_metrics(env.device, env.world_size, metrics["tokens_per_s"],
                                                  flops_per_token, t.peak_flops))
            with phase("straggler report"):
                metrics.update(straggler_metrics(dt, env))
            if metrics.pop("nonfinite", None):  # on_nonfinite skip | rollback: the update was dropped
                metrics.update(health.bad_step(step + 1, t.on_nonfinite))
                if t.on_nonfinite == "rollback":
                    metrics.update(saver.wait())  # the latest checkpoint may be the one in flight
                    metrics["rolled_back_to"] = rollback(ckpt_root, model, optimizer, shards, step + 1)
            elif not math.isfinite(metrics["loss"]):
                raise FloatingPointError(f"loss is {metrics['loss']} at step {step + 1}")
            else:
                metrics.update(health.good_step(step + 1, metrics["loss"]))
            if validator is not None and validator.due(step + 1):
                with phase("validation"):
                    metrics.update(validator.run(model, step + 1))
            metrics.update(saved)  # the checkpoint metrics of earlier steps' saves
            # the row before the save: a checkpoint of step N always has its row (a crash between
            # the two loses no record); this save's metrics ride on the next row
            logger.log(step + 1, metrics)
            run.heartbeat()
            done = step + 1
            with phase("stop-signal agreement"):
                signalled = stop.agreed()  # collective: every rank stops at the same step
            exiting = done == t.exit_at_step or signalled is not None
            saved = saver.poll()  # commits a background save whose write is done
            if (t.save_every and done % t.save_every == 0) or done == t.steps or exiting:
                with phase("checkpoint save"):
                    saved.update(saver.save(
                        done, model, optimizer,
                        {"consumed_samples": batches.consumed_samples, "model_config": asdict(cfg.model),
                         "config": config_dict, "resume": run.contract}, shards=shards))
                    if done == t.steps or exiting:  # the run ends here: this checkpoint must be complete
                        saved.update(saver.wait())
            if exiting:
                why = f"{signalled} received" if signalled else f"train.exit_at_step={done} reached"
                log.info("%s: checkpoint saved at step %d, stopping (rerun the command to resume)", why, done)
                break
    finally:
        if hasattr(batches, "close"):  # the data workers end with the run, not at garbage collection
            batches.close()
        saver.close()
        stop.close()
        logger.close()
        profiler.close()
        run.close()
    if env.rank == 0 and metrics:
        from megaqwen.train.plot import plot_run

        log.info("loss curve: %s", plot_run(out_dir))
        if t.objective == "grpo":
            from megaqwen.train.rollout_plot import plot_rewards

            log.info("reward curve: %s", plot_rewards(out_dir))
        if expert_load:
            from megaqwen.train.moe_metrics import load_heatmap

            title = f"expert load, steps {start_step + 1}-{logger.last_step}"
            path = load_heatmap(expert_load, out_dir / "expert_load.png", title)
            log.info("expert load heat map: %s", path)
    return {"steps": t.steps, "start_step": start_step, "last_step": logger.last_step, "final": metrics,
            "out_dir": str(out_dir)}
