"""`megaqwen-convert from-deepspeed`: a checkpoint in DeepSpeed's own format -> the shared DCP format.

Before both engines wrote torch.distributed.checkpoint, `train.engine=deepspeed` saved DeepSpeed's
own ZeRO files (a `deepspeed/` tag folder). DeepSpeed's offline tools do not give all of it back:
`zero_to_fp32` recovers weights only, and `ds_to_universal` writes yet another format (fp32 weights
and moments per parameter, but merged by its own rules for TP). So the converter runs the engine
itself: under torchrun with the world size the checkpoint was saved with, it rebuilds the run from
the config in meta.json, lets DeepSpeed load its files (weights, fp32 masters, Adam moments and
step), and writes them with `parallel.checkpoint.save` into `OUT/checkpoints/step_N` (+ meta.json,
latest). The result resumes under either engine and any layout.

    torchrun --nproc-per-node 2 -m megaqwen.convert.cli from-deepspeed runs/ds --out runs/ds-dcp
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from megaqwen.train import checkpoint as ckpt
from megaqwen.train.resume import saved_contract, saved_engine


def _run_config(meta: dict[str, Any], src: Path):
    """The saved run's Config from meta.json's full copy."""
    from omegaconf import OmegaConf

    from megaqwen.train.config import Config

    if not meta.get("config"):
        raise ValueError(f"{src}/meta.json holds no run config to rebuild the DeepSpeed engine from")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), meta["config"]))


def check_source(src: str | Path) -> tuple[Path, dict[str, Any], int]:
    """(step folder, meta, world size it was saved with) after checking it is DeepSpeed's format."""
    step = ckpt.resolve_checkpoint(src)
    meta = ckpt.read_meta(step)
    fmt = saved_engine(step)
    if fmt != "deepspeed":
        raise ValueError(f"{step} is not in DeepSpeed's own format (no deepspeed/ folder)"
                         + ("; it is already DCP, which both engines resume" if fmt == "native" else ""))
    world = saved_contract(meta).get("parallel.world_size") or meta.get("config", {}).get(
        "parallel", {}).get("world_size")
    if not world:
        raise ValueError(f"{step}/meta.json does not say how many processes saved it (no resume "
                         "contract); run the converter under torchrun with that number")
    return step, meta, int(world)


def from_deepspeed(src: str | Path, out: str | Path) -> Path:
    """Collective (torchrun, the saved world size): convert; returns the new step folder."""
    step, meta, world = check_source(src)
    running = int(os.environ.get("WORLD_SIZE", "0"))
    if running != world:
        raise ValueError(f"{step} was saved by {world} process(es) and DeepSpeed reads its own format "
                         f"only under the same layout; this is {running or 'not a torchrun'} process(es): "
                         f"run `torchrun --nproc-per-node {world} -m megaqwen.convert.cli from-deepspeed "
                         f"{src} --out {out}`")
    out_root = Path(out) / "checkpoints"
    if (out_root / ckpt.LATEST).exists():
        raise ValueError(f"{out_root} already holds checkpoints; choose a new --out folder")
    cfg = _run_config(meta, step)
    cfg.train.init_from = None
    return _convert(cfg, step, meta, out_root)


def _convert(cfg, step: Path, meta: dict[str, Any], out_root: Path) -> Path:
    import torch

    from megaqwen.kernels.registry import resolve_ops
    from megaqwen.parallel import setup as par
    from megaqwen.parallel.checkpoint import load_legacy_deepspeed
    from megaqwen.train.build import build_engine, build_model_for_run

    t = cfg.train
    env = par.init_distributed(cfg.parallel, t.device)
    try:
        accum_steps = t.global_batch_size // (t.micro_batch_size * env.dp_size)
        par.check_layout(cfg.parallel, env, cfg.model, t.seq_len, t.engine, microbatches=accum_steps)
        torch.manual_seed(t.seed)
        ops = resolve_ops(cfg.kernels, device=env.device.type)
        model, shards = build_model_for_run(cfg, env, ops, resuming=True)
        # as in train.loop.train: the same engine, so DeepSpeed's files fit it
        model, optimizer = build_engine(cfg, env, model, shards, accum_steps, resuming=True)
        load_legacy_deepspeed(str(step), model, with_optim=True)
        extra = {k: v for k, v in meta.items() if k not in ("format", "step")}
        return ckpt.save_checkpoint(out_root, int(meta["step"]), model, optimizer, extra, shards=shards)
    finally:
        par.destroy()
