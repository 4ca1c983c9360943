"""`megaqwen-data pipeline`: run the curation pipeline from a YAML config, locally or as a SLURM task.

    megaqwen-data pipeline --config sample                                    # every stage, locally
    megaqwen-data pipeline --config data_pipeline/configs/pipeline_sample.yaml  # the same, by path
    megaqwen-data pipeline --config C --executor ray [--ray-address auto]     # every stage on Ray
    megaqwen-data pipeline --config C --stage filter --rank 3 --world 16      # one SLURM array task
    megaqwen-data pipeline --config C --stage filter --rank slurm             # rank/world from SLURM_ARRAY_*

Reruns skip finished tasks (markers under OUTPUT_DIR/markers/). Stages: filter, dedup, judge,
train_scorer, train_domains, annotate, shards, recipes, report (judge and train_scorer only with a
judge backend; train_domains only for the embedding backend's student).
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _rank_world(args) -> tuple[int, int]:
    """`--rank slurm`: rank = SLURM_ARRAY_TASK_ID itself and world = --world when given, else
    SLURM_ARRAY_TASK_MAX + 1, so a sparse resubmission of failed tasks (`--array=3,7 ... --world 16`)
    keeps each task's original share of the inputs."""
    if args.rank != "slurm":
        return int(args.rank), args.world
    try:
        rank = int(os.environ["SLURM_ARRAY_TASK_ID"])
        world = args.world if args.world != 1 else int(os.environ["SLURM_ARRAY_TASK_MAX"]) + 1
    except KeyError as e:
        raise ValueError(
            f"--rank slurm needs {e.args[0]} in the environment (run inside an sbatch --array job)"
        ) from e
    if not 0 <= rank < world:
        raise ValueError(f"SLURM_ARRAY_TASK_ID={rank} is outside a world of {world} tasks; pass --world")
    return rank, world


def run(args: argparse.Namespace) -> int:
    from megaqwen.data_pipeline.config import load_config
    from megaqwen.data_pipeline.pipeline import enabled_stages, run_pipeline, run_stage

    overrides = {"output_dir": args.output_dir} if args.output_dir else {}
    try:
        cfg = load_config(args.config, overrides)
        if args.input:
            cfg.input.paths = args.input
        if args.executor:
            cfg.executor.kind = args.executor
        if args.ray_address is not None:
            cfg.executor.ray_address = args.ray_address
        cfg.validate()
        if args.stage:
            rank, world = _rank_world(args)
            ran = {
                args.stage: run_stage(
                    cfg, args.stage, rank, world, args.workers, progress=not args.no_progress
                )
            }
        else:
            if args.world != 1:
                raise ValueError("--rank/--world need --stage (SLURM runs one stage per array job)")
            if args.workers is not None:
                cfg.workers = args.workers
            ran = run_pipeline(cfg, enabled_stages(cfg), progress=not args.no_progress)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        notes = "".join(f"\n  {n}" for n in getattr(e, "__notes__", []))
        print(f"megaqwen-data pipeline: {e}{notes}", file=sys.stderr)
        return 1
    print(json.dumps({"output_dir": cfg.output_dir, "ran_tasks": ran}))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "pipeline",
        help="filter, dedup, judge, classify and re-mix a corpus",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--config",
        required=True,
        help="pipeline YAML path, or a shipped config's name: sample, sample_judge, cluster "
        "(data_pipeline/configs/pipeline_<name>.yaml)",
    )
    p.add_argument("--executor", choices=["local", "ray"], help="overrides executor.kind of the config")
    p.add_argument("--ray-address", help="overrides executor.ray_address ('' local instance, 'auto')")
    p.add_argument("--stage", help="run only this stage (default: all enabled stages in order)")
    p.add_argument("--rank", default="0", help="this task's rank among --world, or 'slurm'")
    p.add_argument("--world", type=int, default=1, help="number of ranks sharing the stage's tasks")
    p.add_argument("--workers", type=int, default=None, help="local processes (overrides the config)")
    p.add_argument("--output-dir", help="overrides output_dir of the config")
    p.add_argument("--input", nargs="+", help="overrides input.paths of the config")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (batch logs)")
    p.set_defaults(func=run)
