"""A layout run through the trainer's own assembly and step, for the parity tests.

`build_run` makes the objects `megaqwen.train.loop._train` makes, with the functions it calls in
the same order (init_distributed -> accumulation_steps -> check_layout -> build_model_for_run ->
Pipeline for pp > 1 -> wrap_data_parallel -> build_engine); `run_steps` feeds `train_step` each
step's global batch, this dp rank's rows cut into micro-batches. Nothing of the step is copied
here, so a change of orchestration that breaks runs fails these tests. The references the tests
compare with stay single-process plain PyTorch (`reference_adamw`: the same AdamW settings).

Gradients: `train_step` zeroes them in the optimizer step, so `capture_grads` reads them in an
optimizer pre-step hook (after the dp/tp/pp/ep reductions and clipping, as the optimizer sees them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from megaqwen.parallel import setup as par
from megaqwen.parallel.config import ParallelConfig
from megaqwen.parallel.data_parallel import unwrap
from megaqwen.parallel.shards import ShardMap
from megaqwen.train.assemble import build_training, seed_and_ops
from megaqwen.train.config import Config, DataConfig, LoggerConfig, TrainConfig, WandbConfig
from megaqwen.train.loop import train_step

Batch = dict[str, torch.Tensor]


def layout_config(model_cfg, parallel: ParallelConfig, steps: int, global_batch: int, micro_batch: int,
                  seq_len: int, lr: float, seed: int, grad_clip: float = 0.0, engine: str = "native",
                  documents: bool = False, objective: str = "lm") -> Config:
    """A run's Config for one layout: fp32 on CPU, constant lr (no warmup), clipping at `grad_clip`
    (0: none). `documents`: positions restart per document and attention is masked per document
    (the batches' position_ids / document_ids); otherwise plain causal positions 0..T-1. `objective`:
    train.objective (validated with the model: reward needs model.head=score)."""
    cfg = Config(model=model_cfg, parallel=parallel,
                 train=TrainConfig(steps=steps, seq_len=seq_len, global_batch_size=global_batch,
                                   micro_batch_size=micro_batch, lr=lr, min_lr=0.0, schedule="constant",
                                   warmup_steps=0, grad_clip=grad_clip, dtype="fp32", device="cpu",
                                   seed=seed, engine=engine, save_every=0, fit_check=False,
                                   objective=objective),
                 data=DataConfig(reset_position_ids=documents, document_mask=documents),
                 logger=LoggerConfig(wandb=WandbConfig(enabled=False, mode="disabled")))
    cfg.validate()
    return cfg


def reference_adamw(model: torch.nn.Module, t: TrainConfig) -> torch.optim.AdamW:
    """Plain torch AdamW with the run's settings: decay on matrices only, as the trainer's."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": t.weight_decay},
                              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                             lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps)


@dataclass
class Run:
    """What `_train` holds for its step loop."""

    cfg: Config
    env: par.DistEnv
    model: Any
    """DDP / FSDP2 / DeepSpeed engine / the plain model, as train_step gets it."""
    optimizer: Any
    shards: ShardMap
    pipe: Any
    accum_steps: int
    reference: Any = None
    """`megaqwen.train.reference.ReferenceModel` when the objective needs one."""

    @property
    def plain(self) -> torch.nn.Module:
        return self.model.module if self.cfg.train.engine == "deepspeed" else unwrap(self.model)


def build_run(cfg: Config) -> Run:
    """`train` + `_train` up to the step loop, fresh start (no checkpoint, no run folder)."""
    t = cfg.train
    env = par.init_distributed(cfg.parallel, t.device)
    accum_steps = par.accumulation_steps(t.global_batch_size, t.micro_batch_size, env.dp_size)
    plan = par.check_layout(cfg.parallel, env, cfg.model, t.seq_len, t.engine, microbatches=accum_steps)
    built = build_training(cfg, env, seed_and_ops(cfg, env), plan, accum_steps, resuming=False)
    model, optimizer, shards, pipe = built.model, built.optimizer, built.shards, built.pipe
    return Run(cfg, env, model, optimizer, shards, pipe, accum_steps, built.reference)


def micro_batches(global_batches: list[Batch], cfg: Config, env: par.DistEnv) -> Iterator[Batch]:
    """This dp rank's micro-batches, step after step: rows [dp_rank * B/dp, (dp_rank + 1) * B/dp) of
    each (B, T) global batch, in consecutive slices of micro_batch_size rows."""
    mbs, per_dp = cfg.train.micro_batch_size, cfg.train.global_batch_size // env.dp_size
    for batch in global_batches:
        for start in range(env.dp_rank * per_dp, (env.dp_rank + 1) * per_dp, mbs):
            yield {k: v[start:start + mbs] for k, v in batch.items()}


def capture_grads(run: Run, gather: Callable[[torch.Tensor, str, ShardMap], torch.Tensor],
                  also: Callable[[Run], Any] | None = None) -> dict[str, Any]:
    """Filled at the first optimizer step: "grads", every trainable parameter's gradient as the
    optimizer gets it (native: after clipping; DeepSpeed clips inside its step, so before), made
    whole by `gather(grad, fqn, shards)`, and "also", what `also(run)` returns then. Collective
    inside the step: every rank steps."""
    out: dict[str, Any] = {}
    deepspeed = run.cfg.train.engine == "deepspeed"

    def take(*_):
        if deepspeed:
            from megaqwen.parallel.deepspeed_engine import full_grad_deepspeed

            grad = lambda p: full_grad_deepspeed(p, run.model)  # noqa: E731
        else:
            grad = lambda p: p.grad  # noqa: E731
        out["grads"] = {n: gather(grad(p), n, run.shards) for n, p in run.plain.named_parameters()
                        if p.requires_grad}
        if also is not None:
            out["also"] = also(run)

    if deepspeed:  # the engine's ZeRO optimizer is no torch Optimizer: wrap its first step
        opt = run.model.optimizer

        def first_step(*args, **kwargs):
            del opt.step  # back to the class's step
            take()
            return opt.step(*args, **kwargs)

        opt.step = first_step
    else:
        def hook(*_):
            handle.remove()
            take()

        handle = run.optimizer.register_step_pre_hook(hook)
    return out


def run_steps(run: Run, global_batches: list[Batch], first_step: int = 0) -> list[dict[str, float]]:
    """`train_step` once per global batch (steps first_step, first_step + 1, ...); its metrics."""
    data = micro_batches(global_batches, run.cfg, run.env)
    return [train_step(run.model, run.optimizer, data, run.cfg, run.env, first_step + i, run.accum_steps,
                       run.shards, run.pipe, run.reference) for i in range(len(global_batches))]
