"""Everything about a run that can be checked without building a model, in one process.

`megaqwen-train` runs this before Hydra starts the job (and `launch/torchrun.sh` runs it once, as
`megaqwen-train --check`, before it starts any rank), so a mistake is one message and costs seconds:

  1. overrides: keys and presets exist (with "did you mean"), values parse and type-check;
  2. fixed-choice values (train.schedule, kernels.*, ...) are valid, then `Config.validate()`;
  3. the parallel layout fits the world size, the machine and the model, kernels can run here:
     the same functions the ranks call before their first step (`parallel.setup.start_settings`,
     `accumulation_steps`, `validate_layout`, `kernels.registry.resolve_ops`), so every refusal a
     rank could make is made here, once;
  4. data.path / data.valid_path name shards; the resume contract holds; the run folder is free;
     train.init_from matches the model.
"""

from __future__ import annotations

from hydra import compose, initialize_config_module
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from megaqwen.train.config import Config
from megaqwen.train.errors import UsageError
from megaqwen.train.fit_check import check_fit
from megaqwen.train.objectives import objective_for
from megaqwen.train.overrides import check_choices, check_overrides, hydra_message, is_hydra_override
from megaqwen.train.run_folder import RunFolder


def compose_config(overrides: list[str]) -> Config:
    """The Config that `megaqwen-train OVERRIDES` runs with; UsageError for any mistake in them."""
    check_overrides(overrides)
    try:
        with initialize_config_module("megaqwen.conf", version_base="1.3"):
            dcfg = compose("config", overrides=[o for o in overrides if not is_hydra_override(o)])
        return OmegaConf.to_object(dcfg)
    except (HydraException, OmegaConfBaseException) as e:
        raise UsageError(hydra_message(e)) from e


def check_config(cfg: Config, world_size: int) -> RunFolder:
    """Steps 2-4 for `world_size` processes; returns the inspected run folder."""
    from megaqwen.kernels.registry import adamw_factory, resolve_ops
    from megaqwen.models.spec import get_spec
    from megaqwen.parallel import setup as par
    from megaqwen.train.build import initial_source
    from megaqwen.train.data_check import check_recipe, check_run_shards

    check_choices(cfg)
    cfg.validate()
    t = cfg.train
    # the functions every rank runs before it builds anything (train.loop.train, train.build): the
    # ranks refuse nothing before their first step that this misses
    dims, _, device = par.start_settings(cfg.parallel, t.device, world_size)
    accum_steps = par.accumulation_steps(t.global_batch_size, t.micro_batch_size, dims.dp)
    par.validate_layout(cfg.parallel, dims, cfg.model, t.seq_len, t.engine, microbatches=accum_steps)
    resolve_ops(cfg.kernels, device=device.type)
    adamw_factory(cfg.kernels.adam, device.type)
    # a blend recipe planned for another context stage (seq_length / rope_base) is an error
    for path in (cfg.data.path, cfg.data.valid_path):
        if path:
            check_recipe(path, cfg.train.seq_len, cfg.model.rope_theta)
    run = RunFolder(cfg, world_size)
    run.check()
    check_run_shards(cfg)  # shards of another tokenizer than the model's, ids >= model.vocab_size
    if t.init_from and run.latest is None:  # what the run starts from must fit the model
        kind, src = initial_source(t.init_from, cfg, get_spec(cfg.model))
        if kind == "hf":
            from megaqwen.parallel.materialize import hf_weight_files

            hf_weight_files(src)  # its weight files exist (their keys are matched once the model does)
    if objective_for(cfg).needs_reference:  # the frozen reference model's weights
        from megaqwen.train.reference import reference_source

        # exists, and its model config is the run's
        initial_source(reference_source(cfg), cfg, get_spec(cfg.model))
    check_fit(cfg, world_size)  # the memory estimate against this machine's, before any model exists
    return run


def preflight(overrides: list[str], world_size: int) -> RunFolder:
    """All model-free checks of `megaqwen-train OVERRIDES`; any failure is a UsageError."""
    cfg = compose_config(overrides)
    try:
        return check_config(cfg, world_size)
    except UsageError:
        raise
    except (ValueError, FileNotFoundError) as e:  # Config.validate / layout checks: the user's values
        raise UsageError(str(e)) from e
