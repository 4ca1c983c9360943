"""Everything a run steps with, built in the trainer's order: the model (meta -> plans -> this rank's
pieces), the pipeline schedule, the frozen reference model an objective may need, the data-parallel
wrapper and the optimizer or DeepSpeed engine. `megaqwen.train.loop` and the layout tests
(tests/parallel/trainer_harness.py) call this one function, so a test cannot assemble a step the
trainer does not."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from megaqwen.parallel import setup as par
from megaqwen.parallel.shards import ShardMap
from megaqwen.train.build import build_engine, build_model_for_run, build_pipeline
from megaqwen.train.config import Config
from megaqwen.train.objective import Objective
from megaqwen.train.objectives import objective_for

log = logging.getLogger(__name__)


@dataclass
class Training:
    model: Any
    """What the step calls: the DDP/FSDP2-wrapped model, the DeepSpeed engine, or the plain model."""
    optimizer: Any
    shards: ShardMap
    objective: Objective
    """The run's objective (`objective_for(cfg)`), resolved once: every step and validation use it."""
    pipe: Any = None
    """`megaqwen.parallel.pipeline.Pipeline` under pp > 1."""
    reference: Any = None
    """`megaqwen.train.reference.ReferenceModel` when the objective needs one."""


def build_training(cfg: Config, env: par.DistEnv, ops, plan, accum_steps: int, resuming: bool) -> Training:
    """The run's model, pipeline, reference model and optimizer on this rank (weights from
    `train.init_from` or the seed unless `resuming`, when the checkpoint fills them next)."""
    model, shards = build_model_for_run(cfg, env, ops, resuming=resuming, plan=plan)
    pipe = build_pipeline(cfg, env, plan, model, shards)
    if pipe is not None:
        log.info("pipeline: %s, pp=%d x %d stage(s) per rank, layers per stage %s, %d micro-batches; "
                 "this rank's stages %s; theoretical bubble %.1f%%", plan.schedule, plan.pp, plan.virtual,
                 list(plan.layers), plan.microbatches, plan.stages_of(env.mesh.rank("pp")),
                 100 * plan.bubble_fraction())
    objective = objective_for(cfg)
    reference = None
    if objective.needs_reference:
        from megaqwen.train.reference import ReferenceModel

        reference = ReferenceModel.build(cfg, env, ops, plan)
    if cfg.train.engine == "native":
        model = par.wrap_data_parallel(model, cfg.parallel, env, shards)  # DDP; FSDP2 was applied on meta
    model, optimizer = build_engine(cfg, env, model, shards, accum_steps, resuming=resuming)
    return Training(model, optimizer, shards, objective, pipe, reference)


def seed_and_ops(cfg: Config, env: par.DistEnv):
    """The seed every rank starts from and the kernels resolved for this device."""
    from megaqwen.kernels.registry import resolve_ops

    torch.manual_seed(cfg.train.seed)
    return resolve_ops(cfg.kernels, device=env.device.type)
