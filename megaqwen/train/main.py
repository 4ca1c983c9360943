"""`megaqwen-train`: the Hydra entry point over `conf/` (shipped as the `megaqwen.conf` package).

    megaqwen-train model=debug train.steps=20 train.lr=3e-4
    megaqwen-train model=qwen2.5-0.5b data.path=shards/recipe-4k.json logger.wandb.mode=online
    megaqwen-train --help        # every field with its default and doc
    megaqwen-train model=qwen2.5-7b --help model   # one section, with the 7B's values

Before Hydra starts the job, `preflight` checks everything that needs no model (overrides, values,
layout, data, resume contract, run-folder lock); a problem is printed as one message by rank 0 and
the process exits with status 2. `--debug` or MEGAQWEN_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import hydra
from omegaconf import DictConfig, OmegaConf

from megaqwen.cli_common import silence_known_warnings, version_text
from megaqwen.train.config import Config, register_configs
from megaqwen.train.errors import DEBUG_ENV, UsageError, debug_enabled, is_rank0, report

log = logging.getLogger("megaqwen.train")
PROG = "megaqwen-train"

register_configs()


@hydra.main(config_path="pkg://megaqwen.conf", config_name="config", version_base="1.3")
def _app(dcfg: DictConfig) -> None:
    from megaqwen.parallel.setup import destroy
    from megaqwen.train.loop import train
    from megaqwen.train.metrics import format_summary

    cfg: Config = OmegaConf.to_object(dcfg)
    t0 = time.perf_counter()
    try:
        summary = train(cfg)
    except UsageError as e:  # found after start-up (e.g. another job took the run folder meanwhile)
        if debug_enabled():
            raise
        sys.exit(report(PROG, e))
    finally:
        destroy()  # leave the torchrun job cleanly (no-op in a single process)
    log.info("%s", format_summary(summary, time.perf_counter() - t0))


def _check(overrides: list[str]) -> bool:
    """Pre-flight on `overrides`; False when there is nothing to train. Exits 2 on a UsageError."""
    from megaqwen.train.preflight import preflight

    try:
        run = preflight(overrides, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except UsageError as e:
        if debug_enabled():
            raise
        sys.exit(report(PROG, e))
    if run.nothing_to_do and is_rank0():
        print(f"{PROG}: nothing to train: {run.latest} is at step {run.resume_step} and train.steps="
              f"{run.cfg.train.steps} (raise train.steps to go on)", file=sys.stderr)
    return not run.nothing_to_do


def _print_help(args: list[str]) -> None:
    """`--help [SECTION]`, with the values of the config composed from the other arguments (so
    `model=qwen2.5-7b --help model` shows the 7B's). Exits 2 on an unknown section or override."""
    from megaqwen.train.help import help_text
    from megaqwen.train.preflight import compose_config

    at = next(i for i, a in enumerate(args) if a in ("--help", "-h"))
    section = args[at + 1] if at + 1 < len(args) and "=" not in args[at + 1] \
        and not args[at + 1].startswith("-") else None
    skip = {at, at + 1} if section else {at}
    overrides = [a for i, a in enumerate(args) if i not in skip and not a.startswith("-")]
    try:
        text = help_text(compose_config(overrides), section=section, overrides=overrides)
    except UsageError as e:
        if debug_enabled():
            raise
        sys.exit(report(PROG, e))
    print(text, end="")


def main() -> None:
    args = sys.argv[1:]
    if "--help" in args or "-h" in args:
        _print_help(args)
        return
    if "--version" in args:
        print(version_text())
        return
    if "--debug" in args:
        args.remove("--debug")
        os.environ[DEBUG_ENV] = "1"
    check_only = "--check" in args
    if check_only:
        args.remove("--check")
    silence_known_warnings()
    hydra_flags = [a for a in args if a.startswith("-")]  # --cfg job, --multirun, ...: Hydra's business
    if not hydra_flags:
        go = _check(args)
        if check_only:
            if go and is_rank0():
                print(f"{PROG}: configuration, data, layout and run folder checked: ready to train",
                      file=sys.stderr)
            return
        if not go:
            return
    if os.environ.get("RANK", "0") != "0":
        # under torchrun only rank 0 writes Hydra's config copy and log file into the run folder
        args += ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    sys.argv = [sys.argv[0], *args]
    _app()


if __name__ == "__main__":
    main()
