"""`megaqwen-data`: one entry point, a subcommand per pipeline job.

Each subcommand module exposes `add_parser(subparsers)`, which registers its parser and sets
`func` (called with the parsed args, returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from megaqwen.cli_common import add_version_flag

# module (relative to megaqwen.data_pipeline) for each subcommand, in help order
SUBCOMMANDS = ["tokenize", "pipeline_cli", "tiny_judge"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="megaqwen-data", description=__doc__)
    add_version_flag(parser)
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"megaqwen.data_pipeline.{name}").add_parser(sub)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
